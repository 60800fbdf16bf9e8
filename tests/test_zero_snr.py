"""Zero terminal SNR (Lin et al. 2024): the rescaled β, the Schedule with β_T = 1, the samplers."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import inversion, sampling, schedules, timesteps

GOLDEN = np.load(os.path.join(os.path.dirname(__file__), "golden", "karras.npz"))
MEAN, STD = 0.3, 0.5
BETAS = schedules.rescale_zero_terminal_snr(schedules.get_beta_schedule("linear", 1000))
SCHED = schedules.make_schedule(BETAS)


@pytest.mark.parametrize("case", ["linear_1000", "cosine_1000", "linear_10"])
def test_rescale_equals_diffusers(case):
    betas = GOLDEN[f"rescale/{case}/betas"]
    got = schedules.rescale_zero_terminal_snr(betas)
    np.testing.assert_allclose(got, GOLDEN[f"rescale/{case}/rescaled"], rtol=1e-12, atol=1e-15)
    assert got.dtype == np.float64 and got[-1] == 1.0
    # sqrt(ᾱ) is shifted to end at 0 and scaled to keep its first value.
    ac, new = np.cumprod(1 - betas), np.cumprod(1 - got)
    np.testing.assert_allclose(new[0], ac[0], rtol=1e-12)
    assert new[-1] == 0.0 and np.all(np.diff(new) < 0)
    first, last = np.sqrt(ac[0]), np.sqrt(ac[-1])
    want = (np.sqrt(ac) - last) * first / (first - last)
    np.testing.assert_allclose(np.sqrt(new), want, rtol=1e-9, atol=1e-15)


def test_the_schedule_takes_beta_one_at_the_last_step_only():
    s = SCHED
    assert float(s.alphas_cumprod[-1]) == 0.0 and float(s.snr[-1]) == 0.0
    for name, value in vars(s).items():
        v = np.asarray(value)
        if name in ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod"):
            assert np.all(np.isfinite(v[:-1])) and v[-1] == np.inf, name
        else:
            assert np.all(np.isfinite(v)), name
    np.testing.assert_allclose(s.sqrt_one_minus_alphas_cumprod[-1], 1.0)
    bad = BETAS.copy()
    bad[500] = 1.0
    with pytest.raises(ValueError, match="open interval"):
        schedules.make_schedule(bad)
    with pytest.raises(ValueError, match="open interval"):
        schedules.make_schedule([1.0])
    with pytest.raises(ValueError, match="open interval"):
        schedules.get_beta_schedule("linear", 10, beta_end=1.0)
    with pytest.raises(ValueError, match="T >= 2"):
        schedules.rescale_zero_terminal_snr([0.1])
    # Respacing keeps ᾱ_T = 0 (its β' is 1 at the last kept step).
    sub = timesteps.respaced_schedule(s, [0, 400, 999])
    assert float(sub.alphas_cumprod[-1]) == 0.0


def _model(parameterization):
    """The exact x̂_0 of N(MEAN, STD²) data, as an x0- or v-prediction."""
    ac = SCHED.alphas_cumprod

    def model_fn(x, t):
        a = ac[t][:, None]
        x0 = MEAN + jnp.sqrt(a) * STD**2 / (a * STD**2 + 1 - a) * (x - jnp.sqrt(a) * MEAN)
        if parameterization == "x0":
            return x0
        eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
        return jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0

    return model_fn


@pytest.mark.parametrize(
    "sampler,order,spacing",
    [("ancestral", 2, "endpoints"), ("ddim", 2, "trailing"), ("dpm_solver++", 2, "logsnr"),
     ("dpm_solver++", 3, "trailing"), ("unipc", 2, "logsnr"), ("unipc", 3, "endpoints")],
)  # fmt: skip
def test_x0_and_v_models_sample_from_pure_noise(sampler, order, spacing):
    x_T = jax.random.normal(jax.random.PRNGKey(0), (128, 3))
    # ᾱ_T = 0: x_T is pure noise, and the probability-flow ODE ends at MEAN + STD x_T.
    exact = MEAN + STD * np.asarray(x_T)
    out = {}
    for parameterization in ("x0", "v"):
        chain = sampling.reverse_chain(
            _model(parameterization), SCHED, x_T.shape, jax.random.PRNGKey(1),
            parameterization=parameterization, clip_denoised=False, sampler=sampler,
            num_steps=50, timestep_spacing=spacing, order=order,
        )  # fmt: skip
        assert chain.timesteps[-1] == 999
        out[parameterization] = np.asarray(chain.run(chain.init(x_T), 0, chain.num_steps).x)
        assert np.all(np.isfinite(out[parameterization]))
    np.testing.assert_allclose(out["v"], out["x0"], atol=1e-4)
    if sampler == "ancestral":
        assert abs(out["x0"].mean() - MEAN) < 0.15 and abs(out["x0"].std() - STD) < 0.1
    else:
        bound = 0.07 if sampler == "ddim" else 0.03  # measured: 0.056 and <= 0.02
        assert np.sqrt(np.mean((out["x0"] - exact) ** 2)) / STD < bound


def test_an_eps_model_is_refused_at_the_last_timestep():
    eps_model = lambda x, t: x  # noqa: E731
    for sampler in ("ancestral", "ddim", "dpm_solver++"):
        with pytest.raises(ValueError, match=r"'eps' cannot predict x_0 at timestep t = 999"):
            sampling.sample(eps_model, SCHED, (2, 3), jax.random.PRNGKey(0),
                            parameterization="eps", sampler=sampler, num_steps=10)  # fmt: skip
    with pytest.raises(ValueError, match="zero terminal SNR"):
        inversion.ddim_invert(eps_model, SCHED, jnp.zeros((2, 3)), parameterization="eps",
                             num_steps=10)  # fmt: skip
    # A chain that stops below T - 1 is fine.
    x = sampling.sample(eps_model, SCHED, (2, 3), jax.random.PRNGKey(0), parameterization="eps",
                        sampler="ddim", timesteps=[0, 500, 998])  # fmt: skip
    assert np.all(np.isfinite(np.asarray(x)))


def test_logsnr_spacing_starts_from_pure_noise():
    ac = np.cumprod(1 - BETAS)
    for K in (1, 2, 10, 50):
        ts = timesteps.spaced_timesteps(1000, K, "logsnr", ac)
        assert ts.size == K and ts[-1] == 999 and np.all(np.diff(ts) > 0)
    # Unchanged for an ordinary schedule.
    ac = np.cumprod(1 - schedules.get_beta_schedule("linear", 1000))
    assert timesteps.spaced_timesteps(1000, 10, "logsnr", ac)[-1] == 999
