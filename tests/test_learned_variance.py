"""Learned reverse variances, L_hybrid / L_vlb, and the loss-aware timestep sampler.

The oracle: data x_0 ~ N(M, S² I) has the linear optimal denoiser x̂_0 = E[x_0|x_t] and the
posterior variance Var[x_0|x_t] = S²(1-ᾱ)/(ᾱS² + 1-ᾱ); with that mean, the reverse step's
KL-optimal variance is σ*² = σ_q² + coef1² Var[x_0|x_t], in closed form.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numerics import assert_f32_close

from configs import improved_cifar10, tiny
from ddpm_jax import diffusion, errors, likelihood, losses, sampling, schedules, train
from ddpm_jax.experiment import Experiment, ExperimentConfig
from ddpm_jax.train import loop, timestep_proposal

T = 50
SCHED = schedules.make_schedule(schedules.get_beta_schedule("linear", T, beta_end=0.2))
AC = np.cumprod(1 - np.asarray(schedules.get_beta_schedule("linear", T, beta_end=0.2)))
M, S, D = 0.1, 0.4, 256


def denoiser(x_t, t):
    a = jnp.asarray(AC, jnp.float32)[t][:, None]
    return M + jnp.sqrt(a) * S**2 / (a * S**2 + 1 - a) * (x_t - jnp.sqrt(a) * M)


def with_v(v_of_t):
    """A 2C-channel model: the exact x̂_0, then v(t) in every dimension."""
    return lambda x_t, t: jnp.concatenate(
        [denoiser(x_t, t), jnp.broadcast_to(v_of_t(t)[:, None], x_t.shape)], -1
    )


def optimal_log_variance():
    """log σ*² per t (float64): σ_q² + coef1² Var[x_0|x_t]."""
    post_var = S**2 * (1 - AC) / (AC * S**2 + 1 - AC)
    return np.log(
        np.asarray(SCHED.posterior_variance, np.float64)
        + np.asarray(SCHED.posterior_mean_coef1, np.float64) ** 2 * post_var
    )


X0 = jnp.round((M + S * jax.random.normal(jax.random.PRNGKey(0), (4, D)) + 1) * 127.5) / 127.5 - 1
T_ALL = jnp.arange(T)


@pytest.mark.parametrize("v, fixed", [(-1.0, "fixedsmall"), (1.0, "fixedlarge")])
def test_learned_range_at_minus_and_plus_one_is_the_fixed_variances(v, fixed):
    x = jax.random.normal(jax.random.PRNGKey(1), (T, 3))
    out = with_v(lambda t: jnp.full(t.shape, v))(x, T_ALL)
    learned = diffusion.p_mean_variance(SCHED, out, x, T_ALL, variance="learned_range")
    ref = diffusion.p_mean_variance(SCHED, denoiser(x, T_ALL), x, T_ALL, variance=fixed)
    assert_f32_close(learned.mean, ref.mean)
    first = 0 if fixed == "fixedsmall" else 1  # fixedlarge's t = 0 is σ_q² of step 2, not β_1.
    np.testing.assert_allclose(learned.log_variance[first:], ref.log_variance[first:], rtol=1e-5)
    if fixed == "fixedlarge":
        np.testing.assert_allclose(learned.log_variance[0], np.log(SCHED.betas[0]), rtol=1e-5)
    key = jax.random.PRNGKey(2)
    got = likelihood.bits_per_dim(with_v(lambda t: jnp.full(t.shape, v)), SCHED, X0, key,
                                  variance="learned_range")  # fmt: skip
    want = likelihood.bits_per_dim(denoiser, SCHED, X0, key, variance=fixed)
    np.testing.assert_allclose(got.terms[:, first:], want.terms[:, first:], rtol=1e-4, atol=1e-7)


def test_the_kl_optimal_variance_gives_a_lower_bound_than_both_fixed_choices():
    key = jax.random.PRNGKey(3)
    best = jnp.asarray(optimal_log_variance(), jnp.float32)
    learned = likelihood.bits_per_dim(with_v(lambda t: best[t]), SCHED, X0, key, variance="learned")
    for fixed in ("fixedsmall", "fixedlarge"):
        other = likelihood.bits_per_dim(denoiser, SCHED, X0, key, variance=fixed)
        assert float(learned.diffusion.mean()) < float(other.diffusion.mean()), fixed
        # Per step too, up to the noise of one x_t draw (D = 256 dimensions average it).
        assert np.all(
            np.asarray(learned.terms[:, 1:]).mean(0)
            <= np.asarray(other.terms[:, 1:]).mean(0) + 1e-3
        )


def test_training_the_variance_alone_moves_it_to_the_kl_optimum():
    """L_hybrid's vlb term on a table v[t] (log σ² directly), the mean fixed at the oracle."""
    start = jnp.asarray(SCHED.posterior_log_variance_clipped)  # "fixedsmall"
    target = optimal_log_variance()
    opt = optax.adam(0.05)

    def loss(v, key):
        model = with_v(lambda t: v[t])
        out = losses.training_losses(model, SCHED, X0, key, weighting="x0_mse",
                                     variance="learned", vlb_weight=1.0)  # fmt: skip
        return jnp.mean(out.loss)

    @jax.jit
    def step(v, state, key):
        keys = jax.random.split(key, 16)  # 16 draws of (t, x_t) per update.
        g = jnp.mean(jax.vmap(jax.grad(loss), (None, 0))(v, keys), axis=0)
        updates, state = opt.update(g, state)
        return optax.apply_updates(v, updates), state

    v, state = start, opt.init(start)
    for i in range(300):
        v, state = step(v, state, jax.random.PRNGKey(100 + i))
    gap_before = np.abs(np.asarray(start) - target)[1:]
    gap_after = np.abs(np.asarray(v) - target)[1:]
    assert gap_after.mean() < 0.3 * gap_before.mean(), (gap_before.mean(), gap_after.mean())


def test_the_vlb_term_trains_only_the_variance_and_elbo_trains_both():
    def model(a, b):
        return lambda x_t, t: jnp.concatenate([a * denoiser(x_t, t), jnp.full(x_t.shape, b)], -1)

    key = jax.random.PRNGKey(4)
    kw = dict(weighting="x0_mse", variance="learned_range")

    def loss(a, b, lam):
        return jnp.mean(
            losses.training_losses(model(a, b), SCHED, X0, key, vlb_weight=lam, **kw).loss
        )

    ga_hybrid, gb_hybrid = jax.grad(loss, (0, 1))(0.9, 0.2, 0.5)
    ga_mse, gb_mse = jax.grad(loss, (0, 1))(0.9, 0.2, 0.0)
    assert float(ga_hybrid) == pytest.approx(float(ga_mse), rel=1e-6)  # stop-gradient on the mean
    assert float(gb_mse) == 0.0 and abs(float(gb_hybrid)) > 0

    def elbo(a, b):
        return jnp.mean(losses.training_losses(model(a, b), SCHED, X0, key, weighting="elbo",
                                                  variance="learned_range").loss)  # fmt: skip

    ga, gb = jax.grad(elbo, (0, 1))(0.9, 0.2)
    assert abs(float(ga)) > 0 and abs(float(gb)) > 0
    # The elbo loss is T times the bound's term, in nats summed over dimensions.
    t = jnp.array([3, 7, 20, 49])
    got = losses.training_losses(model(0.9, 0.2), SCHED, X0, key, weighting="elbo",
                                    variance="learned_range", t=t).loss  # fmt: skip
    x_t = diffusion.q_sample(SCHED, X0, t, jax.random.normal(jax.random.split(key)[1], X0.shape))
    bits = likelihood.vb_term_bpd(
        SCHED, X0, x_t, t, model(0.9, 0.2)(x_t, t), variance="learned_range"
    )
    np.testing.assert_allclose(got, T * bits * D * np.log(2.0), rtol=1e-5)
    with pytest.raises(ValueError, match="vlb_weight"):
        losses.training_losses(denoiser, SCHED, X0, key, vlb_weight=0.1)


def test_ddim_and_the_solvers_ignore_the_variance_channels():
    x_T = jax.random.normal(jax.random.PRNGKey(5), (4, 6))
    for sampler in ("ddim", "dpm_solver++", "unipc"):
        kw = dict(sampler=sampler, num_steps=10, x_T=x_T, clip_denoised=False)
        plain = sampling.sample(denoiser, SCHED, x_T.shape, jax.random.PRNGKey(0), **kw)
        model = with_v(lambda t: jnp.full(t.shape, 0.3))
        learned = sampling.sample(
            model, SCHED, x_T.shape, jax.random.PRNGKey(0), variance="learned_range", **kw
        )
        np.testing.assert_array_equal(np.asarray(plain), np.asarray(learned))
    # The ancestral chain uses them: v = -1 is the fixedsmall chain.
    kw = dict(num_steps=10, x_T=x_T)
    small = sampling.sample(
        denoiser, SCHED, x_T.shape, jax.random.PRNGKey(0), variance="fixedsmall", **kw
    )
    learned = sampling.sample(with_v(lambda t: jnp.full(t.shape, -1.0)), SCHED, x_T.shape,
                              jax.random.PRNGKey(0), variance="learned_range", **kw)  # fmt: skip
    np.testing.assert_allclose(np.asarray(small), np.asarray(learned), atol=1e-5)


# ---------------------------------------------------------------- the loss-aware sampler


def filled(losses_of_t):
    state = timestep_proposal.init_state(len(losses_of_t))
    t = jnp.repeat(jnp.arange(len(losses_of_t)), timestep_proposal.HISTORY)
    return timestep_proposal.update(
        state, t, jnp.repeat(jnp.asarray(losses_of_t), timestep_proposal.HISTORY)
    )


def test_the_loss_aware_estimate_is_unbiased_and_uniform_until_warm():
    table = jnp.asarray(np.random.default_rng(0).gamma(0.5, 2.0, T), jnp.float32)
    state = timestep_proposal.init_state(T)
    np.testing.assert_allclose(timestep_proposal.probabilities(state), np.full(T, 1 / T), rtol=1e-6)
    almost = timestep_proposal.update(filled(table), jnp.array([0]), jnp.array([1.0]))
    almost = almost._replace(counts=almost.counts.at[7].set(timestep_proposal.HISTORY - 1))
    np.testing.assert_allclose(
        timestep_proposal.probabilities(almost), np.full(T, 1 / T), rtol=1e-6
    )
    warm = filled(table)
    p = np.asarray(timestep_proposal.probabilities(warm), np.float64)
    assert abs(p.sum() - 1) < 1e-5 and p.min() >= timestep_proposal.UNIFORM_PROB / T * 0.999
    assert np.corrcoef(p, np.asarray(table))[0, 1] > 0.99  # ∝ sqrt(E[L²]) = L here.
    # Exactly unbiased: E_{t~p}[L_t / (T p_t)] = mean_t L_t.
    assert float(np.sum(p * np.asarray(table) / (T * p))) == pytest.approx(
        float(table.mean()), rel=1e-5
    )
    t, w = timestep_proposal.draw(warm, jax.random.PRNGKey(0), 200_000)
    assert float(jnp.mean(w * table[t])) == pytest.approx(float(table.mean()), rel=0.02)


def test_the_history_keeps_the_last_ten_losses_in_order():
    state = timestep_proposal.init_state(3)
    state = timestep_proposal.update(state, jnp.full(12, 1), jnp.arange(12.0))
    np.testing.assert_array_equal(state.losses[1], np.arange(2.0, 12.0))
    assert state.counts.tolist() == [0, timestep_proposal.HISTORY, 0]


def small_improved(**changes):
    """configs/improved_cifar10.py cut to tiny's size (8×8 digits, T = 100)."""
    config = tiny.get_config()
    base = improved_cifar10.get_config()
    for field in ("schedule", "parameterization", "weighting", "variance", "vlb_weight"):
        config.diffusion[field] = base.diffusion[field]
    config.training.update(num_train_steps=4, checkpoint_every_steps=2, sample_every_steps=0,
                           log_every_steps=2)  # fmt: skip
    for path, value in changes.items():
        group, field = path.split("__")
        config[group][field] = value
    return config


def test_learned_variance_configs_build_a_2c_network_and_explain_mismatches():
    cfg = ExperimentConfig.from_config(small_improved())
    assert (
        cfg.model.out_channels == 2
        and Experiment.from_config(cfg).model.config.output_channels == 2
    )
    with pytest.raises(
        errors.ConfigError, match=r"out_channels = 1 must be None or 2 .*learned variance"
    ):
        ExperimentConfig.from_config(small_improved(model__out_channels=1))
    with pytest.raises(errors.ConfigError, match=r"vlb_weight = 0.001: trains a learned variance"):
        ExperimentConfig.from_config(small_improved(diffusion__variance="fixedlarge"))
    with pytest.raises(errors.ConfigError, match=r"vlb_weight = 0.001: must be 0 .* 'elbo'"):
        ExperimentConfig.from_config(small_improved(diffusion__weighting="elbo"))


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_loss_aware_hybrid_run_resumes_bit_identically_and_samples(tmp_path):
    config = small_improved(diffusion__timestep_proposal="loss_aware")
    whole = loop.train(config, str(tmp_path / "whole"))
    assert isinstance(whole, train.state.LossAwareTrainState)
    assert int(whole.timestep_sampler.counts.sum()) == 4 * 8  # 4 steps of batch 8.
    half = small_improved(diffusion__timestep_proposal="loss_aware", training__num_train_steps=2)
    loop.train(half, str(tmp_path / "resumed"))
    resumed = loop.train(config, str(tmp_path / "resumed"))
    assert_trees_equal(resumed, whole)

    import ddpm_jax

    sampler = ddpm_jax.load_sampler(str(tmp_path / "whole"))
    images = sampler.sample(4, seed=0, num_steps=10)
    assert images.shape == (4, 8, 8, 1)
    fast = sampler.sample(4, seed=0, sampler="dpm_solver++", num_steps=10)
    assert fast.shape == (4, 8, 8, 1)
    bound = likelihood.bits_per_dim(sampler.experiment.model_fn(sampler.params), sampler.sched,
                                    jnp.zeros((2, 8, 8, 1)), jax.random.PRNGKey(0),
                                    variance="learned_range", timestep_chunk=50)  # fmt: skip
    assert np.all(np.isfinite(np.asarray(bound.total)))
