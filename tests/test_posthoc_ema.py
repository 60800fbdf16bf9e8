"""Post-hoc EMA (EDM2): σ_rel <-> γ, the power-function EMA and its exact weights, and the
least-squares reconstruction of one profile from the snapshots of two others."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm_jax import posthoc_ema as pe

# ------------------------------------------------------------------------- σ_rel <-> γ


def test_sigma_rel_gamma_round_trip():
    sig = np.geomspace(1e-4, pe.SIGMA_REL_MAX, 60)
    gam = pe.sigma_rel_to_gamma(sig)
    assert gam.shape == sig.shape and np.all(gam >= 0) and np.all(np.diff(gam) < 0)
    np.testing.assert_allclose(pe.gamma_to_sigma_rel(gam), sig, rtol=1e-13)
    g = np.array([0.0, 0.3, 1.0, 6.94, 16.97, 100.0, 1e4])
    np.testing.assert_allclose(
        pe.sigma_rel_to_gamma(pe.gamma_to_sigma_rel(g)), g, rtol=1e-11, atol=1e-14
    )
    # EDM2's profiles: σ_rel = 0.05 and 0.10 are γ ≈ 16.97 and 6.94; γ = 0 is 1/√12.
    assert pe.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=5e-3)
    assert pe.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=5e-3)
    assert pe.sigma_rel_to_gamma(1 / math.sqrt(12)) == 0.0
    assert isinstance(pe.sigma_rel_to_gamma(0.1), float)


@pytest.mark.parametrize("sigma_rel", [0.02, 0.05, 0.1, 0.2, 0.28])
def test_sigma_rel_is_the_relative_std_of_the_weights(sigma_rel):
    """σ_rel is the standard deviation of the averaged step i/t under the weights w_i."""
    t = 100_000
    w = pe.profile_weights(t, pe.sigma_rel_to_gamma(sigma_rel))
    x = np.arange(1, t + 1) / t
    mean = w @ x
    assert math.sqrt(w @ (x - mean) ** 2) == pytest.approx(sigma_rel, rel=1e-4)


@pytest.mark.parametrize(
    "bad", [0.0, -0.05, 0.2887, 0.29, 0.3, 1.0, float("nan"), float("inf"), [0.05, 0.4]]
)
def test_bad_sigma_rel_is_refused(bad):
    with pytest.raises(ValueError, match="sigma_rel must lie in"):
        pe.sigma_rel_to_gamma(bad)


def test_bad_inputs_are_refused():
    for g in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="gamma must be"):
            pe.gamma_to_sigma_rel(g)
    steps, sig = [100, 200, 100, 200], [0.05, 0.05, 0.1, 0.1]
    with pytest.raises(ValueError, match="sigma_rel must lie in"):
        pe.solve_coefficients(steps, sig, 0.3)
    with pytest.raises(ValueError, match="sigma_rel must lie in"):
        pe.solve_coefficients(steps, [0.05, 0.05, 0.1, 0.5], 0.07)
    with pytest.raises(ValueError, match="after the last snapshot"):
        pe.solve_coefficients(steps, sig, 0.07, step=201)
    with pytest.raises(ValueError, match="integers >= 1"):
        pe.solve_coefficients([0, 200, 100, 200], sig, 0.07)
    with pytest.raises(ValueError, match="snapshot steps for"):
        pe.solve_coefficients(steps, sig[:3], 0.07)
    with pytest.raises(ValueError, match="Unknown method"):
        pe.gram_matrix(steps, [1.0] * 4, method="simpson")


# ------------------------------------------------------------------------- tracking


@pytest.mark.parametrize("gamma", [0.0, 1.5, 6.94, 16.97, 97.0])
def test_recursion_equals_the_closed_form_weights(gamma):
    """The EMA of the unit vectors θ_i = e_i is the weight vector itself."""
    t = 300
    w = pe.profile_weights(t, gamma)
    assert w.shape == (t,) and w.dtype == np.float64
    assert np.all(w >= 0) and w.sum() == pytest.approx(1.0, abs=1e-13)
    if gamma > 0:
        assert np.all(np.diff(w) > 0)
    # float64, with β written out as in the paper: exact up to rounding.
    ema = np.zeros(t)
    for i in range(1, t + 1):
        b = (1.0 - 1.0 / i) ** (gamma + 1.0)
        ema = b * ema + (1.0 - b) * np.eye(t)[i - 1]
    np.testing.assert_allclose(ema, w, rtol=1e-10, atol=1e-300)
    # float32, through the jitted `update`.
    step_fn = jax.jit(lambda e, p, i: pe.update(e, p, i, gamma))
    ema32 = {"e": jnp.full((t,), 7.0, jnp.float32)}  # overwritten by the first update
    for i in range(1, t + 1):
        ema32 = step_fn(ema32, {"e": jax.nn.one_hot(i - 1, t)}, i)
    np.testing.assert_allclose(np.asarray(ema32["e"]), w, rtol=2e-5, atol=1e-9)


def test_beta_first_update_copies_and_stays_accurate_late():
    b, one_minus = pe.beta(1, 6.94)
    assert float(b) == 0.0 and float(one_minus) == 1.0
    params = {"a": jnp.array([1.5, -2.25, 3e-8], jnp.bfloat16), "b": jnp.arange(3.0)}
    junk = {"a": jnp.full((3,), 1e30), "b": jnp.full((3,), -4.0)}
    out = jax.jit(pe.update)(junk, params, jnp.int32(1), 16.97)
    for k in params:
        assert out[k].dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(params[k], np.float32))
    # 1 - β ≈ (γ+1)/t at t = 1e6 keeps float32 accuracy (1 - 1/t rounded first would not).
    for t in (10, 1000, 10**6, 10**7):
        for gamma in (0.0, 6.94, 97.0):
            exact = -math.expm1((gamma + 1) * math.log1p(-1 / t))
            _, got = pe.beta(jnp.int32(t), gamma)
            assert float(got) == pytest.approx(exact, rel=1e-6)


def test_update_profiles_keeps_the_parameters_sharding():
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    params = {"w": jax.device_put(jnp.ones((16, 3)), sharding)}
    gammas = (16.97, 6.94)
    emas = jax.jit(lambda p: tuple(pe.init(p) for _ in gammas))(params)
    new = jax.jit(lambda e, p, s: pe.update_profiles(e, p, s, gammas))(emas, params, 5)
    assert isinstance(new, tuple) and len(new) == 2
    for e in new:
        assert e["w"].sharding.is_equivalent_to(sharding, 2) and e["w"].dtype == jnp.float32
    with pytest.raises(ValueError, match="gammas"):
        pe.update_profiles(emas, params, 5, (1.0,))


# ------------------------------------------------------------------------- inner products


def test_gram_matrix_equals_the_sums_over_the_steps():
    rng = np.random.default_rng(0)
    steps = rng.integers(1, 400, size=12)
    steps[3] = steps[7]  # shared steps and exponents exercise the segment bookkeeping
    gammas = rng.choice([0.0, 0.7, 6.94, 16.97, 97.0], size=12)
    W = np.zeros((12, steps.max()))
    for k, (t, g) in enumerate(zip(steps, gammas, strict=True)):
        W[k, :t] = pe.profile_weights(int(t), g)
    gram = pe.gram_matrix(steps, gammas)
    np.testing.assert_allclose(gram, W @ W.T, rtol=1e-12, atol=1e-15 * gram.max())
    # EDM2's continuous formula is the limit of long profiles, off for short ones.
    cont = pe.gram_matrix(steps, gammas, method="continuous")
    assert np.max(np.abs(cont / gram - 1)) > 1e-2
    long_steps = steps * 1000
    np.testing.assert_allclose(
        pe.gram_matrix(long_steps, gammas, method="continuous"),
        pe.gram_matrix(long_steps, gammas),
        rtol=2e-3,
    )


# ------------------------------------------------------------------------- reconstruction

T = 4096  # steps of the synthetic run
TRACKED = (0.05, 0.10)  # EDM2's two stored profiles
TARGETS = (0.07, 0.15, 0.20)  # tracked directly too, to compare with their reconstruction
SIGMAS = TRACKED + TARGETS


@pytest.fixture(scope="module")
def run():
    """A synthetic run of T steps: the parameters (a small pytree doing a random walk with a
    drift, plus per-step jitter, like SGD iterates around a moving optimum) and every profile
    of `SIGMAS` tracked with the float32 `update` at every step."""
    rng = np.random.default_rng(1)
    traj = {}
    for name, shape in {"w": (12, 8), "b": (8,)}.items():
        drift = 1e-3 * rng.standard_normal(shape)
        walk = np.cumsum(1e-2 * rng.standard_normal((T, *shape)), axis=0)
        jitter = 3e-2 * rng.standard_normal((T, *shape))
        traj[name] = np.arange(1, T + 1).reshape(-1, *[1] * len(shape)) * drift + walk + jitter
    traj = jax.tree.map(lambda x: x.astype(np.float32), traj)
    return traj, _track(traj, SIGMAS)


def _track(traj, sigmas):
    """{σ_rel: the float32 EMA of that profile after every step, stacked [T, ...]}."""
    gammas = tuple(pe.sigma_rel_to_gamma(s) for s in sigmas)

    @jax.jit
    def track(theta):
        def body(emas, xs):
            t, params = xs
            emas = pe.update_profiles(emas, params, t, gammas)
            return emas, emas

        first = jax.tree.map(lambda x: x[0], theta)
        _, history = jax.lax.scan(
            body, tuple(pe.init(first) for _ in gammas), (jnp.arange(1, T + 1), theta)
        )
        return history

    history = jax.tree.map(np.asarray, track(traj))
    return dict(zip(sigmas, history, strict=True))


def _at(tree, step):
    return jax.tree.map(lambda x: x[step - 1], tree)


def _norm(tree):
    return math.sqrt(sum(np.sum(np.float64(x) ** 2) for x in jax.tree.leaves(tree)))


def _rel_err(a, b):
    """‖a - b‖ / ‖b‖ over all the leaves of two pytrees, in float64."""
    return _norm(jax.tree.map(lambda x, y: np.float64(x) - np.float64(y), a, b)) / _norm(b)


def _snapshots(history, every):
    steps = np.arange(every, T + 1, every)
    snap_steps = np.concatenate([steps] * len(TRACKED))
    snap_sigmas = np.repeat(TRACKED, steps.size)
    snaps = [_at(history[s], int(t)) for s, t in zip(snap_sigmas, snap_steps, strict=True)]
    return snap_steps, snap_sigmas, snaps


def _reconstruction_error(run, every, sigma_rel, step=T):
    history = run[1]
    snap_steps, snap_sigmas, snaps = _snapshots(history, every)
    c = pe.solve_coefficients(snap_steps, snap_sigmas, sigma_rel, step)
    werr = pe.weight_error(snap_steps, snap_sigmas, c, sigma_rel, step)
    rec = pe.reconstruct(snaps, c)
    return _rel_err(rec, _at(history[sigma_rel], step)), werr, rec, c


def test_the_float32_tracking_is_the_exact_average(run):
    """The directly tracked profiles, the reference below, are Σ w_i θ_i to ~1e-6."""
    traj, history = run
    for s in SIGMAS:
        w = pe.profile_weights(T, pe.sigma_rel_to_gamma(s))
        exact = jax.tree.map(lambda x, w=w: np.tensordot(w, np.float64(x), 1), traj)
        assert _rel_err(_at(history[s], T), exact) < 2e-6


@pytest.mark.parametrize("sigma_rel", TARGETS)
def test_reconstruction_equals_the_directly_tracked_profile(run, sigma_rel):
    """Snapshots of σ_rel 0.05 and 0.10 every 64 steps (64 per profile, as EDM2's ~1e6 steps
    with a snapshot every ~1.6e4) give a third profile to a relative parameter error ≤ 1e-3.

    The error has three parts: (1) the least-squares residual δw of the weights, known exactly
    (`weight_error`: 2.5e-4, 5.8e-4 and 1.7e-3 of ‖w*‖ here), which moves the parameters by
    Σ_i δw_i θ_i, at most ‖δw‖ (Σ_i θ_i²)^½ per coordinate (Cauchy–Schwarz) and far less on
    a trajectory that is smooth at the scale of the snapshot spacing; (2) the float32
    rounding of the tracked EMAs themselves (≤ 2e-6, above); (3) the float32 snapshots
    times Σ|c_k| ≈ 2 (≈ 1e-7). 1e-3 is the accuracy that makes a reconstructed EMA as good as
    a tracked one for sampling; the measured errors are 5e-7 to 1e-5. (With white-noise
    parameters the error is the weight error itself: see below.)
    """
    traj, history = run
    err, werr, rec, c = _reconstruction_error(run, 64, sigma_rel)
    assert err <= 1e-3
    assert werr <= 2e-3 and np.sum(np.abs(c)) < 3 and abs(np.sum(c) - 1) < 1e-3
    # The Cauchy–Schwarz bound of part (1), plus the float32 parts.
    snap_steps, snap_sigmas, _ = _snapshots(history, 64)
    delta_w = -pe.profile_weights(T, pe.sigma_rel_to_gamma(sigma_rel))
    for k, (t, s) in enumerate(zip(snap_steps, snap_sigmas, strict=True)):
        delta_w[:t] += c[k] * pe.profile_weights(int(t), pe.sigma_rel_to_gamma(s))
    assert err <= np.linalg.norm(delta_w) * _norm(traj) / _norm(rec) + 5e-6


@pytest.mark.parametrize("sigma_rel", TARGETS)
def test_reconstruction_error_shrinks_with_denser_snapshots(run, sigma_rel):
    """Halving the snapshot spacing K cuts the weight residual about 4x (it is O(K²)) and
    the parameter error more (about 10x here), until float32 rounding (~1e-6) is reached."""
    results = [_reconstruction_error(run, k, sigma_rel) for k in (512, 256, 128, 64)]
    errs, werrs = [r[0] for r in results], [r[1] for r in results]
    assert all(b < a / 2 for a, b in itertools.pairwise(errs)), errs
    assert all(b < a / 3 for a, b in itertools.pairwise(werrs)), werrs


def test_white_noise_parameters_have_the_weight_error():
    """For i.i.d. zero-mean parameters θ_i, E‖Σ δw_i θ_i‖² / E‖Σ w*_i θ_i‖² = ‖δw‖²/‖w*‖²:
    the relative parameter error is the weight error (to ~1/√(number of parameters)), the
    worst case of which smoother trajectories (above) do much better."""
    traj = {"x": np.random.default_rng(2).standard_normal((T, 400)).astype(np.float32)}
    run = (traj, _track(traj, (*TRACKED, 0.15)))
    err, werr, _, _ = _reconstruction_error(run, 128, 0.15)
    assert 0.8 * werr < err < 1.25 * werr


def test_reconstruction_at_an_earlier_step(run):
    """Any snapshot step up to the last is a target as good as the last one. Between two
    snapshots it is not: the target's weights stop at its step, where a narrow profile weighs
    most, and no combination of snapshots taken after it can cut them off there;
    `weight_error` says so."""
    for step in (2048, 3008):
        err, werr, _, _ = _reconstruction_error(run, 64, 0.07, step)
        assert err <= 1e-3 and werr <= 2e-3
    _, werr, _, _ = _reconstruction_error(run, 64, 0.07, 3000)
    assert werr > 0.05


@pytest.mark.parametrize(("sigma_rel", "step"), [(0.05, T), (0.10, T), (0.10, 2048)])
def test_a_tracked_profile_comes_back_from_its_own_snapshot(run, sigma_rel, step):
    history = run[1]
    snap_steps, snap_sigmas, snaps = _snapshots(history, 64)
    c = pe.solve_coefficients(snap_steps, snap_sigmas, sigma_rel, step)
    own = np.flatnonzero((snap_steps == step) & (snap_sigmas == sigma_rel))
    np.testing.assert_allclose(c, np.eye(c.size)[own[0]], atol=1e-8)
    assert pe.weight_error(snap_steps, snap_sigmas, c, sigma_rel, step) < 1e-6
    rec = pe.reconstruct(iter(snaps), c)  # any iterable: a generator loading them one by one
    assert _rel_err(rec, _at(history[sigma_rel], step)) < 1e-6


def test_weight_error_equals_the_direct_norm():
    steps, sig = np.array([30, 60, 90, 30, 60, 90]), np.repeat([0.05, 0.1], 3)
    c = pe.solve_coefficients(steps, sig, 0.15, step=75)
    w = np.zeros(90)
    w[:75] = -pe.profile_weights(75, pe.sigma_rel_to_gamma(0.15))
    for ck, t, s in zip(c, steps, sig, strict=True):
        w[:t] += ck * pe.profile_weights(int(t), pe.sigma_rel_to_gamma(s))
    direct = np.linalg.norm(w) / np.linalg.norm(pe.profile_weights(75, pe.sigma_rel_to_gamma(0.15)))
    assert pe.weight_error(steps, sig, c, 0.15, step=75) == pytest.approx(direct, rel=1e-6)


def test_reconstruct_is_a_float64_weighted_sum():
    a = {"x": np.array([1.0, 2.0], np.float32), "y": (np.float32(3.0),)}
    b = {"x": np.array([1.0 + 2**-20, -1.0], np.float32), "y": (np.float32(-1.0),)}
    out = pe.reconstruct([a, b], [1e4, -1e4 + 1])
    assert out["x"].dtype == np.float32
    # A float32 sum would be off by up to half an ulp of 1e4 (5e-4 of the result here).
    np.testing.assert_allclose(out["x"], [1 + 2**-20 - 1e4 * 2**-20, 2e4 + 9999], rtol=1e-7)
    np.testing.assert_allclose(out["y"][0], 3e4 + 1e4 - 1, rtol=1e-7)
    with pytest.raises(ValueError, match="another structure"):
        pe.reconstruct([a, {"x": a["x"]}], [0.5, 0.5])
    with pytest.raises(ValueError, match="snapshots for"):
        pe.reconstruct([a], [0.5, 0.5])
    with pytest.raises(ValueError, match="More snapshots"):
        pe.reconstruct([a, b], [1.0])
