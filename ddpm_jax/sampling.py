"""Reverse-process samplers, each compiled as one `lax.scan` over timesteps.

Samplers:
  "ancestral": the reverse chain of Ho et al., x_{t-1} ~ p_θ(x_{t-1}|x_t) = N(μ_θ, σ_t² I).
  "ddim": Song et al.'s non-Markovian chain, x_{t'} = sqrt(ᾱ_{t'}) x̂_0 + sqrt(1 - ᾱ_{t'} - σ²) ε̂
    + σ z with σ² = η² σ_q², deterministic at η = 0 and distributed as "ancestral" with the
    "fixedsmall" variance at η = 1.
  "dpm_solver++", "unipc": multistep solvers of the probability-flow ODE of order 1-3
    (`ddpm_jax.solvers`), deterministic, one network call per step, for 10-20 step chains.
All run over all T steps or over a subset of K of them (Nichol & Dhariwal's respacing: the kept
steps keep their ᾱ, and β is recomputed from it), calling `model_fn` with the original
timestep indices.

The whole chain is one `lax.scan`: `model_fn` is traced once whatever the number of steps, no
value goes back to the host between steps, shapes are static, and the noise of each step is
`jax.random.normal(jax.random.fold_in(key, t), shape)` at original timestep t. A jitted
`sample` therefore compiles once and partitions like any other array program (pass
`out_shardings` to `jax.jit` to shard the batch). `reverse_chain` returns the same chain as a
`ReverseChain` that also runs in segments (one jitted call each, e.g. to show progress) with
the same result. Which timesteps a chain visits is `ddpm_jax.timesteps`' job.

Conventions: timesteps are integers t ∈ {0, …, T-1}, index t being the paper's step t+1;
`model_fn(x_t, t) -> prediction` takes x_t float32 [B, ...] and t int32 [B]. DDIM inversion
(data -> latent) is `ddpm_jax.inversion.ddim_invert`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion, schedules, solvers
from ddpm_jax._base import ModelFn, check_choice, timestep_vector
from ddpm_jax.timesteps import resolve_steps

__all__ = [
    "SAMPLERS",
    "ChainState",
    "ReverseChain",
    "Trajectory",
    "guided_model_fn",
    "reverse_chain",
    "sample",
]

SAMPLERS = ("ancestral", "ddim", *solvers.SOLVERS)


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


# --------------------------------------------------------------------------- one reverse step


def _ancestral_step(model_fn, sub, x, i, t, key, *, parameterization, variance, clip_denoised):
    """x at respaced index i (original timestep t) -> x at index i - 1, and x̂_0."""
    out = model_fn(x, timestep_vector(t, x.shape[0])).astype(x.dtype)
    p = diffusion.p_mean_variance(
        sub,
        out,
        x,
        timestep_vector(i, x.shape[0]),
        parameterization=parameterization,
        variance=variance,
        clip_denoised=clip_denoised,
    )
    z = jax.random.normal(jax.random.fold_in(key, t), x.shape, x.dtype)
    # No noise at the last step: x_0 is the mean, which is x̂_0 there (coef1 = 1, coef2 = 0).
    return p.mean + jnp.where(i > 0, jnp.exp(0.5 * p.log_variance), 0.0) * z, p.pred_x0


def _predict_x0(model_fn, sub, x, i, t, *, parameterization, clip_denoised, variance):
    """x̂_0 of the model at x (respaced index i, original timestep t), clipped if asked.

    A learned variance's channels are dropped: DDIM and the ODE solvers need only the mean.
    """
    batch = x.shape[0]
    out = model_fn(x, timestep_vector(t, batch)).astype(x.dtype)
    out, _ = diffusion.split_output(out, x, variance)
    pred_x0 = diffusion.prediction_to_x0(sub, x, timestep_vector(i, batch), out, parameterization)
    return jnp.clip(pred_x0, -1.0, 1.0) if clip_denoised else pred_x0


def _ddim_step(model_fn, sub, x, i, t, key, *, parameterization, clip_denoised, variance, eta):
    """DDIM from respaced index i (original timestep t) to index i - 1, and x̂_0."""
    i_vec = timestep_vector(i, x.shape[0])
    pred_x0 = _predict_x0(
        model_fn, sub, x, i, t, parameterization=parameterization, clip_denoised=clip_denoised,
        variance=variance,
    )  # fmt: skip
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


# --------------------------------------------------------------------------- the chain


class ChainState(NamedTuple):
    """What the reverse chain carries from step to step (a pytree).

    Attributes:
      x: float32 [*shape], the current point x_t of the chain.
      frames: float32 [F, *shape], the recorded x̂_0 (F = 0 without a trajectory).
      solver: the multistep solvers' history (`solvers.MultistepState`), () for the others.
    """

    x: jax.Array
    frames: jax.Array
    solver: Any = ()


@dataclasses.dataclass(frozen=True, eq=False)
class ReverseChain:
    """The reverse chain of one sampler over K timesteps, to run in one scan or in segments.

    `sample` is `result(run(init(), 0, K))`. Running it in segments of any lengths (e.g. to
    report progress between jitted calls) gives the same chain: step j of the K steps, counted
    from the noisiest, always uses respaced index i = K - 1 - j, original timestep
    `timesteps[i]` and the noise key `fold_in(key, timesteps[i])`. Steps j >= K of a segment
    leave the state as it is, so that every segment can have the same length (one compile).

    `sub` and `timesteps` may be traced (arguments of a jitted function): one compiled program
    then serves every chain of the same length K. Build it with `reverse_chain`.

    Attributes:
      model_fn: `model_fn(x_t, t) -> prediction` (t: original int32 timesteps [B]).
      sub: the respaced schedule, length K.
      timesteps: int32 [K], the original timestep of each respaced index, increasing.
      num_timesteps: T of the full chain (x_T is drawn with `fold_in(key, T)`).
      shape: the static shape (B, ...) of the samples.
      key: the chain's PRNG key.
      sampler, parameterization, variance, clip_denoised, eta, order: as in `sample`.
      every: record x̂_0 every `every` steps (0: no trajectory).
    """

    model_fn: ModelFn
    sub: schedules.Schedule
    timesteps: jax.Array
    num_timesteps: int
    shape: tuple[int, ...]
    key: jax.Array
    sampler: str = "ancestral"
    parameterization: str = "x0"
    variance: str = "fixedlarge"
    clip_denoised: bool = True
    eta: float = 0.0
    order: int = 2
    every: int = 0

    @property
    def num_steps(self) -> int:
        """K, the number of steps of the chain (static)."""
        return self.timesteps.shape[0]

    @property
    def num_frames(self) -> int:
        """F, the x̂_0 frames recorded (0 without a trajectory)."""
        return (self.num_steps - 1) // self.every + 1 if self.every else 0

    def init(self, x_T: jax.Array | None = None) -> ChainState:
        """The state before the first step: x_T ~ N(0, I) from `fold_in(key, T)`, or `x_T`."""
        if x_T is None:
            x_T = jax.random.normal(
                jax.random.fold_in(self.key, self.num_timesteps), self.shape, jnp.float32
            )
        elif tuple(x_T.shape) != self.shape:
            raise ValueError(f"x_T must have shape {self.shape}, got {tuple(x_T.shape)}.")
        frames = jnp.zeros((self.num_frames, *self.shape), jnp.float32)
        solver = solvers.init_state(self.shape) if self.sampler in solvers.SOLVERS else ()
        return ChainState(jnp.asarray(x_T, jnp.float32), frames, solver)

    def run(self, state: ChainState, start: int | jax.Array, length: int) -> ChainState:
        """Runs steps j = start, ..., start + length - 1 (those >= K do nothing) in one scan."""
        K = self.num_steps
        whole = isinstance(start, int) and start == 0 and length == K

        def body(state, j):
            if whole:
                return self._step(state, j), None
            new = jax.lax.cond(j < K, self._step, lambda s, _: s, state, jnp.minimum(j, K - 1))
            return new, None

        js = jnp.asarray(start, jnp.int32) + jnp.arange(length, dtype=jnp.int32)
        state, _ = jax.lax.scan(body, state, js)
        return state

    def result(self, state: ChainState) -> jax.Array | Trajectory:
        """The samples (clipped to [-1, 1]), with the trajectory if one was recorded."""
        samples = jnp.clip(state.x, -1.0, 1.0)
        if not self.every:
            return samples
        rows = (self.num_frames - 1 - jnp.arange(self.num_frames)) * self.every
        return Trajectory(samples, state.frames, jnp.asarray(self.timesteps, jnp.int32)[rows])

    def _step(self, state: ChainState, j: jax.Array) -> ChainState:
        i = self.num_steps - 1 - j
        t = jnp.asarray(self.timesteps, jnp.int32)[i]
        kw = dict(
            parameterization=self.parameterization,
            clip_denoised=self.clip_denoised,
            variance=self.variance,
        )
        solver = state.solver
        if self.sampler == "ancestral":
            x, pred_x0 = _ancestral_step(self.model_fn, self.sub, state.x, i, t, self.key, **kw)
        elif self.sampler == "ddim":
            x, pred_x0 = _ddim_step(
                self.model_fn, self.sub, state.x, i, t, self.key, eta=float(self.eta), **kw
            )
        else:
            pred_x0 = _predict_x0(self.model_fn, self.sub, state.x, i, t, **kw)
            step = {"dpm_solver++": solvers.dpm_solver_pp_step, "unipc": solvers.unipc_step}
            x, solver = step[self.sampler](
                self.sub, state.x, pred_x0, solver, i, j, order=self.order
            )
        frames = state.frames
        if self.every:
            # Frame f holds the step i = (F - 1 - f)·k; other steps write frame f back unchanged.
            f = jnp.clip(self.num_frames - 1 - i // self.every, 0, self.num_frames - 1)
            new = jnp.where(i % self.every == 0, pred_x0, frames[f])
            frames = jax.lax.dynamic_update_index_in_dim(frames, new, f, 0)
        return ChainState(x, frames, solver)


def reverse_chain(
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
    timestep_spacing: str = "endpoints",
    eta: float = 0.0,
    order: int = 2,
    return_trajectory_every: int = 0,
) -> ReverseChain:
    """Checks the arguments of `sample` and builds its `ReverseChain` (see `sample`)."""
    check_choice(sampler, SAMPLERS, "sampler")
    if sampler in solvers.SOLVERS:
        solvers.check_order(sampler, order)
    elif order != 2:
        raise ValueError(f"order={order!r} applies to {solvers.SOLVERS} only, not {sampler!r}.")
    check_choice(parameterization, diffusion.PARAMETERIZATIONS, "parameterization")
    check_choice(variance, diffusion.VARIANCES, "variance")
    shape = _check_shape(shape)
    if not isinstance(eta, int | float) or isinstance(eta, bool) or not eta >= 0.0:
        raise ValueError(f"eta must be a number >= 0, got {eta!r}.")
    if eta != 0.0 and sampler != "ddim":
        raise ValueError(f"eta={eta} applies to sampler='ddim' only; got sampler={sampler!r}.")
    every = return_trajectory_every
    if not isinstance(every, int | np.integer) or isinstance(every, bool) or every < 0:
        raise ValueError(f"return_trajectory_every must be an int >= 0, got {every!r}.")
    sub, ts = resolve_steps(sched, num_steps, timesteps, timestep_spacing)
    diffusion.check_x0_defined(sched, ts, parameterization)
    return ReverseChain(
        model_fn=model_fn,
        sub=sub,
        timesteps=jnp.asarray(ts, jnp.int32),
        num_timesteps=sched.num_timesteps,
        shape=shape,
        key=key,
        sampler=sampler,
        parameterization=parameterization,
        variance=variance,
        clip_denoised=clip_denoised,
        eta=float(eta),
        order=int(order),
        every=int(every),
    )


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
    timestep_spacing: str = "endpoints",
    eta: float = 0.0,
    order: int = 2,
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
      parameterization: what the model predicts: "x0" (the default: the network is a
        denoiser), "eps" or "v".
      variance: ancestral step variance: "fixedlarge" (default; σ_t² = β_t, Ho et al.'s
        choice for CIFAR-10), "fixedsmall" (σ_t² = σ_q²), or "learned" / "learned_range"
        (the model outputs 2C channels, the last C setting σ_t²; see
        `diffusion.learned_log_variance`). The other samplers use only the mean channels.
      clip_denoised: clip x̂_0 to [-1, 1] at every step (default True). The returned samples
        are clipped to [-1, 1] in any case.
      sampler: "ancestral" (default), "ddim", "dpm_solver++" or "unipc" (multistep ODE
        solvers, `ddpm_jax.solvers`; they ignore `variance`).
      num_steps: K steps spaced by `timestep_spacing` (`timesteps.spaced_timesteps`), in
        [1, T]; None (default): all T.
      timesteps: explicit strictly increasing original timesteps to visit, instead of
        num_steps. The chain starts at the last one: include T - 1 to start from pure noise.
        Every sampler's last step goes from the first of them to the clean image.
      timestep_spacing: how `num_steps` are chosen, one of `timesteps.SPACINGS`:
        "endpoints" (default), "even" (Nichol & Dhariwal), "linspace", "leading" or
        "trailing" (diffusers'), or "logsnr" (even in log-SNR).
      eta: DDIM's η >= 0 (0: deterministic); "ddim" only.
      order: 1, 2 (default) or 3, the order of "dpm_solver++" (its order 1 is DDIM with η = 0)
        and "unipc"; the other samplers take only the default.
      x_T: optional starting point of `shape` (e.g. from `ddim_invert`) instead of drawing it.
      return_trajectory_every: k > 0 also returns x̂_0 every k steps, counted back from the
        final step (which is always recorded); 0 (default) returns the samples alone.

    Returns:
      float32 [*shape] samples in [-1, 1]; a `Trajectory` if `return_trajectory_every` > 0.

    Raises:
      ValueError: unknown sampler/parameterization/variance, bad shape, num_steps outside
        [1, T], bad timesteps, eta < 0 or eta != 0 for a sampler other than "ddim", an order
        other than 2 for a sampler other than the multistep solvers, x_T of the wrong shape.
    """
    chain = reverse_chain(
        model_fn,
        sched,
        shape,
        key,
        parameterization=parameterization,
        variance=variance,
        clip_denoised=clip_denoised,
        sampler=sampler,
        num_steps=num_steps,
        timesteps=timesteps,
        timestep_spacing=timestep_spacing,
        eta=eta,
        order=order,
        return_trajectory_every=return_trajectory_every,
    )
    return chain.result(chain.run(chain.init(x_T), 0, chain.num_steps))


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
