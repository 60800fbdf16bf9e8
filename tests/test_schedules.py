"""Closed-form checks of the β schedules and the precomputed `Schedule` coefficients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import schedules


@pytest.mark.parametrize("name", schedules.SCHEDULES)
@pytest.mark.parametrize("T", [1, 2, 10, 1000, 4000])
def test_every_schedule_is_valid(name, T):
    betas = schedules.get_beta_schedule(name, T)
    assert betas.shape == (T,) and betas.dtype == np.float64
    assert np.all((betas > 0) & (betas < 1))
    s = schedules.make_schedule(betas)
    for field, value in vars(s).items():
        assert value.dtype == jnp.float32 and value.shape == (T,), field
        assert np.all(np.isfinite(np.asarray(value))), field
    ac = np.asarray(s.alphas_cumprod)
    assert np.all(np.diff(ac) < 0), "ᾱ must be strictly decreasing (in float32)"
    assert ac[0] < 1.0 and ac[-1] > 0.0
    assert np.all(np.asarray(s.posterior_variance) >= 0)
    assert s.num_timesteps == T


def test_named_schedules_match_their_formulas():
    np.testing.assert_allclose(schedules.get_beta_schedule("linear", 1000)[[0, -1]], [1e-4, 0.02])
    quad = schedules.get_beta_schedule("quad", 5, beta_start=0.01, beta_end=0.04)
    np.testing.assert_allclose(np.sqrt(quad), np.linspace(0.1, 0.2, 5))
    np.testing.assert_allclose(schedules.get_beta_schedule("const", 3, beta_end=0.5), 0.5)
    np.testing.assert_allclose(schedules.get_beta_schedule("jsd", 4), [0.25, 1 / 3, 0.5, 0.999])
    # Cosine: ᾱ_t = f(t)/f(0), with f(t) = cos²((t/T + s)/(1 + s) π/2), while no β is capped.
    T, s = 1000, 0.008
    betas = schedules.get_beta_schedule("cosine", T)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    ac = np.cumprod(1 - betas)
    for t in [1, 10, 500, 900]:
        np.testing.assert_allclose(ac[t - 1], f(t) / f(0), rtol=1e-10)
    assert betas.max() == pytest.approx(0.999)
    sig = schedules.get_beta_schedule("sigmoid", 3, beta_start=0.1, beta_end=0.3)
    np.testing.assert_allclose(sig[1], 0.2)


def test_make_schedule_matches_float64_definitions():
    betas = schedules.get_beta_schedule("linear", 1000)
    s = schedules.make_schedule(betas)
    a = 1 - betas
    ac = np.cumprod(a)
    ac_prev = np.concatenate([[1.0], ac[:-1]])
    pv = betas * (1 - ac_prev) / (1 - ac)
    expected = {
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1 / ac - 1),
        "posterior_variance": pv,
        "posterior_log_variance_clipped": np.log(np.concatenate([[pv[1]], pv[1:]])),
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1 - ac),
        "posterior_mean_coef2": (1 - ac_prev) * np.sqrt(a) / (1 - ac),
        "snr": ac / (1 - ac),
    }
    for name, value in expected.items():
        np.testing.assert_allclose(np.asarray(getattr(s, name)), value, rtol=2e-6, err_msg=name)
    # Index 0 is the paper's step 1: its posterior is a point mass at x_0.
    assert float(s.posterior_mean_coef1[0]) == pytest.approx(1.0)
    assert float(s.posterior_mean_coef2[0]) == 0.0
    assert float(s.posterior_variance[0]) == 0.0


def test_schedule_passes_through_jit_as_an_argument():
    s = schedules.make_schedule(schedules.get_beta_schedule("cosine", 50))
    f = jax.jit(lambda sched, t: sched.sqrt_alphas_cumprod[t] * sched.num_timesteps)
    assert float(f(s, 3)) == pytest.approx(float(s.sqrt_alphas_cumprod[3]) * 50)
    leaves = jax.tree_util.tree_leaves(s)
    assert len(leaves) == 14 and all(isinstance(x, jax.Array) for x in leaves)


def test_respaced_betas_keep_alphas_cumprod():
    betas = schedules.get_beta_schedule("linear", 1000)
    ac = np.cumprod(1 - betas)
    ts = np.arange(0, 1000, 100)
    respaced = schedules.make_schedule(schedules.respace_betas(ac, ts))
    np.testing.assert_allclose(np.asarray(respaced.alphas_cumprod), ac[ts], rtol=1e-5)
    full = schedules.respace_betas(ac, np.arange(1000))
    np.testing.assert_allclose(full, betas, rtol=1e-9)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: schedules.get_beta_schedule("cosinus", 10), "schedule name 'cosinus'"),
        (lambda: schedules.get_beta_schedule("linear", 0), "num_timesteps"),
        (lambda: schedules.get_beta_schedule("linear", 10, beta_end=1.5), r"\(0, 1\)"),
        # β = 1 only at the last step (zero terminal SNR; tests/test_zero_snr.py).
        (lambda: schedules.make_schedule([1.0, 0.1]), r"betas must all lie in .*\(0, 1\)"),
        (lambda: schedules.make_schedule([0.0, 0.1]), r"betas must all lie in .*\(0, 1\)"),
        (lambda: schedules.make_schedule(np.zeros((2, 2)) + 0.1), "1-D"),
        (lambda: schedules.respace_betas(np.ones(5) * 0.5, np.array([3, 2])), "increasing"),
    ],
)
def test_bad_schedule_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()
