"""Heun and Euler on Karras σ's for DDPM models: step for step equal to diffusers' discrete
schedulers (golden file), DDIM at η = 0 on the same grid, learned variances."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import edm, edm_discrete, sampling, schedules

GOLDEN = np.load(os.path.join(os.path.dirname(__file__), "golden", "karras.npz"))
CASES = sorted({k.split("/")[0] for k in GOLDEN.files if k.startswith(("heun_", "euler_"))})
PARAMETERIZATION = {"sample": "x0", "epsilon": "eps", "v_prediction": "v"}


def golden_schedule(name: str) -> schedules.Schedule:
    return schedules.make_schedule(GOLDEN[f"{name}/betas"])


def linear_model(schedule: str, prediction: str):
    """The golden file's model: a(t) x_t + b(t), a and b interpolated linearly in t."""
    a = jnp.asarray(GOLDEN[f"{schedule}/coef_{prediction}_a"])
    b = jnp.asarray(GOLDEN[f"{schedule}/coef_{prediction}_b"])

    def model_fn(x, t):
        lo = jnp.clip(jnp.floor(t), 0, a.shape[0] - 2).astype(jnp.int32)
        w = t - lo
        a_t, b_t = a[lo] * (1 - w) + a[lo + 1] * w, b[lo] * (1 - w) + b[lo + 1] * w
        return a_t[:, None] * x + b_t[:, None]

    return model_fn


def parse(case: str):
    solver, rest = case.split("_", 1)
    prediction = next(p for p in PARAMETERIZATION if rest.startswith(p + "_"))
    schedule, n = rest[len(prediction) + 1 :].split("_")
    return solver, prediction, schedule, int(n)


def test_the_golden_files_share_our_schedules():
    for name in ("linear", "cosine", "zsnr"):
        np.testing.assert_array_equal(
            np.asarray(golden_schedule(name).alphas_cumprod), GOLDEN[f"{name}/alphas_cumprod"]
        )
    np.testing.assert_array_equal(
        GOLDEN["linear/betas"], schedules.get_beta_schedule("linear", 1000)
    )
    np.testing.assert_array_equal(
        GOLDEN["cosine/betas"], schedules.get_beta_schedule("cosine", 1000)
    )
    assert len(CASES) == 12


@pytest.mark.parametrize("case", CASES)
def test_heun_and_euler_match_diffusers_step_for_step(case):
    solver, prediction, schedule, n = parse(case)
    sched = golden_schedule(schedule)
    want_sigmas = GOLDEN[f"{case}/sigmas"]
    grid = edm_discrete.karras_grid(sched, n).astype(np.float32)
    # diffusers' Heun repeats every interior σ (its predictor and corrector halves).
    np.testing.assert_allclose(np.unique(want_sigmas)[::-1], [*grid[grid > 0].tolist(), 0.0],
                               rtol=1e-6)  # fmt: skip
    np.testing.assert_allclose(grid[0], GOLDEN[f"{case}/init_noise_sigma"], rtol=1e-6)
    # The model's fractional timesteps: diffusers' `_sigma_to_t`.
    log_sigmas = jnp.log(jnp.asarray(edm_discrete._lookup_sigmas(sched), jnp.float32))
    t = edm_discrete.sigma_to_t(jnp.asarray(want_sigmas[:-1]), log_sigmas)
    np.testing.assert_allclose(t, GOLDEN[f"{case}/timesteps"], rtol=1e-5, atol=2e-3)

    x_T = jnp.asarray(GOLDEN[f"{case}/x_T"])
    want = GOLDEN[f"{case}/steps"]
    samples, steps = jax.jit(
        lambda x: edm_discrete.sample(
            linear_model(schedule, prediction), sched, x.shape, jax.random.PRNGKey(0),
            parameterization=PARAMETERIZATION[prediction], num_steps=n, solver=solver, x_T=x,
            return_steps=True,
        )
    )(x_T)  # fmt: skip
    assert steps.shape == want.shape == (edm.num_evaluations(n, solver), *x_T.shape)
    # float32 both sides: the rounding of the chain's largest points so far (x_T σ_max ~ 10³)
    # is the floor, which a long step to a small σ (N = 2) carries to the end.
    scale = np.maximum.accumulate(
        np.abs(np.concatenate([np.asarray(x_T)[None] * grid[0], want])).max(axis=(1, 2))
    )[1:]
    for k in range(want.shape[0]):
        np.testing.assert_allclose(steps[k], want[k], rtol=1e-5, atol=1e-5 * scale[k],
                                   err_msg=f"{case}, model call {k}")  # fmt: skip
    np.testing.assert_allclose(samples, np.clip(want[-1], -1, 1), rtol=1e-5, atol=1e-5 * scale[-1])
    if n >= 5:  # steps small enough that the early rounding has contracted away
        np.testing.assert_allclose(steps[-1], want[-1], rtol=1e-5, atol=3e-5)


def test_euler_on_the_grid_of_the_timesteps_is_ddim_at_eta_0():
    sched = golden_schedule("linear")
    model = linear_model("linear", "epsilon")
    ts = np.array([3, 40, 170, 400, 650, 999])
    x_T = jax.random.normal(jax.random.PRNGKey(1), (4, 6))
    chain = sampling.reverse_chain(model, sched, x_T.shape, jax.random.PRNGKey(0),
                                   parameterization="eps", clip_denoised=False, sampler="ddim",
                                   timesteps=ts)  # fmt: skip
    ddim = chain.run(chain.init(x_T), 0, chain.num_steps).x
    # The same levels as σ's, from the same x_T in the x/√ᾱ scaling (√(1 + σ²) x_T exactly).
    sigmas = np.append(edm_discrete.model_sigmas(sched)[ts[::-1]], 0.0)
    denoise = edm_discrete.denoiser(model, sched, parameterization="eps")
    euler = edm.integrate(denoise, x_T * np.sqrt(1 + sigmas[0] ** 2), sigmas, solver="euler")
    np.testing.assert_allclose(euler, ddim, rtol=1e-4, atol=1e-5)


def test_a_learned_variance_is_dropped_and_t_is_fractional():
    sched = golden_schedule("linear")
    model = linear_model("linear", "v_prediction")
    doubled = lambda x, t: jnp.concatenate([model(x, t), jnp.full_like(x, 7.0)], -1)  # noqa: E731
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 6))
    sigma = jnp.array([0.05, 1.3, 90.0])
    seen = []
    spy = lambda x, t: seen.append(t) or model(x, t)  # noqa: E731
    plain = edm_discrete.denoiser(spy, sched, parameterization="v")(x, sigma)
    assert seen[0].dtype == jnp.float32 and seen[0].shape == (3,)
    learned = edm_discrete.denoiser(doubled, sched, parameterization="v", variance="learned_range")
    np.testing.assert_allclose(learned(x, sigma), plain, rtol=1e-6)
    # At the model's own σ_t the timestep is t itself; between two the log-σ interpolation.
    table = edm_discrete.model_sigmas(sched)
    log_sigmas = jnp.log(jnp.asarray(table, jnp.float32))
    t = edm_discrete.sigma_to_t(jnp.asarray(table[[0, 10, 999]], jnp.float32), log_sigmas)
    np.testing.assert_allclose(t, [0, 10, 999], atol=1e-3)
    mid = np.exp(0.75 * np.log(table[500]) + 0.25 * np.log(table[501]))
    np.testing.assert_allclose(edm_discrete.sigma_to_t(jnp.array([mid]), log_sigmas), [500.25],
                               atol=1e-3)  # fmt: skip


def test_zero_terminal_snr_is_clamped_as_diffusers_euler():
    sched = golden_schedule("zsnr")
    assert float(sched.alphas_cumprod[-1]) == 0.0
    sigmas = edm_discrete.model_sigmas(sched)
    np.testing.assert_allclose(sigmas[-1], np.sqrt((1 - 2.0**-24) / 2.0**-24), rtol=1e-6)
    # Below σ_{T-2} there: σ_max maps to where the schedule has ᾱ = 2⁻²⁴.
    assert sigmas[-1] < sigmas[-2] and edm_discrete._lookup_sigmas(sched).size == 999
    x = edm_discrete.sample(linear_model("zsnr", "epsilon"), sched, (4, 6), jax.random.PRNGKey(3),
                            parameterization="eps", num_steps=6)  # fmt: skip
    assert np.all(np.isfinite(np.asarray(x)))


def test_the_discrete_sampler_refuses_a_traced_schedule():
    sched = golden_schedule("linear")

    def run(s):
        return edm_discrete.sample(lambda x, t: x, s, (1, 2), jax.random.PRNGKey(0), num_steps=2)

    with pytest.raises(ValueError, match="concrete schedule"):
        jax.jit(run)(sched)
