"""EDM's maths against closed forms and an independent float64 reference of its Algorithm 2."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import edm

# A two-component Gaussian mixture, x₀ ~ Σ_k w_k N(μ_k, s_k² I): its exact denoiser
# D(x; σ) = E[x₀ | x₀ + σn = x] is nonlinear in x, a stand-in for a network.
W, MU, S = np.array([0.3, 0.7]), np.array([-0.4, 0.35]), np.array([0.3, 0.25])


def mixture_denoiser_np(x: np.ndarray, sigma: float) -> np.ndarray:
    var = S**2 + sigma**2  # [K]
    d = x[..., None] - MU  # [..., D, K]
    logp = np.log(W) - 0.5 * np.sum(d**2 / var + np.log(var), axis=-2, keepdims=True)
    post = np.exp(logp - logp.max(-1, keepdims=True))
    post /= post.sum(-1, keepdims=True)
    return np.sum(post * (MU + S**2 / var * d), axis=-1)


def mixture_denoiser(x: jax.Array, sigma: jax.Array) -> jax.Array:
    w, mu, s2 = (jnp.asarray(a, jnp.float32) for a in (W, MU, S**2))
    var = s2 + sigma[:, None, None] ** 2  # [B, 1, K]
    d = x[..., None] - mu
    logp = jnp.log(w) - 0.5 * jnp.sum(d**2 / var + jnp.log(var), axis=-2, keepdims=True)
    post = jax.nn.softmax(logp, axis=-1)
    return jnp.sum(post * (mu + s2 / var * d), axis=-1)


def algorithm2(denoise, latents, *, num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0,
               heun=True, s_churn=0.0, s_min=0.0, s_max=math.inf, noises=None):  # fmt: skip
    """EDM's Algorithm 2 in float64 numpy, written from the paper (one example at a time).

    `noises[i]` is ε_i ~ N(0, S_noise² I) of step i (already scaled by S_noise).
    """
    n = num_steps
    i = np.arange(n, dtype=np.float64)
    ramp = i / (n - 1) if n > 1 else np.zeros(1)
    t = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = np.append(t, 0.0)
    out = []
    for b in range(latents.shape[0]):
        x = latents[b].astype(np.float64) * t[0]
        for k in range(n):
            gamma = min(s_churn / n, math.sqrt(2) - 1) if s_min <= t[k] <= s_max else 0.0
            t_hat = t[k] + gamma * t[k]
            x_hat = x if gamma == 0 else x + math.sqrt(t_hat**2 - t[k] ** 2) * noises[k][b]
            d = (x_hat - denoise(x_hat, t_hat)) / t_hat
            x = x_hat + (t[k + 1] - t_hat) * d
            if heun and t[k + 1] != 0:
                d_prime = (x - denoise(x, t[k + 1])) / t[k + 1]
                x = x_hat + (t[k + 1] - t_hat) * (0.5 * d + 0.5 * d_prime)
        out.append(x)
    return np.stack(out)


# --------------------------------------------------------------------------- the grid


def test_karras_sigmas_follow_eq_5():
    s = edm.karras_sigmas(18)
    assert s.dtype == np.float64 and s.shape == (19,)
    np.testing.assert_allclose(s[[0, 17, 18]], [80.0, 0.002, 0.0], rtol=1e-12)
    i = 5
    want = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    np.testing.assert_allclose(s[i], want, rtol=1e-12)
    assert np.all(np.diff(s) < 0)
    np.testing.assert_allclose(edm.karras_sigmas(1, 0.1, 5.0), [5.0, 0.0], rtol=1e-14)
    np.testing.assert_allclose(edm.karras_sigmas(2, 0.1, 5.0, rho=1.0), [5.0, 0.1, 0.0])


@pytest.mark.parametrize(
    "kw", [dict(num_steps=0), dict(num_steps=2.0), dict(num_steps=3, sigma_min=0.0),
           dict(num_steps=3, sigma_max=0.001), dict(num_steps=3, sigma_max=math.inf),
           dict(num_steps=3, rho=0.0)],
)  # fmt: skip
def test_karras_sigmas_refuse_bad_arguments(kw):
    with pytest.raises(ValueError):
        edm.karras_sigmas(**kw)


def test_num_evaluations():
    assert edm.num_evaluations(18) == 35 and edm.num_evaluations(18, "euler") == 18
    assert edm.num_evaluations(1) == 1
    with pytest.raises(ValueError, match="solver"):
        edm.num_evaluations(3, "rk4")


# --------------------------------------------------------------------------- the denoiser


def test_preconditioning_is_table_1():
    sigma = np.array([0.002, 0.5, 3.0, 80.0])
    c_skip, c_out, c_in, c_noise = (np.asarray(c) for c in edm.preconditioning(sigma, 0.5))
    np.testing.assert_allclose(c_skip, 0.25 / (sigma**2 + 0.25), rtol=1e-6)
    np.testing.assert_allclose(c_out, sigma * 0.5 / np.sqrt(sigma**2 + 0.25), rtol=1e-6)
    np.testing.assert_allclose(c_in, 1 / np.sqrt(sigma**2 + 0.25), rtol=1e-6)
    np.testing.assert_allclose(c_noise, np.log(sigma) / 4, rtol=1e-6)
    # The weight is 1/c_out² (unit-variance training targets).
    np.testing.assert_allclose(edm.loss_weight(sigma, 0.5), 1 / c_out**2, rtol=1e-5)


def test_precondition_wraps_the_raw_network():
    seen = {}

    def raw(x_in, c_noise):
        seen["x_in"], seen["c_noise"] = x_in, c_noise
        return jnp.tanh(x_in) + c_noise[:, None, None, None]

    denoise = edm.precondition(raw, sigma_data=0.7)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 2, 1))
    sigma = jnp.array([0.1, 1.0, 20.0])
    c_skip, c_out, c_in, c_noise = edm.preconditioning(sigma, 0.7)
    b = (slice(None), None, None, None)
    want = c_skip[b] * x + c_out[b] * (jnp.tanh(c_in[b] * x) + c_noise[b])
    np.testing.assert_allclose(denoise(x, sigma), want, rtol=1e-6)
    np.testing.assert_allclose(seen["c_noise"], np.log([0.1, 1.0, 20.0]) / 4, rtol=1e-6)
    with pytest.raises(ValueError, match="sigma must have shape"):
        denoise(x, jnp.ones(2))


def _gaussian_denoiser(m, s):
    """The exact D(x; σ) of N(m, s² I) data: m + s²/(s² + σ²) (x - m)."""

    def denoise(x, sigma):
        return m + (s**2 / (s**2 + sigma**2)).reshape(-1, *[1] * (x.ndim - 1)) * (x - m)

    return denoise


# --------------------------------------------------------------------------- the loss


def test_denoiser_loss_keeps_its_determinism_contract():
    x0 = jax.random.uniform(jax.random.PRNGKey(1), (4, 3, 3, 2), minval=-1, maxval=1)
    key = jax.random.PRNGKey(7)
    denoise = lambda x, sigma: 0.9 * x  # noqa: E731
    loss = edm.denoiser_loss(denoise, x0, key, sigma_data=0.5, p_mean=-1.0, p_std=1.5)
    sigma_key, noise_key = jax.random.split(key)
    sigma = np.exp(-1.0 + 1.5 * np.asarray(jax.random.normal(sigma_key, (4,))))
    n = np.asarray(jax.random.normal(noise_key, x0.shape))
    x = np.asarray(x0) + sigma[:, None, None, None] * n
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    want = lam * np.sum((0.9 * x - np.asarray(x0)) ** 2, axis=(1, 2, 3))
    assert loss.shape == (4,) and loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, want, rtol=2e-5)
    s, noise = edm.loss_noise(key, x0, p_mean=-1.0, p_std=1.5)
    np.testing.assert_allclose(s, sigma, rtol=1e-6)
    same = edm.denoiser_loss(denoise, x0, jax.random.PRNGKey(0), sigma=s, noise=noise)
    np.testing.assert_allclose(same, want, rtol=2e-5)


def test_the_exact_denoiser_of_gaussian_data_has_loss_d_at_every_sigma():
    # λ(σ) · posterior variance σ²σ_d²/(σ² + σ_d²) = 1 per dimension when σ_d is the data's std.
    m, s, dim, n = 0.2, 0.5, 4, 20000
    x0 = m + s * jax.random.normal(jax.random.PRNGKey(2), (n, dim))
    loss = edm.denoiser_loss(_gaussian_denoiser(m, s), x0, jax.random.PRNGKey(3), sigma_data=s)
    assert abs(float(jnp.mean(loss)) - dim) < 4 * math.sqrt(2 * dim / n)


# --------------------------------------------------------------------------- the samplers


@pytest.mark.parametrize("solver", ["heun", "euler"])
@pytest.mark.parametrize("num_steps", [1, 2, 5, 18])
def test_sample_equals_algorithm_2(solver, num_steps):
    shape = (6, 3)
    x_T = jax.random.normal(jax.random.PRNGKey(4), shape)
    got = jax.jit(
        lambda x: edm.integrate(
            mixture_denoiser, x * 80.0, edm.karras_sigmas(num_steps), solver=solver
        )
    )(x_T)
    want = algorithm2(mixture_denoiser_np, np.asarray(x_T), num_steps=num_steps,
                      heun=solver == "heun")  # fmt: skip
    # float32 against float64: a Heun step from σ = 80 to 0.002 (N = 2) divides float32
    # rounding of x ~ 80 by 0.002, so the floor scales with the result.
    atol = 1e-5 * max(1.0, np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol)
    samples = edm.sample(mixture_denoiser, shape, jax.random.PRNGKey(0), num_steps=num_steps,
                         solver=solver, x_T=x_T)  # fmt: skip
    np.testing.assert_allclose(samples, np.clip(want, -1, 1), rtol=1e-5, atol=atol)


def test_churn_follows_algorithm_2_with_the_documented_keys():
    shape, n, key = (5, 2), 12, jax.random.PRNGKey(9)
    kw = dict(num_steps=n, sigma_min=0.01, sigma_max=20.0, s_churn=30.0, s_min=0.05, s_max=10.0)
    got = edm.sample(mixture_denoiser, shape, key, s_noise=1.003, **kw)
    x_key, churn_key = jax.random.split(key)
    x_T = np.asarray(jax.random.normal(x_key, shape))
    noises = [1.003 * np.asarray(jax.random.normal(jax.random.fold_in(churn_key, i), shape))
              for i in range(n)]  # fmt: skip
    want = algorithm2(mixture_denoiser_np, x_T, noises=noises, **kw)
    np.testing.assert_allclose(got, np.clip(want, -1, 1), rtol=1e-5, atol=2e-5)
    plain = edm.sample(mixture_denoiser, shape, key, **{**kw, "s_churn": 0.0})
    assert np.abs(np.asarray(plain) - np.asarray(got)).max() > 1e-2  # the churn did something
    # γ_i is capped at √2 - 1 and applies only on [s_min, s_max].
    plan = edm._plan(edm.karras_sigmas(n, 0.01, 20.0), "heun", 1e6, 0.05, 10.0, 1.0)
    sig = edm.karras_sigmas(n, 0.01, 20.0)[:-1][plan["step"]]
    ratio = plan["sigma_hat"] / sig
    inside = (sig >= 0.05) & (sig <= 10.0)
    np.testing.assert_allclose(ratio[inside], math.sqrt(2), rtol=1e-12)
    np.testing.assert_array_equal(ratio[~inside], 1.0)


def _gaussian_error(solver, n, sigma_min=0.002, sigma_max=80.0, m=0.3, s=0.5):
    x_T = jax.random.normal(jax.random.PRNGKey(5), (256, 4))
    sigmas = edm.karras_sigmas(n, sigma_min, sigma_max)
    x = edm.integrate(_gaussian_denoiser(m, s), x_T * sigma_max, sigmas, solver=solver)
    # The probability-flow ODE of N(m, s²) data keeps (x - m)/√(s² + σ²) fixed.
    exact = m + s * (np.asarray(x_T) * sigma_max - m) / math.sqrt(s**2 + sigma_max**2)
    return float(np.sqrt(np.mean((np.asarray(x) - exact) ** 2)) / s)


def test_heun_is_second_order_and_euler_first_on_the_gaussian_ode():
    heun = [_gaussian_error("heun", n) for n in (16, 32, 64)]
    euler = [_gaussian_error("euler", n) for n in (16, 32, 64)]
    for a, b in itertools.pairwise(heun):
        assert 3.6 < a / b < 5.0, heun
    for a, b in itertools.pairwise(euler):
        assert 1.8 < a / b < 2.2, euler
    assert heun[-1] < 5e-3 and heun[-1] < euler[-1] / 10


def test_the_chain_traces_the_network_once_and_is_one_scan():
    calls = []

    def denoise(x, sigma):
        calls.append(1)
        return mixture_denoiser(x, sigma)

    run = jax.jit(lambda key: edm.sample(denoise, (2, 3), key, num_steps=7))
    out = run(jax.random.PRNGKey(0))
    assert len(calls) == 1 and out.shape == (2, 3)
    assert float(jnp.max(jnp.abs(out))) <= 1.0
    _, steps = edm.integrate(mixture_denoiser, jnp.ones((2, 3)) * 80.0, edm.karras_sigmas(7),
                             return_steps=True)  # fmt: skip
    assert steps.shape == (13, 2, 3)  # 2N - 1 evaluations


def test_sample_refuses_bad_arguments():
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="solver"):
        edm.sample(mixture_denoiser, (2, 3), key, solver="rk45")
    with pytest.raises(ValueError, match="x_T must have shape"):
        edm.sample(mixture_denoiser, (2, 3), key, x_T=jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="s_churn"):
        edm.sample(mixture_denoiser, (2, 3), key, s_churn=-1.0)
    with pytest.raises(ValueError, match="s_max"):
        edm.sample(mixture_denoiser, (2, 3), key, s_min=2.0, s_max=1.0)
    with pytest.raises(ValueError, match="needs a key"):
        edm.integrate(mixture_denoiser, jnp.zeros((2, 3)), edm.karras_sigmas(3), s_churn=5.0)
    with pytest.raises(ValueError, match="ending with one 0"):
        edm.integrate(mixture_denoiser, jnp.zeros((2, 3)), [3.0, 1.0, 0.5])
