"""Closed-form checks and analytic oracles for `ddpm_jax.diffusion`.

The oracle: for data x_0 ~ N(m, s² I) and x_t = a x_0 + σ ε (a² = ᾱ_t, σ² = 1 - ᾱ_t), the
optimal denoiser is linear: E[x_0|x_t] = m + a s²/(a² s² + σ²) · (x_t - a m), with
Var[x_0|x_t] = s² σ²/(a² s² + σ²). Plugged in as `model_fn`, the loss and the bound must take
their theoretical values.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import assert_f32_close

from ddpm_jax import diffusion, likelihood, losses, schedules

T = 1000
SCHED = schedules.make_schedule(schedules.get_beta_schedule("linear", T))
BETAS64 = schedules.get_beta_schedule("linear", T)
AC64 = np.cumprod(1 - BETAS64)
M, S = 0.1, 0.4  # the oracle's data distribution N(M, S²).


def gaussian_denoiser(sched, m=M, s=S, gain=1.0, shift=0.0, parameterization="x0"):
    """The optimal model for x_0 ~ N(m, s²I) (scaled/shifted away from it on request)."""

    def model_fn(x_t, t):
        a = sched.sqrt_alphas_cumprod[t][:, None]
        var = 1.0 - sched.alphas_cumprod[t][:, None]
        x0_hat = m + gain * a * s**2 / (a**2 * s**2 + var) * (x_t - a * m) + shift
        return diffusion.x0_to_prediction(sched, x_t, t, x0_hat, parameterization)

    return model_fn


def posterior_var_oracle(t):
    """Var[x_0|x_t] for the Gaussian data, float64, per dimension."""
    ac = AC64[t]
    return S**2 * (1 - ac) / (ac * S**2 + (1 - ac))


def c_t(t):
    """The seed's C_t = 1/(2σ_q²) ((1-α_t) sqrt(ᾱ_{t-1})/(1-ᾱ_t))², in float64 (paper step t+1)."""
    ac, ac_prev = AC64[t], np.where(t > 0, AC64[t - 1], 1.0)
    sigma2 = BETAS64[t] * (1 - ac_prev) / (1 - ac)
    return 1 / (2 * sigma2) * (BETAS64[t] * np.sqrt(ac_prev) / (1 - ac)) ** 2


def test_q_sample_moments_match_q_xt_given_x0():
    key = jax.random.PRNGKey(0)
    x0 = jnp.full((20000, 1), 0.7)
    for step in [0, 10, 500, 999]:
        t = jnp.full((x0.shape[0],), step, jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(key, step), x0.shape)
        x_t = np.asarray(diffusion.q_sample(SCHED, x0, t, noise))
        np.testing.assert_allclose(x_t.mean(), math.sqrt(AC64[step]) * 0.7, atol=0.02)
        np.testing.assert_allclose(x_t.var(), 1 - AC64[step], rtol=0.05, atol=1e-5)
        mean, var, log_var = diffusion.q_mean_variance(SCHED, x0, t)
        np.testing.assert_allclose(np.asarray(mean), math.sqrt(AC64[step]) * 0.7, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(var), 1 - AC64[step], rtol=1e-4)
        np.testing.assert_allclose(np.asarray(log_var), np.log(1 - AC64[step]), rtol=1e-4)


def test_posterior_equals_bayes_rule():
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): a product of two Gaussians."""
    rng = np.random.default_rng(0)
    t = np.arange(1, T, 37)
    x0 = rng.uniform(-1, 1, (t.size, 3))
    x_t = rng.normal(size=(t.size, 3))
    ac_prev, alpha, beta = AC64[t - 1][:, None], 1 - BETAS64[t][:, None], BETAS64[t][:, None]
    # Prior on x_{t-1}: N(sqrt(ᾱ_{t-1}) x_0, 1-ᾱ_{t-1}); likelihood of x_t: N(sqrt(α) x_{t-1}, β).
    precision = 1 / (1 - ac_prev) + alpha / beta
    var = 1 / precision
    mean = var * (np.sqrt(ac_prev) * x0 / (1 - ac_prev) + np.sqrt(alpha) * x_t / beta)
    got_mean, got_var, got_log_var = diffusion.q_posterior_mean_variance(
        SCHED, jnp.asarray(x0, jnp.float32), jnp.asarray(x_t, jnp.float32), jnp.asarray(t)
    )
    np.testing.assert_allclose(np.asarray(got_mean), mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_var), np.broadcast_to(var, x0.shape), rtol=1e-4)
    np.testing.assert_allclose(
        np.asarray(got_log_var), np.log(np.broadcast_to(var, x0.shape)), rtol=1e-4
    )
    # At the first step the posterior is a point mass at x_0.
    first = diffusion.q_posterior_mean_variance(
        SCHED, jnp.ones((1, 3)), jnp.zeros((1, 3)), jnp.zeros((1,), jnp.int32)
    )
    np.testing.assert_allclose(np.asarray(first[0]), 1.0, rtol=1e-6)
    assert float(first[1].max()) == 0.0


def test_parameterization_conversions_are_inverses():
    key = jax.random.PRNGKey(1)
    x0 = jax.random.uniform(key, (64, 4, 4, 3), minval=-1, maxval=1)
    eps = jax.random.normal(jax.random.fold_in(key, 1), x0.shape)
    t = jax.random.randint(jax.random.fold_in(key, 2), (64,), 0, T)
    x_t = diffusion.q_sample(SCHED, x0, t, eps)
    kw = dict(rtol=1e-3, atol=2e-3)
    np.testing.assert_allclose(diffusion.eps_from_x0(SCHED, x_t, t, x0), eps, **kw)
    np.testing.assert_allclose(diffusion.x0_from_eps(SCHED, x_t, t, eps), x0, rtol=1e-3, atol=0.03)
    v = diffusion.v_from_x0_eps(SCHED, x0, eps, t)
    np.testing.assert_allclose(diffusion.x0_from_v(SCHED, x_t, t, v), x0, **kw)
    np.testing.assert_allclose(diffusion.eps_from_v(SCHED, x_t, t, v), eps, **kw)
    for p in diffusion.PARAMETERIZATIONS:
        pred = diffusion.x0_to_prediction(SCHED, x_t, t, x0, p)
        back = diffusion.prediction_to_x0(SCHED, x_t, t, pred, p)
        np.testing.assert_allclose(back, x0, rtol=1e-3, atol=0.03 if p == "eps" else 2e-3)


def test_kl_term_equals_c_t_times_squared_x0_error_for_every_t():
    """The seed's identity: L_{t-1} = C_t ||x̂_0 - x_0||² (x_0-param, fixedsmall variance)."""
    key = jax.random.PRNGKey(2)
    t = jnp.arange(1, T, dtype=jnp.int32)
    x0 = jax.random.uniform(key, (T - 1, 6), minval=-1, maxval=1)
    x0_hat = x0 + 0.1 * jax.random.normal(jax.random.fold_in(key, 1), x0.shape)
    x_t = diffusion.q_sample(SCHED, x0, t, jax.random.normal(jax.random.fold_in(key, 2), x0.shape))
    q_mean, _, q_log_var = diffusion.q_posterior_mean_variance(SCHED, x0, x_t, t)
    expected = c_t(np.arange(1, T)) * np.sum(np.square(np.asarray(x0_hat - x0, np.float64)), 1)
    kls = {}
    for p in diffusion.PARAMETERIZATIONS:
        out = diffusion.x0_to_prediction(SCHED, x_t, t, x0_hat, p)
        pm = diffusion.p_mean_variance(
            SCHED, out, x_t, t, parameterization=p, variance="fixedsmall"
        )
        kls[p] = np.asarray(
            jnp.sum(likelihood.normal_kl(q_mean, q_log_var, pm.mean, pm.log_variance), 1)
        )
    np.testing.assert_allclose(kls["x0"], expected, rtol=2e-3, atol=1e-6)
    # ε and v models that imply the same x̂_0 give the same KL.
    np.testing.assert_allclose(kls["eps"], kls["x0"], rtol=2e-2, atol=1e-4)
    np.testing.assert_allclose(kls["v"], kls["x0"], rtol=2e-3, atol=1e-6)
    # And the training weight is exactly T·C_t.
    w = losses.loss_weight(SCHED, t, "elbo") / T
    np.testing.assert_allclose(np.asarray(w), c_t(np.arange(1, T)), rtol=1e-4)


def test_weightings_are_snr_functions():
    t = jnp.array([0, 1, 100, 999])
    snr = AC64[[0, 1, 100, 999]] / (1 - AC64[[0, 1, 100, 999]])
    expected = {
        "x0_mse": np.ones(4),
        "eps_mse": snr,
        "v_mse": snr + 1,
        "snr_trunc": np.maximum(snr, 1),
        "min_snr": np.minimum(snr, 5.0),
    }
    for w, e in expected.items():
        np.testing.assert_allclose(np.asarray(losses.loss_weight(SCHED, t, w)), e, rtol=1e-4)
    # The decoder weight: 1/(2σ_1²) with Ho et al.'s clipped decoder variance σ̃_2².
    pv1 = BETAS64[1] * (1 - AC64[0]) / (1 - AC64[1])
    assert float(losses.loss_weight(SCHED, t, "elbo")[0]) == pytest.approx(T / (2 * pv1), rel=1e-4)


@pytest.mark.parametrize("p", diffusion.PARAMETERIZATIONS)
def test_eps_mse_is_l_simple_and_losses_agree_across_parameterizations(p):
    key = jax.random.PRNGKey(3)
    x0 = jax.random.uniform(key, (16, 8, 8, 3), minval=-1, maxval=1)
    t = jnp.linspace(0, T - 1, 16).astype(jnp.int32)
    noise = jax.random.normal(jax.random.fold_in(key, 1), x0.shape)
    x_t = diffusion.q_sample(SCHED, x0, t, noise)
    eps_hat = noise + 0.05 * jax.random.normal(jax.random.fold_in(key, 2), x0.shape)
    x0_hat = diffusion.x0_from_eps(SCHED, x_t, t, eps_hat)
    model = lambda xt, tt: diffusion.x0_to_prediction(SCHED, xt, tt, x0_hat, p)  # noqa: E731
    got = losses.training_losses(
        model, SCHED, x0, key, parameterization=p, weighting="eps_mse", t=t, noise=noise
    )
    l_simple = np.mean(np.square(np.asarray(eps_hat - noise)), axis=(1, 2, 3))
    np.testing.assert_allclose(np.asarray(got.loss), l_simple, rtol=2e-2)
    np.testing.assert_array_equal(np.asarray(got.t), np.asarray(t))


def test_training_loss_with_optimal_denoiser_is_minimal_and_analytic():
    key = jax.random.PRNGKey(4)
    n, d = 4096, 8
    x0 = M + S * jax.random.normal(key, (n, d))
    t = jax.random.randint(jax.random.fold_in(key, 1), (n,), 1, T)
    noise = jax.random.normal(jax.random.fold_in(key, 2), x0.shape)

    def mean_loss(model_fn, weighting):
        out = losses.training_losses(
            model_fn, SCHED, x0, key, weighting=weighting, t=t, noise=noise
        )
        return float(jnp.mean(out.loss))

    # E[loss | t] = T C_t d Var[x_0|x_t]; average the closed form over the same t.
    tt = np.asarray(t)
    analytic = np.mean(T * c_t(tt) * d * posterior_var_oracle(tt))
    optimal = mean_loss(gaussian_denoiser(SCHED), "elbo")
    assert optimal == pytest.approx(analytic, rel=0.05)
    # Any other denoiser has a larger loss (common random numbers: same t and noise).
    for kw in [dict(gain=0.9), dict(gain=1.1), dict(shift=0.05), dict(m=0.0)]:
        for weighting in ["elbo", "x0_mse", "eps_mse"]:
            worse = mean_loss(gaussian_denoiser(SCHED, **kw), weighting)
            best = mean_loss(gaussian_denoiser(SCHED), weighting)
            assert worse > best, (kw, weighting)


def _discretize(x):
    return jnp.clip(jnp.round((x + 1) * 127.5), 0, 255) / 127.5 - 1


def test_bits_per_dim_terms_match_theory_for_gaussian_data():
    key = jax.random.PRNGKey(5)
    n, d = 512, 4
    x0 = _discretize(M + S * jax.random.normal(key, (n, d)))
    bpd = jax.jit(
        lambda x, k: likelihood.bits_per_dim(
            gaussian_denoiser(SCHED), SCHED, x, k, timestep_chunk=100
        )
    )(x0, jax.random.fold_in(key, 1))
    assert bpd.terms.shape == (n, T) and bpd.total.shape == (n,)
    np.testing.assert_allclose(
        np.asarray(bpd.total), np.asarray(bpd.prior + bpd.decoder + bpd.diffusion), rtol=1e-5
    )
    # KL terms: E[L_t] = C_t Var[x_0|x_t] per dimension (data variance ≈ S² after 8-bit rounding).
    steps = np.array([1, 5, 50, 300, 900])
    expected = c_t(steps) * posterior_var_oracle(steps) / math.log(2)
    got = np.asarray(bpd.terms.mean(0))[steps]
    np.testing.assert_allclose(got, expected, rtol=0.15)
    # Prior term: KL(N(a x_0, 1-ᾱ_T) || N(0, 1)) per dimension, in bits.
    a2, v = AC64[-1], 1 - AC64[-1]
    prior = 0.5 * (-1 - np.log(v) + v + a2 * np.asarray(x0, np.float64) ** 2).mean(1) / math.log(2)
    np.testing.assert_allclose(np.asarray(bpd.prior), prior, rtol=1e-3, atol=1e-7)
    # The KL terms sum to their closed form. The oracle is linear, x̂_0 = m + k (x_t - a m), so
    # E||x̂_0 - x_0||² = (k a - 1)² E(x_0 - m)² + k² σ² per dimension, whatever the data.
    steps = np.arange(1, T)
    a, sig2 = np.sqrt(AC64[steps]), 1 - AC64[steps]
    k = a * S**2 / (a**2 * S**2 + sig2)
    second_moment = float(np.mean((np.asarray(x0, np.float64) - M) ** 2))
    err2 = (k * a - 1) ** 2 * second_moment + k**2 * sig2
    expected_diffusion = np.sum(c_t(steps) * err2) / math.log(2)
    assert float(bpd.diffusion.mean()) == pytest.approx(expected_diffusion, rel=0.02)
    # The bound is an upper bound on the true NLL of the 8-bit data (the entropy of the grid
    # distribution), and a worse denoiser gives a looser bound.
    edges = (np.arange(1, 256) - 127.5) / 127.5
    cdf = np.concatenate(
        [[0.0], 0.5 * (1 + np.vectorize(math.erf)((edges - M) / (S * 2**0.5))), [1.0]]
    )
    p = np.diff(cdf)
    entropy_bits = -np.sum(p[p > 0] * np.log2(p[p > 0]))
    total = float(bpd.total.mean())
    assert total > entropy_bits - 0.05
    worse = likelihood.bits_per_dim(
        gaussian_denoiser(SCHED, gain=0.9),
        SCHED,
        x0,
        jax.random.fold_in(key, 1),
        timestep_chunk=100,
    )
    assert float(worse.total.mean()) > total


def test_bits_per_dim_chunking_and_estimate_are_consistent():
    sched = schedules.make_schedule(
        schedules.get_beta_schedule("linear", 30, beta_start=0.01, beta_end=0.3)
    )
    key = jax.random.PRNGKey(6)
    x0 = _discretize(M + S * jax.random.normal(key, (8, 3)))
    model = gaussian_denoiser(sched, gain=0.95)
    a = likelihood.bits_per_dim(model, sched, x0, key, timestep_chunk=1)
    b = likelihood.bits_per_dim(model, sched, x0, key, timestep_chunk=7)  # 30 = 4·7 + 2
    assert_f32_close(a.terms, b.terms)
    # The one-sample estimate is unbiased, uniform or importance-sampled: its mean over many
    # keys equals the mean of the full bound over many keys.
    full = jax.vmap(
        lambda k: likelihood.bits_per_dim(model, sched, x0, k, timestep_chunk=30).total
    )(jax.random.split(jax.random.fold_in(key, 2), 256))
    keys = jax.random.split(jax.random.fold_in(key, 1), 8000)
    probs = jnp.linspace(3.0, 1.0, 30) / jnp.linspace(3.0, 1.0, 30).sum()
    for p in [None, probs]:
        est = jax.vmap(
            lambda k, p=p: likelihood.bits_per_dim_estimate(model, sched, x0, k, t_probs=p)
        )(keys)
        assert float(est.mean()) == pytest.approx(float(full.mean()), rel=0.05)
    # The stratified estimate too, with a far smaller spread than the one-sample estimate.
    strat = jax.vmap(lambda k: likelihood.bits_per_dim_stratified(model, sched, x0, k))(keys[:2000])
    one = jax.vmap(lambda k: likelihood.bits_per_dim_estimate(model, sched, x0, k))(keys[:2000])
    assert float(strat.mean()) == pytest.approx(float(full.mean()), rel=0.01)
    assert float(strat.std()) < 0.2 * float(one.std())


def test_bound_terms_of_any_split_of_the_timesteps_add_up_to_the_bound():
    sched = schedules.make_schedule(schedules.get_beta_schedule("linear", 20, beta_end=0.3))
    key = jax.random.PRNGKey(7)
    x0 = _discretize(M + S * jax.random.normal(key, (4, 3)))
    model = gaussian_denoiser(sched, gain=0.9)
    full = likelihood.bits_per_dim(model, sched, x0, key, timestep_chunk=6)
    parts = [
        likelihood.bound_terms(model, sched, x0, key, jnp.asarray(ts), timestep_chunk=4)
        for ts in ([0, 1, 2, 3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19])
    ]
    assert_f32_close(np.concatenate(parts, axis=1), full.terms)
    assert likelihood.stratum_edges(1000, 8).tolist() == [1, 2, 6, 13, 32, 75, 178, 422, 1000]


def test_fixed_variances_follow_ho_et_al():
    t = jnp.array([0, 1, 500])
    x = jnp.zeros((3, 2))
    small, small_log = diffusion.model_variance(SCHED, t, x, "fixedsmall")
    large, large_log = diffusion.model_variance(SCHED, t, x, "fixedlarge")
    pv = BETAS64 * (1 - np.concatenate([[1.0], AC64[:-1]])) / (1 - AC64)
    np.testing.assert_allclose(np.asarray(small[:, 0]), pv[[0, 1, 500]], rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(np.asarray(small_log[:, 0]), np.log(pv[[1, 1, 500]]), rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(large[:, 0]), [pv[1], BETAS64[1], BETAS64[500]], rtol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(large_log[:, 0]), np.log(np.asarray(large[:, 0])), rtol=1e-6
    )


def test_discretized_gaussian_likelihood_sums_to_one_over_the_grid():
    grid = jnp.arange(256, dtype=jnp.float32) / 127.5 - 1
    for mean, log_scale in [(0.0, -1.0), (0.9, -3.0), (-0.5, -5.0)]:
        for exact in [False, True]:
            logp = likelihood.discretized_gaussian_log_likelihood(
                grid[None], jnp.full((1, 256), mean), jnp.full((1, 256), log_scale), exact_cdf=exact
            )
            assert float(jnp.exp(logp).sum()) == pytest.approx(1.0, abs=2e-3)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x, t: diffusion.q_sample(SCHED, x, t[:, None], x), r"t must have shape \[batch\]"),
        (lambda x, t: diffusion.q_sample(SCHED, x, t[:2], x), r"t must have shape \[batch\]"),
        (lambda x, t: diffusion.q_sample(SCHED, x, t.astype(jnp.float32), x), "integer"),
        (lambda x, t: diffusion.q_sample(SCHED, x, t + T, x), r"\[0, T\) = \[0, 1000\)"),
        (lambda x, t: diffusion.q_sample(SCHED, x, t - 1, x), r"\[0, T\)"),
        (
            lambda x, t: diffusion.p_mean_variance(SCHED, x, x, t, parameterization="score"),
            r"parameterization 'score'.*\('x0', 'eps', 'v'\)",
        ),
        (
            lambda x, t: diffusion.p_mean_variance(SCHED, x, x, t, variance="learnt"),
            r"variance 'learnt'.*fixedsmall",
        ),
        (
            lambda x, t: diffusion.p_mean_variance(SCHED, x, x, t, variance="learned"),
            r"variance='learned' the model must output 2C",
        ),
        (
            lambda x, t: losses.training_losses(
                lambda a, b: a, SCHED, x, jax.random.PRNGKey(0), weighting="snr"
            ),
            r"weighting 'snr'.*elbo",
        ),
        (
            lambda x, t: losses.training_losses(
                lambda a, b: a[:, :1], SCHED, x, jax.random.PRNGKey(0)
            ),
            "model_fn must return",
        ),
    ],
)
def test_bad_input_raises_value_error(call, match):
    x = jnp.zeros((4, 3))
    t = jnp.arange(4, dtype=jnp.int32)
    with pytest.raises(ValueError, match=match):
        call(x, t)
    # Shape and name errors are raised at trace time under jit too.
    if "T\\)" not in match:
        with pytest.raises(ValueError, match=match):
            jax.jit(call)(x, t)
