"""Checks of the probability-flow ODE likelihood against Gaussian closed forms.

The oracle: for data x_0 ~ N(m, Σ) the exact denoiser is linear,
D(x; σ) = m + Σ (Σ + σ² I)^{-1} (x - m), the smoothed density at σ is N(m, Σ + σ² I), and the
flow is x(σ) - m = (Σ + σ² I)^{1/2} (Σ + σ_0² I)^{-1/2} (x(σ_0) - m) (one eigen-direction at a
time: dy/dσ = σ y / (λ + σ²)). Everything below is computed in float64 numpy from these
formulas, independently of the library. Σ is a full matrix, so that the Hutchinson estimate
has a variance (for a diagonal Jacobian, Rademacher probes are exact).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.likelihood import ode as lo

DIM = 8
SIGMA_MIN, SIGMA_MAX = 0.01, 1000.0


def _gaussian(seed=0, dim=DIM):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    lam = np.geomspace(0.2, 2.0, dim)  # |log p| of several nats: a relative error means something
    return 0.1 * rng.standard_normal(dim), q, lam


M, V, LAM = _gaussian()
SIGMA = (V * LAM) @ V.T


def denoise(x, sigma):
    """The exact denoiser of N(M, Σ) for x [B, DIM], σ [B], in float32."""
    v, lam, m = (jnp.asarray(a, jnp.float32) for a in (V, LAM, M))
    coef = lam / (lam + jnp.square(sigma)[:, None])
    return m + (((x - m) @ v) * coef) @ v.T


def gaussian_log_density(x, sigma):
    """log N(x; M, Σ + σ² I) in float64, per row of x."""
    cov = SIGMA + sigma**2 * np.eye(DIM)
    d = np.asarray(x, np.float64) - M
    _, logdet = np.linalg.slogdet(cov)
    return -0.5 * (np.einsum("bi,bi->b", d, np.linalg.solve(cov, d.T).T) + logdet) - 0.5 * (
        DIM * math.log(2 * math.pi)
    )


def flow_map(x, sigma_from, sigma_to):
    """The exact flow of the probability-flow ODE from σ_from to σ_to, float64."""
    gain = np.sqrt((LAM + sigma_to**2) / (LAM + sigma_from**2))
    return M + ((np.asarray(x, np.float64) - M) @ V * gain) @ V.T


def exact_delta(sigma_from, sigma_to):
    """∫ div f dσ = ½ log det((Σ + σ_to² I) / (Σ + σ_from² I))."""
    return 0.5 * np.sum(np.log((LAM + sigma_to**2) / (LAM + sigma_from**2)))


def _data(n, seed=1):
    rng = np.random.default_rng(seed)
    x0 = M + (rng.standard_normal((n, DIM)) * np.sqrt(LAM)) @ V.T
    return (x0 + SIGMA_MIN * rng.standard_normal((n, DIM))).astype(np.float32)


def _rel_err(got, want):
    """Largest per-example relative error ‖got - want‖ / ‖want‖."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)))


@pytest.fixture(scope="module")
def exact_result():
    x = _data(4)
    solve = jax.jit(
        lambda x: lo.ode_likelihood(
            denoise, x, None, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, trace="exact"
        )
    )
    return x, solve(x)


def test_exact_trace_matches_the_gaussian_log_density(exact_result):
    x, res = exact_result
    expected = gaussian_log_density(x, SIGMA_MIN)
    assert res.log_p.shape == (4,) and res.log_p.dtype == jnp.float32
    np.testing.assert_allclose(res.log_p, expected, rtol=1e-3)
    # Tighter, without the prior's approximation: each part against its own closed form.
    np.testing.assert_allclose(res.delta_log_p, exact_delta(SIGMA_MIN, SIGMA_MAX), rtol=1e-4)
    z = flow_map(x, SIGMA_MIN, SIGMA_MAX)
    assert _rel_err(res.z, z) < 1e-4
    zf = np.asarray(res.z, np.float64)
    prior = -0.5 * np.sum(zf**2, 1) / SIGMA_MAX**2 - 0.5 * DIM * np.log(2 * np.pi * SIGMA_MAX**2)
    np.testing.assert_allclose(res.prior_log_p, prior, rtol=1e-5)
    np.testing.assert_allclose(res.log_p, res.prior_log_p + res.delta_log_p, rtol=1e-6)
    assert 0 < int(res.num_steps) < 200


def test_hutchinson_is_unbiased_within_its_monte_carlo_error():
    """One probe per copy of each point; the mean over copies is within 4 standard errors."""
    points, copies = 3, 96
    x = np.repeat(_data(points, seed=2), copies, axis=0)
    solve = jax.jit(
        lambda x, key, n: lo.ode_likelihood(
            denoise, x, key, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, num_probes=n
        ),
        static_argnums=2,
    )
    one = solve(x, jax.random.key(0), 1)
    delta = np.asarray(one.delta_log_p, np.float64).reshape(points, copies)
    mean, se = delta.mean(1), delta.std(1, ddof=1) / math.sqrt(copies)
    assert (se > 1e-3).all()  # a full covariance: the probes do vary
    np.testing.assert_array_less(np.abs(mean - exact_delta(SIGMA_MIN, SIGMA_MAX)), 4 * se)
    expected = gaussian_log_density(x, SIGMA_MIN).reshape(points, copies)[:, 0]
    log_p = np.asarray(one.log_p, np.float64).reshape(points, copies)
    np.testing.assert_array_less(np.abs(log_p.mean(1) - expected), 4 * se + 1e-3)
    # Averaging 16 probes per example divides the variance by about 16.
    many = solve(x, jax.random.key(1), 16)
    ratio = np.var(np.asarray(many.delta_log_p)) / np.var(delta, ddof=1)
    assert 1 / 40 < ratio < 1 / 6


def test_flow_maps_data_to_the_prior_and_back():
    x = _data(512, seed=3)
    flow = jax.jit(
        lambda x, a, b: lo.probability_flow(denoise, x, sigma_start=a, sigma_end=b),
    )
    z = flow(x, SIGMA_MIN, SIGMA_MAX)
    assert _rel_err(z, flow_map(x, SIGMA_MIN, SIGMA_MAX)) < 1e-4
    # At σ_max the data are (nearly) the prior N(0, σ_max² I): unit scale, zero mean.
    white = np.asarray(z, np.float64) / SIGMA_MAX
    assert abs(white.std() - 1.0) < 0.05 and abs(white.mean()) < 0.05
    back = flow(z, SIGMA_MAX, SIGMA_MIN)
    assert _rel_err(back, x) < 1e-3


def test_tsit5_and_the_public_function_agree_with_dopri5(exact_result):
    x, res = exact_result
    log_p = lo.ode_log_likelihood(
        denoise,
        jnp.asarray(x),
        None,
        sigma_min=SIGMA_MIN,
        sigma_max=SIGMA_MAX,
        trace="exact",
        solver="tsit5",
    )
    np.testing.assert_allclose(log_p, res.log_p, rtol=1e-4)


def test_bins_and_the_bits_per_dim_constant():
    key = jax.random.key(0)
    images = jnp.asarray(np.arange(256, dtype=np.uint8).reshape(1, 256))
    for bins, width, start in [("score_sde", 2 / 256, -1.0), ("centred", 2 / 255, -1 - 1 / 255)]:
        y = np.asarray(lo.dequantize(images, key, bins=bins), np.float64)[0]
        lo_edge = start + width * np.arange(256)
        assert np.all(y >= lo_edge - 1e-6) and np.all(y < lo_edge + width + 1e-6)
        assert lo.bin_width(bins) == pytest.approx(width)
        # A uniform density over the union of the bins is 8 bits/dim exactly.
        dim = 3072
        log_p = -dim * math.log(256 * width)
        np.testing.assert_allclose(
            lo.dequantized_bits_per_dim(jnp.array([log_p]), dim, bins=bins), 8.0, rtol=1e-6
        )
    # score_sde's constant: 7 bits/dim on top of -log2 p / dim.
    np.testing.assert_allclose(lo.dequantized_bits_per_dim(jnp.zeros(1), 10), 7.0, rtol=1e-6)
    with pytest.raises(TypeError, match="8-bit integer"):
        lo.dequantize(jnp.zeros((1, 4)), key)


def test_ode_bits_per_dim_of_8bit_data_against_the_closed_form():
    rng = np.random.default_rng(4)
    images = rng.integers(100, 156, size=(3, DIM), dtype=np.uint8)
    key = jax.random.key(7)
    bpd = lo.ode_bits_per_dim(
        denoise,
        images,
        key,
        sigma_min=SIGMA_MIN,
        sigma_max=SIGMA_MAX,
        trace="exact",
        bins="centred",
    )
    deq_key, _ = jax.random.split(key)
    u = np.asarray(jax.random.uniform(deq_key, images.shape, jnp.float32), np.float64)
    y = (images + u - 0.5) / 127.5 - 1.0
    expected = (-gaussian_log_density(y, SIGMA_MIN) / DIM + math.log(127.5)) / math.log(2)
    np.testing.assert_allclose(bpd, expected, rtol=1e-3)


def test_argument_checks():
    x = jnp.zeros((2, DIM))
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        lo.ode_log_likelihood(denoise, x, None, sigma_min=1.0, sigma_max=1.0, trace="exact")
    with pytest.raises(ValueError, match="trace"):
        lo.ode_log_likelihood(denoise, x, None, sigma_min=0.1, sigma_max=1.0, trace="approx")
    with pytest.raises(ValueError, match="needs a PRNG key"):
        lo.ode_log_likelihood(denoise, x, None, sigma_min=0.1, sigma_max=1.0)
    with pytest.raises(ValueError, match="solver"):
        lo.probability_flow(denoise, x, sigma_start=0.1, sigma_end=1.0, solver="euler")
