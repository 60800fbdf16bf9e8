"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", EDM2, section 3 and its appendix on post-hoc EMA): power-function EMAs, their exact
weights, and the least-squares reconstruction of any other EMA length from their snapshots.

A power-function EMA of exponent γ ≥ 0 averages the parameters θ_1..θ_t of the first t
optimizer steps with weights proportional to the profile τ^γ on [0, t]. Its width relative to
the training length, σ_rel = std(τ)/t of the normalised profile (γ+1) τ^γ / t^{γ+1}, is

    σ_rel = √((γ+1) / ((γ+2)² (γ+3)))                      (EDM2, section 3)

and does not change as training goes on. It is tracked by the recursion

    θ̂_t = β(t) θ̂_{t-1} + (1 - β(t)) θ_t,    β(t) = (1 - 1/t)^{γ+1},   t = 1, 2, …

(EDM2, section 3; β(1) = 0: the first update copies the parameters), whose unrolled form is

    θ̂_t = Σ_{i=1}^{t} w_i θ_i,    w_i = (i^{γ+1} - (i-1)^{γ+1}) / t^{γ+1}

(by induction: β(t)/(t-1)^{γ+1} = 1/t^{γ+1} and 1 - β(t) = (t^{γ+1} - (t-1)^{γ+1})/t^{γ+1}).
The discrete weights are exactly the integrals of the continuous profile over the unit cells
[i-1, i], they sum to 1, and they are what `profile_weights` returns.

Post-hoc reconstruction (EDM2, appendix on post-hoc EMA): during training two profiles (EDM2:
σ_rel = 0.05 and 0.10) are saved every few thousand steps. A snapshot k is the average Σ_i
w^(k)_i θ_i of profile γ_k at step t_k, so any combination Σ_k c_k (snapshot k) is the average
with weights Σ_k c_k w^(k). The coefficients that make these weights closest, in least squares
over the steps, to those of a target profile (σ_rel*, t*) solve the normal equations A c = b
with the Gram matrix A_jk = <w^(j), w^(k)> and b_j = <w^(j), w*>. `solve_coefficients` computes
them and `reconstruct` applies them to the snapshots' parameters.

Conventions: steps count optimizer updates from 1 (the train state's `step` after the
update); σ_rel is refused outside (0, 1/√12]: 1/√12 ≈ 0.2887 is the plain average of all
iterates (γ = 0), the widest profile that weights later parameters at least as much as
earlier ones; σ_rel → 0 as γ → ∞. The host-side maths is float64 numpy; the EMA update that
runs in the train step is float32 JAX.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

# σ_rel of γ = 0 (the uniform average of all iterates): the largest σ_rel accepted.
SIGMA_REL_MAX = 1.0 / math.sqrt(12.0)
# How the inner products of the profiles are computed (see `gram_matrix`).
GRAM_METHODS = ("discrete", "continuous")
# Eigenvalues of the unit-diagonal Gram matrix below this fraction of the largest are dropped:
# its entries are known to ~1e-16 relative, so smaller ones are rounding noise. Realistic
# snapshot sets (100-200 per profile) have condition numbers of 1e6-1e8 and lose nothing;
# only snapshots every few steps (1e10 at every 4th of 4096) reach the cut-off.
DEFAULT_RCOND = 1e-12


# --------------------------------------------------------------------------- σ_rel <-> γ


def gamma_to_sigma_rel(gamma: float | np.ndarray) -> float | np.ndarray:
    """σ_rel = √((γ+1) / ((γ+2)² (γ+3))) of a power-function profile (EDM2, section 3).

    Args:
      gamma: the exponent γ ≥ 0 (finite), a float or an array of them.

    Returns:
      σ_rel in (0, `SIGMA_REL_MAX`]: a float for a scalar input, else a float64 numpy array of
      the input's shape.

    Raises:
      ValueError: a γ that is negative, NaN or infinite.
    """
    g = np.asarray(gamma, dtype=np.float64)
    if not np.all(np.isfinite(g)) or np.any(g < 0):
        raise ValueError(
            f"gamma must be finite and >= 0 (gamma = 0 is the uniform average, sigma_rel = "
            f"1/sqrt(12)), got {gamma!r}."
        )
    s = np.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))
    return float(s) if s.ndim == 0 else s


def sigma_rel_to_gamma(sigma_rel: float | np.ndarray) -> float | np.ndarray:
    """The exponent γ ≥ 0 of the power-function profile of relative width σ_rel.

    Squaring and inverting this relation gives the cubic
    γ³ + 7γ² + (16 - s)γ + (12 - s) = 0 with s = σ_rel⁻², whose largest real root is γ (the
    other two lie below 0, on the branch where early parameters weigh more). The root is
    taken from the companion matrix and polished by Newton steps on the cubic, so that
    `gamma_to_sigma_rel(sigma_rel_to_gamma(x))` returns x to float64 rounding.

    Args:
      sigma_rel: the relative standard deviation, in (0, `SIGMA_REL_MAX` = 1/√12 ≈ 0.2887]; a
        float or an array of them.

    Returns:
      γ (≥ 0): a float for a scalar input, else a float64 numpy array of the input's shape.

    Raises:
      ValueError: a σ_rel that is not in (0, 1/√12] (NaN and infinities included).
    """
    s_rel = np.asarray(sigma_rel, dtype=np.float64)
    bad = ~np.isfinite(s_rel) | (s_rel <= 0) | (s_rel > SIGMA_REL_MAX * (1 + 1e-12))
    if np.any(bad):
        raise ValueError(
            f"sigma_rel must lie in (0, 1/sqrt(12) = {SIGMA_REL_MAX:.4f}], got {sigma_rel!r}: "
            "sigma_rel is the profile's width relative to the training length, and "
            f"{SIGMA_REL_MAX:.4f} is already the plain average of every step's parameters "
            "(gamma = 0); EDM2 tracks 0.05 and 0.10."
        )
    out = np.empty(s_rel.shape, dtype=np.float64)
    for idx, x in np.ndenumerate(s_rel):
        s = min(x, SIGMA_REL_MAX) ** -2.0
        coeffs = np.array([1.0, 7.0, 16.0 - s, 12.0 - s])
        g = max(0.0, float(np.max(np.roots(coeffs).real)))
        for _ in range(3):  # Newton on the cubic; its derivative is > 0 right of the root.
            f = ((g + 7.0) * g + 16.0 - s) * g + 12.0 - s
            df = (3.0 * g + 14.0) * g + 16.0 - s
            if df <= 0 or f == 0:
                break
            g = max(0.0, g - f / df)
        out[idx] = g
    return float(out) if out.ndim == 0 else out


# --------------------------------------------------------------------------- tracking


def beta(step: jax.Array | int, gamma: jax.Array | float) -> tuple[jax.Array, jax.Array]:
    """β(t) = (1 - 1/t)^{γ+1} and 1 - β(t) of the update at step t (EDM2, section 3), in float32.

    Both come from a = (γ+1)·log1p(-1/t), as exp(a) and -expm1(a): computing 1 - 1/t first
    would leave 1 - β ≈ (γ+1)/t with a few per cent of error at t ~ 1e6 in float32.

    Args:
      step: t, the number of optimizer updates applied including this one (int or int32
        scalar, may be traced); t ≤ 1 is the first update (β = 0, the EMA becomes a copy).
      gamma: the exponent γ ≥ 0 (float or float32 scalar, may be traced).

    Returns:
      (β, 1 - β): float32 scalars.
    """
    t = jnp.maximum(jnp.asarray(step, jnp.float32), 1.0)
    a = (jnp.asarray(gamma, jnp.float32) + 1.0) * jnp.log1p(-1.0 / t)  # -inf at t = 1
    return jnp.exp(a), -jnp.expm1(a)


def init(params: PyTree) -> PyTree:
    """The value of a power EMA before its first update: a float32 copy of `params`.

    Any value would do (the first update overwrites it); a copy gives the EMA the shapes of
    the parameters and, under `jax.jit` with the parameters' shardings, their layout.
    """
    return jax.tree.map(lambda p: jnp.array(p, dtype=jnp.float32), params)


def update(ema: PyTree, params: PyTree, step: jax.Array | int, gamma: jax.Array | float) -> PyTree:
    """One power-function EMA update, θ̂_t = β(t) θ̂_{t-1} + (1 - β(t)) θ_t (jittable).

    Call it after the optimizer step with the updated parameters and t = the new step count
    (`state.step + 1` where `state.step` counts the updates before this one).

    Args:
      ema: θ̂_{t-1}, a pytree of float32 arrays (ignored at t = 1).
      params: θ_t, the parameters after update t, a pytree of the same structure and shapes
        (any float dtype; used in float32).
      step: t ≥ 1 (int or int32 scalar, may be traced).
      gamma: the profile's exponent γ ≥ 0 (`sigma_rel_to_gamma`), float or traced scalar.

    Returns:
      θ̂_t: a pytree of float32 arrays like `ema`, elementwise, so it keeps any sharding.
    """
    b, one_minus_b = beta(step, gamma)
    # β = 0 exactly at t = 1, so the first update is an exact copy of the parameters.
    return jax.tree.map(
        lambda e, p: b * e.astype(jnp.float32) + one_minus_b * p.astype(jnp.float32),
        ema,
        params,
    )


def update_profiles(
    emas: Sequence[PyTree],
    params: PyTree,
    step: jax.Array | int,
    gammas: Sequence[float],
) -> tuple[PyTree, ...]:
    """`update` of several profiles at once: one EMA pytree per γ (jittable).

    Args:
      emas: one float32 pytree like `params` per profile.
      params: θ_t, the parameters after update t.
      step: t ≥ 1.
      gammas: the profiles' exponents, as many as `emas`.

    Returns:
      A tuple of the updated EMA pytrees, in the order of `gammas`.
    """
    if len(emas) != len(gammas):
        raise ValueError(f"{len(emas)} EMA pytrees for {len(gammas)} gammas.")
    return tuple(update(e, params, step, g) for e, g in zip(emas, gammas, strict=True))


def profile_weights(step: int, gamma: float) -> np.ndarray:
    """The weights w_1..w_t that the EMA of exponent γ puts on θ_1..θ_t after t updates.

    w_i = (i^{γ+1} - (i-1)^{γ+1}) / t^{γ+1}, computed as (i/t)^{γ+1} (1 - (1 - 1/i)^{γ+1}) to
    avoid overflow and cancellation for large γ and t.

    Args:
      step: t ≥ 1.
      gamma: γ ≥ 0.

    Returns:
      float64 numpy array [t], nonnegative, summing to 1 (entry i-1 is the weight of θ_i).
    """
    t = _check_steps([step], "step")[0]
    a = float(gamma) + 1.0
    i = np.arange(1, t + 1, dtype=np.float64)
    return np.exp(a * np.log(i / t)) * _cell_factor(i, a)


def _cell_factor(i: np.ndarray, a: float) -> np.ndarray:
    """1 - (1 - 1/i)^a for i = 1, 2, … (1 at i = 1), float64 without cancellation."""
    with np.errstate(divide="ignore"):
        return -np.expm1(a * np.log1p(-1.0 / i))


# --------------------------------------------------------------------------- reconstruction


def gram_matrix(
    steps: Sequence[int], gammas: Sequence[float], *, method: str = "discrete"
) -> np.ndarray:
    """Inner products <w^(j), w^(k)> of the weights of profiles (t_j, γ_j) over the steps.

    "discrete" (the default) sums Σ_i w^(j)_i w^(k)_i over the steps exactly, in float64:
    the discrete EMA is exactly Σ_i w_i θ_i, so this is the least-squares problem of the
    parameters actually averaged. The weights of profile (t, γ) on the steps up to τ ≤ t are
    (τ/t)^{γ+1} times those of (τ, γ) there; so with the distinct steps τ_1 < … < τ_S of
    all profiles, each segment (τ_{s-1}, τ_s] needs the products of the (τ_s, γ) weights once
    per pair of distinct exponents (a BLAS product of a few rows), and entry (j, k) sums them
    over the segments before min(t_j, t_k), scaled by (τ_s/t_j)^{γ_j+1} (τ_s/t_k)^{γ_k+1} ≤ 1
    (no overflow for any γ). The cost is O(P·T) time and float64 memory for P distinct
    exponents and T = max(steps) (24 MB for P = 3, T = 1e6), plus O(S·N²): about 0.1 s on one
    CPU core for T = 1e6 and N = 200 profiles.

    "continuous" is EDM2's closed form for the profiles as functions of time,
    ∫_0^{min} f_j f_k dτ = (a_j a_k / (a_j + a_k - 1)) (m/t_j)^{a_j} (m/t_k)^{a_k} / m with
    a = γ+1 and m = min(t_j, t_k): O(N²), but it treats the weights as point samples of the
    profile where they are its integrals over unit cells, an error of relative order
    (γ/t)² that matters for early snapshots and large γ.

    Args:
      steps: t_k ≥ 1 of each profile (ints), [N].
      gammas: γ_k ≥ 0 of each profile, [N].
      method: one of `GRAM_METHODS`.

    Returns:
      float64 numpy array [N, N], symmetric positive semi-definite.
    """
    t = _check_steps(steps, "steps")
    g = np.asarray(gammas, dtype=np.float64)
    if g.shape != t.shape:
        raise ValueError(f"{t.size} steps for {g.size} gammas.")
    gamma_to_sigma_rel(g)  # validates γ ≥ 0
    a = g + 1.0
    if method == "continuous":
        tf = t.astype(np.float64)
        m = np.minimum(tf[:, None], tf[None, :])
        return (
            a[:, None] * a[None, :] / (a[:, None] + a[None, :] - 1.0)
            * (m / tf[:, None]) ** a[:, None] * (m / tf[None, :]) ** a[None, :] / m
        )  # fmt: skip
    if method != "discrete":
        raise ValueError(f"Unknown method {method!r}; expected one of {GRAM_METHODS}.")
    exps, which = np.unique(a, return_inverse=True)  # P distinct exponents, profile -> index
    ends = np.unique(t)  # the segment ends τ_1 < … < τ_S
    i_all = np.arange(1, int(ends[-1]) + 1, dtype=np.float64)
    cell = np.stack([_cell_factor(i_all, e) for e in exps])  # [P, T]
    seg_grams = np.empty((ends.size, exps.size, exps.size))  # [S, P, P]
    start = 0
    for s, end in enumerate(ends):
        i = i_all[start:end]
        seg = np.exp(exps[:, None] * np.log(i / end)[None, :]) * cell[:, start:end]  # [P, L]
        seg_grams[s] = seg @ seg.T
        start = int(end)
    # R[s, n] = (τ_s/t_n)^{a_n} while profile n runs (τ_s ≤ t_n), 0 after it ended.
    ratio = ends[:, None].astype(np.float64) / t[None, :].astype(np.float64)
    with np.errstate(divide="ignore"):
        R = np.where(ratio <= 1.0, np.exp(a[None, :] * np.log(ratio)), 0.0)  # [S, N]
    gram = np.empty((t.size, t.size))
    members = [np.flatnonzero(which == p) for p in range(exps.size)]
    for p, rows in enumerate(members):
        for q, cols in enumerate(members):
            gram[np.ix_(rows, cols)] = R[:, rows].T @ (seg_grams[:, p, q, None] * R[:, cols])
    return gram


def solve_coefficients(
    snapshot_steps: Sequence[int],
    snapshot_sigma_rels: Sequence[float],
    sigma_rel: float,
    step: int | None = None,
    *,
    method: str = "discrete",
    rcond: float = DEFAULT_RCOND,
) -> np.ndarray:
    """Coefficients c_k with Σ_k c_k (snapshot k) ≈ the EMA of width `sigma_rel` at `step`.

    The least squares of EDM2 (appendix on post-hoc EMA): c minimises Σ_i (Σ_k c_k w^(k)_i -
    w*_i)² over the steps i, where w^(k) are the weights of snapshot k (`profile_weights`) and
    w* those of the target. The normal equations A c = b (`gram_matrix`) are solved after
    scaling A to a unit diagonal, by its eigendecomposition with the eigenvalues below `rcond`
    times the largest dropped (the minimum-norm least-squares solution), so that dense, nearly
    collinear snapshots do not give huge coefficients of opposite signs.

    Targets are best at a snapshot step (the last one by default): between two snapshot
    steps the target's weights stop where a narrow profile weighs most, and no combination of
    the snapshots can cut them off there (`weight_error` is then of order 0.1).

    Args:
      snapshot_steps: t_k ≥ 1, the step of each snapshot (ints), [K].
      snapshot_sigma_rels: σ_rel of the profile each snapshot holds, [K].
      sigma_rel: the target σ_rel, in (0, `SIGMA_REL_MAX`].
      step: the target step, 1 ≤ step ≤ max(snapshot_steps); default the last snapshot's.
      method: how the inner products are computed (`gram_matrix`); "discrete" is exact.
      rcond: the relative eigenvalue cut-off (see `DEFAULT_RCOND`).

    Returns:
      float64 numpy array [K], in the order of the snapshots.

    Raises:
      ValueError: a σ_rel outside (0, 1/√12], a step < 1, a target step after the last
        snapshot, or lengths that differ.
    """
    steps, gammas, target_step = _problem(snapshot_steps, snapshot_sigma_rels, step)
    g_target = sigma_rel_to_gamma(sigma_rel)
    full = gram_matrix(np.append(steps, target_step), np.append(gammas, g_target), method=method)
    A, b = full[:-1, :-1], full[:-1, -1]
    d = 1.0 / np.sqrt(np.diag(A))
    lam, V = np.linalg.eigh(A * d[:, None] * d[None, :])
    keep = lam > rcond * lam[-1]
    x = V[:, keep] @ ((V[:, keep].T @ (b * d)) / lam[keep])
    return x * d


def weight_error(
    snapshot_steps: Sequence[int],
    snapshot_sigma_rels: Sequence[float],
    coefficients: np.ndarray,
    sigma_rel: float,
    step: int | None = None,
) -> float:
    """Relative L2 error ‖Σ_k c_k w^(k) - w*‖ / ‖w*‖ of reconstructed weights, exactly.

    From the exact discrete Gram matrix: (cᵀAc - 2cᵀb + w*ᵀw*) / w*ᵀw*, which float64 gives
    down to errors of about 1e-7 (its square is a difference of numbers of order one).

    Args:
      snapshot_steps, snapshot_sigma_rels, sigma_rel, step: as in `solve_coefficients`.
      coefficients: c_k, [K].

    Returns:
      The relative error of the weights, a float ≥ 0.
    """
    steps, gammas, target_step = _problem(snapshot_steps, snapshot_sigma_rels, step)
    c = np.asarray(coefficients, dtype=np.float64)
    if c.shape != steps.shape:
        raise ValueError(f"{c.size} coefficients for {steps.size} snapshots.")
    full = gram_matrix(
        np.append(steps, target_step), np.append(gammas, sigma_rel_to_gamma(sigma_rel))
    )
    A, b, tt = full[:-1, :-1], full[:-1, -1], full[-1, -1]
    return math.sqrt(max(float(c @ A @ c - 2.0 * c @ b + tt), 0.0) / tt)


def reconstruct(snapshots: Iterable[PyTree], coefficients: Sequence[float]) -> PyTree:
    """Σ_k c_k snapshot_k, accumulated in float64 on the host, returned in the snapshots' dtype.

    The snapshots are consumed one at a time (pass a generator that loads each from disk to
    hold only one in memory besides the float64 sum). Float64 accumulation leaves only the
    snapshots' own float32 rounding, amplified by Σ_k |c_k|, as error. The sum is
    elementwise, so on a sharded model it can run shard by shard with the same coefficients.

    Args:
      snapshots: K pytrees of the same structure and shapes (numpy or addressable
        `jax.Array` leaves, any float dtype).
      coefficients: c_k, [K] (`solve_coefficients`).

    Returns:
      A pytree of numpy arrays like the first snapshot (its leaves' dtypes).

    Raises:
      ValueError: a snapshot of another structure or shape, or K ≠ len(coefficients).
    """
    c = np.asarray(coefficients, dtype=np.float64).reshape(-1)
    total, treedef, dtypes, count = None, None, None, 0
    for k, snap in enumerate(snapshots):
        if k >= c.size:
            raise ValueError(f"More snapshots than the {c.size} coefficients.")
        leaves, tdef = jax.tree.flatten(snap)
        arrays = [np.asarray(x) for x in leaves]
        if total is None:
            treedef, dtypes = tdef, [x.dtype for x in arrays]
            total = [np.zeros(x.shape, np.float64) for x in arrays]
        elif tdef != treedef or any(x.shape != s.shape for x, s in zip(arrays, total, strict=True)):
            raise ValueError(f"Snapshot {k} has another structure or other shapes than snapshot 0.")
        for s, x in zip(total, arrays, strict=True):
            s += c[k] * x.astype(np.float64)
        count += 1
    if count != c.size:
        raise ValueError(f"{count} snapshots for {c.size} coefficients.")
    return jax.tree.unflatten(treedef, [s.astype(d) for s, d in zip(total, dtypes, strict=True)])


# --------------------------------------------------------------------------- checks


def _check_steps(steps: Sequence[int], name: str) -> np.ndarray:
    t = np.asarray(steps)
    if t.ndim != 1 or t.size == 0 or not np.issubdtype(t.dtype, np.integer) or np.any(t < 1):
        raise ValueError(f"{name} must be integers >= 1 (optimizer updates), got {steps!r}.")
    return t.astype(np.int64)


def _problem(
    snapshot_steps: Sequence[int], snapshot_sigma_rels: Sequence[float], step: int | None
) -> tuple[np.ndarray, np.ndarray, int]:
    steps = _check_steps(snapshot_steps, "snapshot_steps")
    sig = np.asarray(snapshot_sigma_rels, dtype=np.float64).reshape(-1)
    if sig.shape != steps.shape:
        raise ValueError(f"{steps.size} snapshot steps for {sig.size} snapshot sigma_rels.")
    gammas = np.asarray(sigma_rel_to_gamma(sig), dtype=np.float64).reshape(-1)
    last = int(steps.max())
    target = last if step is None else int(_check_steps([step], "step")[0])
    if target > last:
        raise ValueError(
            f"The target step {target} is after the last snapshot (step {last}): the "
            "snapshots hold nothing of the parameters after it."
        )
    return steps, gammas, target
