"""Checks of `ddpm_jax.sampling` against closed forms, step-by-step loops and each other.

The oracle: for data x_0 ~ N(m, s² I) the optimal denoiser is linear,
E[x_0|x_t] = m + a s²/(a² s² + σ²) (x_t - a m) with a² = ᾱ_t, σ² = 1 - ᾱ_t. With it every
sampler is a linear-Gaussian recursion whose output mean and variance `chain_moments` computes
exactly in float64, independently of the library; Monte-Carlo moments of the compiled samplers
must match it, and over all T steps it must reproduce the data's moments.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from numerics import assert_f32_close

from ddpm_jax import diffusion, inversion, sampling, schedules, timesteps

T = 1000
BETAS64 = schedules.get_beta_schedule("linear", T)
SCHED = schedules.make_schedule(BETAS64)
# A short chain for the loop and sharding checks: T = 50 with ᾱ_T ≈ 0.007.
SHORT_BETAS64 = schedules.get_beta_schedule("linear", 50, beta_start=1e-3, beta_end=0.19)
SHORT = schedules.make_schedule(SHORT_BETAS64)
M, S = 0.1, 0.2  # data N(M, S²): inside [-1, 1] by 4.5 standard deviations.


def oracle(sched, parameterization="x0", m=M, s=S):
    """The optimal model for x_0 ~ N(m, s²I), indexed by original timesteps of `sched`."""

    def model_fn(x_t, t):
        shape = (-1,) + (1,) * (x_t.ndim - 1)
        a = sched.sqrt_alphas_cumprod[t].reshape(shape)
        var = 1.0 - sched.alphas_cumprod[t].reshape(shape)
        x0_hat = m + a * s**2 / (a**2 * s**2 + var) * (x_t - a * m)
        return diffusion.x0_to_prediction(sched, x_t, t, x0_hat, parameterization)

    return model_fn


def chain_moments(betas, ts, sampler, variance="fixedlarge", eta=0.0, m=M, s=S):
    """Exact output mean and variance of a chain driven by the oracle, in float64."""
    ac = np.cumprod(1 - betas)[ts]
    ac_prev = np.append(1.0, ac[:-1])
    mean, var = 0.0, 1.0  # x_T ~ N(0, 1)
    for i in range(len(ts) - 1, -1, -1):
        a, sig2 = np.sqrt(ac[i]), 1 - ac[i]
        k = a * s**2 / (a**2 * s**2 + sig2)  # x̂_0 = k x + m (1 - k a)
        beta = 1 - ac[i] / ac_prev[i]
        post_var = beta * (1 - ac_prev[i]) / sig2
        if sampler == "ancestral":  # μ_q(x_t, x̂_0) from DESIGN.md
            c_x0 = beta * np.sqrt(ac_prev[i]) / sig2
            c_xt = (1 - ac_prev[i]) * np.sqrt(1 - beta) / sig2
            gain, shift = c_x0 * k + c_xt, c_x0 * m * (1 - k * a)
            noise_var = 0.0 if i == 0 else (beta if variance == "fixedlarge" else post_var)
        else:  # Song et al.: sqrt(ᾱ_prev) x̂_0 + sqrt(1 - ᾱ_prev - σ²) ε̂ + σ z
            sigma2 = eta**2 * (1 - ac_prev[i]) / sig2 * (1 - ac[i] / ac_prev[i])
            c_eps = np.sqrt(1 - ac_prev[i] - sigma2)
            gain = np.sqrt(ac_prev[i]) * k + c_eps * (1 - a * k) / np.sqrt(sig2)
            shift = m * (1 - k * a) * (np.sqrt(ac_prev[i]) - c_eps * a / np.sqrt(sig2))
            noise_var = sigma2
        mean, var = gain * mean + shift, gain**2 * var + noise_var
    return mean, var


@pytest.mark.parametrize(
    "kw",
    [
        dict(variance="fixedlarge"),
        dict(variance="fixedsmall"),
        dict(num_steps=50),
        dict(sampler="ddim"),
        dict(sampler="ddim", num_steps=50),
        dict(sampler="ddim", num_steps=50, eta=1.0),
    ],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()),
)
def test_gaussian_oracle_moments(kw):
    n = 1 << 16
    run = jax.jit(
        lambda key: sampling.sample(
            oracle(SCHED), SCHED, (n // 8, 8), key, clip_denoised=False, **kw
        )
    )
    x = np.asarray(run(jax.random.PRNGKey(0)), np.float64)
    ts = timesteps.spaced_timesteps(T, kw.get("num_steps", T))
    mean, var = chain_moments(
        BETAS64,
        ts,
        kw.get("sampler", "ancestral"),
        kw.get("variance", "fixedlarge"),
        kw.get("eta", 0),
    )
    # Monte-Carlo moments agree with the chain's exact moments (5 standard errors).
    assert abs(x.mean() - mean) < 5 * np.sqrt(var / n)
    assert abs(x.var() - var) < 5 * var * np.sqrt(2 / n)
    # The mean is the data's for every chain; over all T steps so is the variance. Strided
    # chains with fixed variances are off by tens of percent in variance (Nichol & Dhariwal).
    assert abs(mean - M) < 2e-3
    if "num_steps" not in kw:
        assert abs(var / S**2 - 1) < 0.05


def test_true_variance_lies_between_fixedsmall_and_fixedlarge():
    """A check of the reference itself: σ_q² <= Var[x_{t-1}|x_t] <= β_t for s < 1."""
    ts = np.arange(T)
    _, small = chain_moments(BETAS64, ts, "ancestral", "fixedsmall")
    _, large = chain_moments(BETAS64, ts, "ancestral", "fixedlarge")
    assert small < S**2 < large


def _ancestral_loop(model_fn, sched, shape, key, parameterization, variance, clip_denoised):
    """Ho et al.'s Algorithm 2, one Python step at a time, with the documented keys."""
    n = sched.num_timesteps
    x = jax.random.normal(jax.random.fold_in(key, n), shape)
    pred = {}
    for t in range(n - 1, -1, -1):
        t_vec = jnp.full((shape[0],), t, jnp.int32)
        p = diffusion.p_mean_variance(
            sched,
            model_fn(x, t_vec),
            x,
            t_vec,
            parameterization=parameterization,
            variance=variance,
            clip_denoised=clip_denoised,
        )
        z = jax.random.normal(jax.random.fold_in(key, t), shape)
        x = p.mean + (t > 0) * jnp.exp(0.5 * p.log_variance) * z
        pred[t] = p.pred_x0
    return jnp.clip(x, -1, 1), pred


@pytest.mark.parametrize(
    "parameterization, variance, clip",
    [("x0", "fixedlarge", True), ("eps", "fixedsmall", False), ("v", "fixedlarge", False)],
)
def test_scan_equals_python_loop_and_trajectory(parameterization, variance, clip):
    key = jax.random.PRNGKey(1)
    shape = (6, 2, 2, 1)
    # A slightly wrong model (m = 0.5), so that clipping and x̂_0 matter.
    model_fn = oracle(SHORT, parameterization, m=0.5, s=0.6)
    kw = dict(parameterization=parameterization, variance=variance, clip_denoised=clip)
    want, pred = _ancestral_loop(model_fn, SHORT, shape, key, **kw)
    got = jax.jit(
        lambda k: sampling.sample(model_fn, SHORT, shape, k, return_trajectory_every=7, **kw)
    )(key)
    np.testing.assert_allclose(np.asarray(got.samples), np.asarray(want), atol=2e-5)
    # 50 steps, every 7th counted back from the last: t = 49, 42, …, 0.
    np.testing.assert_array_equal(np.asarray(got.timesteps), np.arange(49, -1, -7))
    assert got.pred_x0.shape == (8, *shape)
    for frame, t in zip(got.pred_x0, np.asarray(got.timesteps), strict=True):
        np.testing.assert_allclose(np.asarray(frame), np.asarray(pred[t]), atol=2e-5)
    # The last frame is the final step's x̂_0, and the sample is that x̂_0 (clipped).
    np.testing.assert_allclose(
        np.asarray(got.samples), np.clip(np.asarray(got.pred_x0[-1]), -1, 1), atol=1e-6
    )
    plain = sampling.sample(model_fn, SHORT, shape, key, **kw)
    assert_f32_close(plain, got.samples)


def test_strided_ddim_equals_paper_formula_loop():
    """Song et al.'s update over a strided subset, with σ from the paper, in float64 here."""
    key = jax.random.PRNGKey(2)
    shape, eta = (8, 3), 0.5
    ts = np.array([0, 3, 9, 17, 30, 41, 49])
    model_fn = oracle(SHORT, "eps", m=0.3, s=0.5)  # reads the original t: wrong t, wrong ε̂.
    got = sampling.sample(
        model_fn,
        SHORT,
        shape,
        key,
        parameterization="eps",
        sampler="ddim",
        timesteps=ts,
        eta=eta,
        clip_denoised=False,
    )
    ac = np.cumprod(1 - SHORT_BETAS64)
    x = np.asarray(jax.random.normal(jax.random.fold_in(key, 50), shape), np.float64)
    for i in range(len(ts) - 1, -1, -1):
        t = ts[i]
        ac_t, ac_prev = ac[t], (ac[ts[i - 1]] if i > 0 else 1.0)
        eps = np.asarray(
            model_fn(jnp.asarray(x, jnp.float32), jnp.full((shape[0],), t)), np.float64
        )
        x0 = (x - np.sqrt(1 - ac_t) * eps) / np.sqrt(ac_t)
        sigma = eta * np.sqrt((1 - ac_prev) / (1 - ac_t)) * np.sqrt(1 - ac_t / ac_prev)
        z = np.asarray(jax.random.normal(jax.random.fold_in(key, int(t)), shape), np.float64)
        x = np.sqrt(ac_prev) * x0 + np.sqrt(1 - ac_prev - sigma**2) * eps + sigma * z
    np.testing.assert_allclose(np.asarray(got), np.clip(x, -1, 1), atol=2e-4)


def test_ddim_eta_one_is_ancestral_fixedsmall_with_the_same_noise():
    key = jax.random.PRNGKey(3)
    model_fn = oracle(SCHED, "v", m=0.2, s=0.5)
    kw = dict(parameterization="v", num_steps=20, clip_denoised=True)
    ddim = sampling.sample(model_fn, SCHED, (64, 4), key, sampler="ddim", eta=1.0, **kw)
    anc = sampling.sample(model_fn, SCHED, (64, 4), key, variance="fixedsmall", **kw)
    np.testing.assert_allclose(np.asarray(ddim), np.asarray(anc), atol=1e-4)


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_respacing_with_every_step_is_the_original_chain_exactly(sampler):
    key = jax.random.PRNGKey(4)
    model_fn = oracle(SHORT, "eps")
    kw = dict(sampler=sampler, parameterization="eps", eta=0.3 if sampler == "ddim" else 0.0)
    full = sampling.sample(model_fn, SHORT, (5, 3), key, **kw)
    spaced = sampling.sample(model_fn, SHORT, (5, 3), key, num_steps=50, **kw)
    explicit = sampling.sample(model_fn, SHORT, (5, 3), key, timesteps=range(50), **kw)
    np.testing.assert_array_equal(np.asarray(spaced), np.asarray(full))
    np.testing.assert_array_equal(np.asarray(explicit), np.asarray(full))
    assert timesteps.respaced_schedule(SHORT, np.arange(50)) is SHORT


def test_respaced_schedule_keeps_alphas_cumprod():
    ts = timesteps.spaced_timesteps(T, 50)
    assert ts[0] == 0 and ts[-1] == T - 1 and len(ts) == 50 and np.all(np.diff(ts) > 0)
    np.testing.assert_array_equal(timesteps.spaced_timesteps(T, T), np.arange(T))
    np.testing.assert_array_equal(timesteps.spaced_timesteps(T, 1), [T - 1])
    ac = np.cumprod(1 - BETAS64)
    for steps in [ts, np.delete(np.arange(T), 500), np.array([10, 999])]:
        sub = timesteps.respaced_schedule(SCHED, steps)
        assert sub.num_timesteps == len(steps)
        np.testing.assert_allclose(np.asarray(sub.alphas_cumprod), ac[steps], rtol=1e-5)
        betas = 1 - ac[steps] / np.append(1.0, ac[steps][:-1])
        np.testing.assert_allclose(np.asarray(sub.betas), betas, rtol=1e-5)
    # Dropping one step of 1000: the dense betas survive (ratios of float32 ᾱ would not).
    sub = timesteps.respaced_schedule(SCHED, np.delete(np.arange(T), 500))
    np.testing.assert_allclose(np.asarray(sub.betas[:500]), BETAS64[:500], rtol=1e-5)


def test_ddim_eta_zero_is_deterministic_and_invertible():
    key = jax.random.PRNGKey(5)
    model_fn = oracle(SCHED)
    x_T = jax.random.normal(key, (256, 4))
    kw = dict(sampler="ddim", num_steps=50, x_T=x_T, clip_denoised=False)
    a = sampling.sample(model_fn, SCHED, x_T.shape, jax.random.PRNGKey(6), **kw)
    b = sampling.sample(model_fn, SCHED, x_T.shape, jax.random.PRNGKey(7), **kw)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c = sampling.sample(model_fn, SCHED, x_T.shape, jax.random.PRNGKey(7), eta=0.5, **kw)
    assert float(jnp.abs(c - a).max()) > 0.05

    x0 = M + S * jax.random.normal(jax.random.fold_in(key, 1), (256, 4))

    def reconstruction_error(num_steps, iters):
        latent = inversion.ddim_invert(
            model_fn, SCHED, x0, num_steps=num_steps, fixed_point_iters=iters
        )
        back = sampling.sample(
            model_fn,
            SCHED,
            x0.shape,
            key,
            sampler="ddim",
            num_steps=num_steps,
            x_T=latent,
            clip_denoised=False,
        )
        return float(jnp.abs(back - x0).max()), latent

    # Plain inversion over all 1000 steps; the latent is standard normal, as it should be.
    err, latent = reconstruction_error(None, 0)
    assert err < 0.02
    assert abs(float(latent.std()) - 1) < 0.1 and abs(float(latent.mean())) < 0.1
    # With 50 steps plain inversion drifts; fixed-point refinement makes it near exact.
    coarse, _ = reconstruction_error(50, 0)
    refined, _ = reconstruction_error(50, 4)
    assert refined < 2e-3 < 0.05 < coarse


def _count_model_calls(T_, fn):
    sched = schedules.make_schedule(
        schedules.get_beta_schedule("linear", T_, beta_start=1e-3, beta_end=0.2)
    )
    calls = []
    model = oracle(sched)

    def counted(x, t):
        calls.append(1)
        return model(x, t)

    jax.jit(lambda key: fn(counted, sched, key)).lower(jax.random.PRNGKey(0))
    return len(calls)


@pytest.mark.parametrize(
    "fn",
    [
        lambda m, s, k: sampling.sample(m, s, (2, 3), k),
        lambda m, s, k: sampling.sample(m, s, (2, 3), k, sampler="ddim", eta=0.5, num_steps=5),
        lambda m, s, k: sampling.sample(m, s, (2, 3), k, return_trajectory_every=3),
        lambda m, s, k: inversion.ddim_invert(m, s, jnp.zeros((2, 3)), fixed_point_iters=2),
    ],
    ids=["ancestral", "ddim-strided", "trajectory", "invert"],
)
def test_model_is_traced_a_constant_number_of_times(fn):
    n10, n100 = _count_model_calls(10, fn), _count_model_calls(100, fn)
    assert n10 == n100 <= 2  # invert: the Euler guess and the fixed-point loop body.


def test_sharded_sampling_matches_single_device_and_clips():
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    shape = (16, 4, 4, 1)
    # A model that predicts far outside [-1, 1]: the returned images are still in range.
    model_fn = oracle(SHORT, m=3.0, s=2.0)
    fn = lambda key: sampling.sample(model_fn, SHORT, shape, key, parameterization="x0")  # noqa: E731
    sharded = jax.jit(fn, out_shardings=NamedSharding(mesh, PartitionSpec("data")))
    key = jax.random.PRNGKey(8)
    got, want = sharded(key), jax.jit(fn)(key)
    assert got.sharding.spec == PartitionSpec("data") and got.dtype == jnp.float32
    assert_f32_close(got, want)
    assert got.shape == shape and float(jnp.abs(got).max()) <= 1.0
    assert float(jnp.abs(got).max()) == 1.0  # clipping happened.


def test_guided_model_fn_combines_predictions_in_any_parameterization():
    x = jax.random.normal(jax.random.PRNGKey(9), (4, 3))
    t = jnp.array([0, 10, 30, 49])
    x0_hat = {}
    for p in diffusion.PARAMETERIZATIONS:
        cond, uncond = oracle(SHORT, p, m=0.5), oracle(SHORT, p, m=-0.2)
        np.testing.assert_allclose(
            sampling.guided_model_fn(cond, uncond, 1.0)(x, t), cond(x, t), atol=1e-6
        )
        np.testing.assert_allclose(
            sampling.guided_model_fn(cond, uncond, 0.0)(x, t), uncond(x, t), atol=1e-6
        )
        guided = sampling.guided_model_fn(cond, uncond, 3.0)(x, t)
        x0_hat[p] = diffusion.prediction_to_x0(SHORT, x, t, guided, p)
    # The guided x̂_0 is uncond + 3 (cond - uncond) whatever the parameterization.
    x0_c, x0_u = oracle(SHORT, m=0.5)(x, t), oracle(SHORT, m=-0.2)(x, t)
    for p in diffusion.PARAMETERIZATIONS:
        np.testing.assert_allclose(x0_hat[p], x0_u + 3.0 * (x0_c - x0_u), rtol=1e-3, atol=1e-3)


KEY = jax.random.PRNGKey(0)
MODEL = oracle(SHORT)


@pytest.mark.parametrize(
    "kw, match",
    [
        (
            dict(sampler="euler"),
            r"sampler 'euler'.*\('ancestral', 'ddim', 'dpm_solver\+\+', 'unipc'\)",
        ),
        (dict(parameterization="score"), r"parameterization 'score'.*'x0', 'eps', 'v'"),
        (dict(variance="learnt"), r"variance 'learnt'.*fixedsmall"),
        (dict(variance="learned"), r"variance='learned' the model must output 2C"),
        (dict(num_steps=0), r"num_steps must lie in \[1, T\] = \[1, 50\]"),
        (dict(num_steps=51), r"num_steps must lie in \[1, T\]"),
        (dict(num_steps=2.5), "num_steps must be an integer"),
        (dict(timesteps=[0, 5, 5]), "strictly increasing"),
        (dict(timesteps=[0, 50]), r"\[0, T\) = \[0, 50\)"),
        (dict(timesteps=[0, 10], num_steps=2), "not both"),
        (dict(sampler="ddim", eta=-0.1), "eta must be a number >= 0"),
        (dict(eta=1.0), "eta=1.0 applies to sampler='ddim' only"),
        (dict(shape=32), "shape must be a non-empty tuple of positive ints"),
        (dict(shape=(4, 2.0)), "shape must be"),
        (dict(shape=(0, 3)), "shape must be"),
        (dict(x_T=jnp.zeros((3, 3))), r"x_T must have shape \(4, 3\)"),
        (dict(return_trajectory_every=-1), "return_trajectory_every"),
    ],
)
def test_bad_input_raises_value_error(kw, match):
    shape = kw.pop("shape", (4, 3))
    with pytest.raises(ValueError, match=match):
        sampling.sample(MODEL, SHORT, shape, KEY, **kw)


def test_bad_input_of_helpers_raises_value_error():
    with pytest.raises(ValueError, match="fixed_point_iters"):
        inversion.ddim_invert(MODEL, SHORT, jnp.zeros((2, 3)), fixed_point_iters=-1)
    with pytest.raises(ValueError, match="parameterization"):
        inversion.ddim_invert(MODEL, SHORT, jnp.zeros((2, 3)), parameterization="score")
    with pytest.raises(ValueError, match="model prediction must have x_t's shape"):
        sampling.sample(lambda x, t: x[:, :1], SHORT, (2, 3), KEY)
    # Respacing needs a concrete schedule; every step works with a traced one.
    with pytest.raises(ValueError, match="close over sched"):
        jax.jit(lambda s: sampling.sample(MODEL, s, (2, 3), KEY, num_steps=10))(SHORT)
    out = jax.jit(lambda s: sampling.sample(MODEL, s, (2, 3), KEY))(SHORT)
    np.testing.assert_array_equal(
        np.asarray(out), np.asarray(sampling.sample(MODEL, SHORT, (2, 3), KEY))
    )
