"""Reverse-process samplers, each compiled as one `lax.scan` over timesteps.

Samplers:
  "ancestral": the reverse chain of Ho et al., x_{t-1} ~ p_θ(x_{t-1}|x_t) = N(μ_θ, σ_t² I).
  "ddim": Song et al.'s non-Markovian chain, x_{t'} = sqrt(ᾱ_{t'}) x̂_0 + sqrt(1 - ᾱ_{t'} - σ²) ε̂
    + σ z with σ² = η² σ_q², deterministic at η = 0 and distributed as "ancestral" with the
    "fixedsmall" variance at η = 1.
Both run over all T steps or over a strided subset of K of them (Nichol & Dhariwal's
respacing: the kept steps keep their ᾱ, and β is recomputed from it), calling `model_fn` with
the original timestep indices.

The whole chain is one `lax.scan`: `model_fn` is traced once whatever the number of steps, no
value goes back to the host between steps, shapes are static, and the noise of each step is
`jax.random.normal(jax.random.fold_in(key, t), shape)` at original timestep t. A jitted
`sample` therefore compiles once and partitions like any other array program (pass
`out_shardings` to `jax.jit` to shard the batch).

Conventions (DESIGN.md): timesteps are integers t ∈ {0, …, T-1}, index t being the paper's
step t+1; `model_fn(x_t, t) -> prediction` takes x_t float32 [B, ...] and t int32 [B].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion, schedules

SAMPLERS = ("ancestral", "ddim")

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


class Trajectory(NamedTuple):
    """Samples and the chain's x̂_0 predictions every few steps (`return_trajectory_every`).

    Attributes:
      samples: float32 [*shape], in [-1, 1].
      pred_x0: float32 [F, *shape], x̂_0 at the recorded steps, noisiest first; the last frame
        is the prediction of the final step (t = `timesteps[-1]`).
      timesteps: int32 [F], the original timestep at which each frame was predicted.
    """

    samples: jax.Array
    pred_x0: jax.Array
    timesteps: jax.Array


# --------------------------------------------------------------------------- timesteps


def spaced_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """K evenly spaced timesteps of a T-step chain, always keeping the first and the last.

    t_i = round(i (T - 1)/(K - 1)) for i = 0..K-1 (Nichol & Dhariwal's even spacing); with
    K = 1 the single step is T - 1, so that the chain still starts from pure noise.

    Args:
      num_timesteps: T of the full chain.
      num_steps: K, in [1, T].

    Returns:
      int64 numpy array [K], strictly increasing, from 0 (K > 1) to T - 1.
    """
    if not isinstance(num_steps, int | np.integer) or isinstance(num_steps, bool):
        raise ValueError(f"num_steps must be an integer or None, got {num_steps!r}.")
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(
            f"num_steps must lie in [1, T] = [1, {num_timesteps}], got {num_steps}; pass "
            "num_steps=None for all T steps."
        )
    if num_steps == 1:
        return np.array([num_timesteps - 1])
    # floor(x + 0.5), not np.round: round-half-to-even can merge neighbours.
    return np.floor(np.linspace(0, num_timesteps - 1, num_steps) + 0.5).astype(np.int64)


def _check_timesteps(timesteps, num_timesteps: int) -> np.ndarray:
    if isinstance(timesteps, jax.core.Tracer):
        raise ValueError("timesteps must be concrete (a list or numpy array), not traced.")
    ts = np.asarray(timesteps)
    if ts.ndim != 1 or ts.size == 0 or not np.issubdtype(ts.dtype, np.integer):
        raise ValueError(
            f"timesteps must be a non-empty 1-D sequence of integers, got {timesteps!r}."
        )
    if ts[0] < 0 or ts[-1] >= num_timesteps or np.any(np.diff(ts) <= 0):
        raise ValueError(
            f"timesteps must be strictly increasing within [0, T) = [0, {num_timesteps}), "
            f"got {ts.tolist()}."
        )
    return ts.astype(np.int64)


def respaced_schedule(sched: schedules.Schedule, timesteps) -> schedules.Schedule:
    """The schedule of the chain that visits only `timesteps` (Nichol & Dhariwal).

    The respaced chain keeps ᾱ at the kept steps and recomputes β'_i = 1 - ᾱ_{t_i}/ᾱ_{t_{i-1}}
    (`schedules.respace_betas`); every other coefficient follows from β' (`make_schedule`).
    ᾱ is recomputed in float64 from the stored β rather than taken from the float32 ᾱ, whose
    ratios lose digits when neighbouring steps are close. When `timesteps` is every step,
    `sched` itself is returned, so that the respaced chain is the original one bit for bit.

    Args:
      sched: the full schedule, with concrete (not traced) arrays.
      timesteps: strictly increasing integers in [0, T), shape [K].

    Returns:
      A `Schedule` of length K whose index i stands for original timestep `timesteps[i]`.
    """
    T = sched.num_timesteps
    ts = _check_timesteps(timesteps, T)
    if ts.size == T:  # strictly increasing in [0, T): every step.
        return sched
    if isinstance(sched.betas, jax.core.Tracer):
        raise ValueError(
            "Respacing needs a concrete schedule, but sched is traced; close over sched "
            "instead of passing it as an argument of the jitted function."
        )
    ac = np.cumprod(1.0 - np.asarray(sched.betas, dtype=np.float64))
    return schedules.make_schedule(schedules.respace_betas(ac, ts))


def _resolve_steps(
    sched: schedules.Schedule, num_steps: int | None, timesteps
) -> tuple[schedules.Schedule, np.ndarray]:
    T = sched.num_timesteps
    if num_steps is not None and timesteps is not None:
        raise ValueError("Pass num_steps or timesteps, not both.")
    if timesteps is not None:
        ts = _check_timesteps(timesteps, T)
    elif num_steps is not None:
        ts = spaced_timesteps(T, num_steps)
    else:
        ts = np.arange(T)
    return respaced_schedule(sched, ts), ts


# --------------------------------------------------------------------------- validation


def _check_shape(shape) -> tuple[int, ...]:
    if (
        not isinstance(shape, tuple | list)
        or len(shape) == 0
        or not all(isinstance(s, int | np.integer) and not isinstance(s, bool) for s in shape)
        or any(s < 1 for s in shape)
    ):
        raise ValueError(
            f"shape must be a non-empty tuple of positive ints [B, ...] (e.g. (16, 32, 32, 3)), "
            f"got {shape!r}."
        )
    return tuple(int(s) for s in shape)


def _check_choice(value: str, allowed: tuple[str, ...], name: str) -> None:
    if value not in allowed:
        raise ValueError(f"Unknown {name} {value!r}; expected one of {allowed}.")


# --------------------------------------------------------------------------- one reverse step


def _vec(v: jax.Array, batch: int) -> jax.Array:
    return jnp.full((batch,), v, dtype=jnp.int32)


def _ancestral_step(model_fn, sub, x, i, t, key, *, parameterization, variance, clip_denoised):
    """x at respaced index i (original timestep t) -> x at index i - 1, and x̂_0."""
    out = model_fn(x, _vec(t, x.shape[0])).astype(x.dtype)
    p = diffusion.p_mean_variance(
        sub,
        out,
        x,
        _vec(i, x.shape[0]),
        parameterization=parameterization,
        variance=variance,
        clip_denoised=clip_denoised,
    )
    z = jax.random.normal(jax.random.fold_in(key, t), x.shape, x.dtype)
    # No noise at the last step: x_0 is the mean, which is x̂_0 there (coef1 = 1, coef2 = 0).
    return p.mean + jnp.where(i > 0, jnp.exp(0.5 * p.log_variance), 0.0) * z, p.pred_x0


def _ddim_step(model_fn, sub, x, i, t, key, *, parameterization, clip_denoised, eta):
    """DDIM from respaced index i (original timestep t) to index i - 1, and x̂_0."""
    i_vec = _vec(i, x.shape[0])
    out = model_fn(x, _vec(t, x.shape[0])).astype(x.dtype)
    pred_x0 = diffusion.prediction_to_x0(sub, x, i_vec, out, parameterization)
    if clip_denoised:
        pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
    eps = diffusion.eps_from_x0(sub, x, i_vec, pred_x0)  # ε̂ consistent with the clipped x̂_0.
    ac_prev = sub.alphas_cumprod_prev[i]
    # 1 - ᾱ_prev from the float64-derived sqrt(1 - ᾱ): 1 - ᾱ in float32 loses digits near ᾱ = 1.
    one_minus_prev = jnp.where(i > 0, sub.sqrt_one_minus_alphas_cumprod[jnp.maximum(i - 1, 0)], 0.0)
    one_minus_prev = jnp.square(one_minus_prev)
    x_prev = jnp.sqrt(ac_prev) * pred_x0
    if eta == 0.0:
        return x_prev + jnp.sqrt(one_minus_prev) * eps, pred_x0
    # σ² = η² (1-ᾱ_prev)/(1-ᾱ_t) (1 - ᾱ_t/ᾱ_prev) = η² σ_q² (the "fixedsmall" variance, 0 at i=0).
    sigma2 = eta**2 * diffusion.model_variance(sub, i_vec, x, "fixedsmall")[0]
    z = jax.random.normal(jax.random.fold_in(key, t), x.shape, x.dtype)
    x_prev = x_prev + jnp.sqrt(jnp.maximum(one_minus_prev - sigma2, 0.0)) * eps
    return x_prev + jnp.sqrt(sigma2) * z, pred_x0


# --------------------------------------------------------------------------- samplers


def sample(
    model_fn: ModelFn,
    sched: schedules.Schedule,
    shape: Sequence[int],
    key: jax.Array,
    *,
    parameterization: str = "x0",
    variance: str = "fixedlarge",
    clip_denoised: bool = True,
    sampler: str = "ancestral",
    num_steps: int | None = None,
    timesteps: Sequence[int] | np.ndarray | None = None,
    eta: float = 0.0,
    x_T: jax.Array | None = None,
    return_trajectory_every: int = 0,
) -> jax.Array | Trajectory:
    """Draws samples by running the reverse chain from x_T ~ N(0, I), as one `lax.scan`.

    For each kept timestep t, from the last to the first: out = model_fn(x_t, t), x̂_0 from out
    (clipped to [-1, 1] if `clip_denoised`), then the sampler's update. Ancestral sampling uses
    `diffusion.p_mean_variance`: x_{t-1} = μ_θ + σ_t z, with no noise at the final step, whose
    mean is x̂_0 itself. Randomness: x_T = normal(fold_in(key, T)) and the noise z of the step
    at original timestep t is normal(fold_in(key, t)), each of `shape`, float32; a Python loop
    with these keys reproduces the chain.

    Jit it by closing over `model_fn`, `sched` and the keywords, e.g.
    `jax.jit(lambda params, key: sample(make_model_fn(params), sched, shape, key))`;
    `sched` may also be a traced argument when every step is used (no respacing).

    Args:
      model_fn: `model_fn(x_t, t) -> prediction`, x_t float32 [B, ...], t int32 [B] (original
        timesteps, also when respaced); the prediction has x_t's shape.
      sched: the schedule of the full T-step chain the model was trained with.
      shape: static output shape (B, ...), e.g. (B, H, W, C).
      key: PRNG key.
      parameterization: what the model predicts: "x0" (default, DESIGN.md), "eps" or "v".
      variance: ancestral step variance: "fixedlarge" (default; σ_t² = β_t, Ho et al.'s
        choice for CIFAR-10) or "fixedsmall" (σ_t² = σ_q²). Unused by "ddim".
      clip_denoised: clip x̂_0 to [-1, 1] at every step (default True). The returned samples
        are clipped to [-1, 1] in any case.
      sampler: "ancestral" (default) or "ddim".
      num_steps: K evenly spaced steps (`spaced_timesteps`), in [1, T]; None (default): all T.
      timesteps: explicit strictly increasing original timesteps to visit, instead of
        num_steps. The chain starts at the last one: include T - 1 to start from pure noise.
      eta: DDIM's η >= 0 (0: deterministic); "ddim" only.
      x_T: optional starting point of `shape` (e.g. from `ddim_invert`) instead of drawing it.
      return_trajectory_every: k > 0 also returns x̂_0 every k steps, counted back from the
        final step (which is always recorded); 0 (default) returns the samples alone.

    Returns:
      float32 [*shape] samples in [-1, 1]; a `Trajectory` if `return_trajectory_every` > 0.

    Raises:
      ValueError: unknown sampler/parameterization/variance, bad shape, num_steps outside
        [1, T], bad timesteps, eta < 0 or eta != 0 for "ancestral", x_T of the wrong shape.
    """
    _check_choice(sampler, SAMPLERS, "sampler")
    _check_choice(parameterization, diffusion.PARAMETERIZATIONS, "parameterization")
    _check_choice(variance, diffusion.VARIANCES, "variance")
    shape = _check_shape(shape)
    if not isinstance(eta, int | float) or isinstance(eta, bool) or not eta >= 0.0:
        raise ValueError(f"eta must be a number >= 0, got {eta!r}.")
    if eta != 0.0 and sampler != "ddim":
        raise ValueError(f"eta={eta} applies to sampler='ddim' only; got sampler={sampler!r}.")
    every = return_trajectory_every
    if not isinstance(every, int | np.integer) or isinstance(every, bool) or every < 0:
        raise ValueError(f"return_trajectory_every must be an int >= 0, got {every!r}.")
    sub, ts = _resolve_steps(sched, num_steps, timesteps)
    T, K = sched.num_timesteps, ts.size

    if x_T is None:
        x_T = jax.random.normal(jax.random.fold_in(key, T), shape, jnp.float32)
    elif tuple(x_T.shape) != shape:
        raise ValueError(f"x_T must have shape {shape}, got {tuple(x_T.shape)}.")
    x_T = jnp.asarray(x_T, jnp.float32)

    if sampler == "ancestral":

        def step(x, i, t):
            return _ancestral_step(
                model_fn,
                sub,
                x,
                i,
                t,
                key,
                parameterization=parameterization,
                variance=variance,
                clip_denoised=clip_denoised,
            )

    else:

        def step(x, i, t):
            return _ddim_step(
                model_fn,
                sub,
                x,
                i,
                t,
                key,
                parameterization=parameterization,
                clip_denoised=clip_denoised,
                eta=float(eta),
            )

    num_frames = (K - 1) // every + 1 if every else 0

    def body(carry, it):
        x, frames = carry
        i, t = it
        x, pred_x0 = step(x, i, t)
        if every:
            # Frame f holds the step i = (F - 1 - f)·k; other steps write frame f back unchanged.
            f = jnp.clip(num_frames - 1 - i // every, 0, num_frames - 1)
            new = jnp.where(i % every == 0, pred_x0, frames[f])
            frames = jax.lax.dynamic_update_index_in_dim(frames, new, f, 0)
        return (x, frames), None

    frames = jnp.zeros((num_frames, *shape), jnp.float32) if every else None
    steps = (jnp.arange(K - 1, -1, -1, dtype=jnp.int32), jnp.asarray(ts[::-1], jnp.int32))
    (x, frames), _ = jax.lax.scan(body, (x_T, frames), steps)
    samples = jnp.clip(x, -1.0, 1.0)
    if not every:
        return samples
    frame_ts = ts[np.arange(num_frames - 1, -1, -1) * every]
    return Trajectory(samples, frames, jnp.asarray(frame_ts, jnp.int32))


def ddim_invert(
    model_fn: ModelFn,
    sched: schedules.Schedule,
    x0: jax.Array,
    *,
    parameterization: str = "x0",
    clip_denoised: bool = False,
    num_steps: int | None = None,
    timesteps: Sequence[int] | np.ndarray | None = None,
    fixed_point_iters: int = 0,
) -> jax.Array:
    """Encodes data to a DDIM latent by running the deterministic (η = 0) chain forwards.

    DDIM at η = 0 is the Euler discretisation of an ODE in (x/sqrt(ᾱ), sqrt((1-ᾱ)/ᾱ)); this
    runs it from ᾱ = 1 (the data) up through the kept timesteps. The step to timestep t_i
    evaluates the model at the current, less noisy, point with the label t_i (the only choice
    at the first step, where no model exists for the data itself):
    x_{t_i} = sqrt(ᾱ_{t_i}) (x - sqrt(1 - ᾱ_prev) ε̂)/sqrt(ᾱ_prev) + sqrt(1 - ᾱ_{t_i}) ε̂.
    `sample(..., sampler="ddim", eta=0.0, x_T=latent)` over the same steps decodes it back,
    with an error that shrinks as the number of steps grows.

    The decoder's step from t_i evaluates the model at x_{t_i} itself, so the exact inverse
    solves x_{t_i} = step(ε̂(x_{t_i}, t_i)); `fixed_point_iters` > 0 refines the Euler guess by
    that many fixed-point iterations (one more model call each), which makes the
    reconstruction near exact when the steps are small enough for the iteration to contract.

    Args:
      model_fn: `model_fn(x_t, t) -> prediction`, as in `sample`.
      sched: the schedule of the full chain.
      x0: data, float [B, ...].
      parameterization: "x0", "eps" or "v".
      clip_denoised: clip x̂_0 to [-1, 1] before forming ε̂ (default False: clipping breaks
        the invertibility of the map).
      num_steps, timesteps: the steps to visit, as in `sample` (default: all T).
      fixed_point_iters: fixed-point refinements per step (default 0: plain DDIM inversion).

    Returns:
      The latent at the last kept timestep, float32 of x0's shape (not clipped).
    """
    _check_choice(parameterization, diffusion.PARAMETERIZATIONS, "parameterization")
    if (
        not isinstance(fixed_point_iters, int | np.integer)
        or isinstance(fixed_point_iters, bool)
        or fixed_point_iters < 0
    ):
        raise ValueError(f"fixed_point_iters must be an int >= 0, got {fixed_point_iters!r}.")
    if x0.ndim < 1:
        raise ValueError(f"x0 must have a batch dimension [B, ...], got shape {x0.shape}.")
    sub, ts = _resolve_steps(sched, num_steps, timesteps)
    x0 = jnp.asarray(x0, jnp.float32)

    def body(x, it):
        i, t = it
        i_vec, t_vec = _vec(i, x.shape[0]), _vec(t, x.shape[0])
        prev = jnp.maximum(i - 1, 0)
        std_prev = jnp.where(i > 0, sub.sqrt_one_minus_alphas_cumprod[prev], 0.0)
        ac_prev = sub.alphas_cumprod_prev[i]

        def eps_at(y):  # ε̂ of the model at y, labelled with the target timestep t.
            out = model_fn(y, t_vec).astype(y.dtype)
            pred_x0 = diffusion.prediction_to_x0(sub, y, i_vec, out, parameterization)
            if clip_denoised:
                pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
            return diffusion.eps_from_x0(sub, y, i_vec, pred_x0)

        def step(eps):
            # x̂_0 implied by the current point at the previous level (ᾱ_prev = 1 at the data).
            x0_prev = (x - std_prev * eps) / jnp.sqrt(ac_prev)
            return sub.sqrt_alphas_cumprod[i] * x0_prev + sub.sqrt_one_minus_alphas_cumprod[i] * eps

        x_next = step(eps_at(x))
        if fixed_point_iters:
            x_next = jax.lax.fori_loop(0, fixed_point_iters, lambda _, y: step(eps_at(y)), x_next)
        return x_next, None

    steps = (jnp.arange(ts.size, dtype=jnp.int32), jnp.asarray(ts, jnp.int32))
    x_T, _ = jax.lax.scan(body, x0, steps)
    return x_T


def guided_model_fn(model_fn_cond: ModelFn, model_fn_uncond: ModelFn, scale: float) -> ModelFn:
    """Classifier-free guidance: `uncond + scale · (cond - uncond)` (Ho & Salimans).

    scale = 1 is the conditional model, 0 the unconditional one, > 1 sharpens towards the
    condition. The weights (1 - scale, scale) sum to one and x̂_0, ε̂ and v̂ are affine in one
    another at fixed (x_t, t), so the guided prediction implies the same x̂_0 whichever of
    the three the models predict.

    Args:
      model_fn_cond: `model_fn(x_t, t)` with the condition (e.g. class labels) closed over.
      model_fn_uncond: the same model with the condition dropped.
      scale: guidance scale w.

    Returns:
      A `model_fn(x_t, t)` for `sample`.
    """

    def model_fn(x_t: jax.Array, t: jax.Array) -> jax.Array:
        uncond = model_fn_uncond(x_t, t)
        return uncond + scale * (model_fn_cond(x_t, t) - uncond)

    return model_fn
