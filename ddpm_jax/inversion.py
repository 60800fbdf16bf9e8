"""DDIM inversion: data -> the latent x_T from which the deterministic DDIM chain returns to it.

DDIM at η = 0 is the Euler discretisation of the probability-flow ODE in
(x/sqrt(ᾱ), sqrt((1-ᾱ)/ᾱ)); `ddim_invert` runs it forwards, from the data up through the kept
timesteps, and `sampling.sample(..., sampler="ddim", eta=0.0, x_T=latent)` over the same steps
decodes the latent back. Conventions: those of `ddpm_jax.sampling`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion, schedules
from ddpm_jax._base import ModelFn, check_choice, timestep_vector
from ddpm_jax.timesteps import resolve_steps


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
    check_choice(parameterization, diffusion.PARAMETERIZATIONS, "parameterization")
    if (
        not isinstance(fixed_point_iters, int | np.integer)
        or isinstance(fixed_point_iters, bool)
        or fixed_point_iters < 0
    ):
        raise ValueError(f"fixed_point_iters must be an int >= 0, got {fixed_point_iters!r}.")
    if x0.ndim < 1:
        raise ValueError(f"x0 must have a batch dimension [B, ...], got shape {x0.shape}.")
    sub, ts = resolve_steps(sched, num_steps, timesteps)
    diffusion.check_x0_defined(sched, ts, parameterization)
    x0 = jnp.asarray(x0, jnp.float32)

    def body(x, it):
        i, t = it
        i_vec, t_vec = timestep_vector(i, x.shape[0]), timestep_vector(t, x.shape[0])
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
