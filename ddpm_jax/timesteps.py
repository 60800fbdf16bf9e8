"""Which timesteps a reverse chain visits, and the schedule of the chain that visits only those.

A chain of K < T steps keeps ᾱ at the steps it visits and recomputes β from it (Nichol &
Dhariwal's respacing), so every sampler runs unchanged over the `respaced_schedule`, calling
the model with the original timestep indices.

Conventions (DESIGN.md): timesteps are integers t ∈ {0, …, T-1}, index t being the paper's
step t+1.
"""

from __future__ import annotations

import jax
import numpy as np

from ddpm_jax import schedules


def spaced_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """K evenly spaced timesteps of a T-step chain, always keeping the first and the last.

    t_i = floor(i (T - 1)/(K - 1) + 1/2) for i = 0..K-1; with K = 1 the single step is T - 1,
    so that the chain still starts from pure noise.

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


def check_timesteps(timesteps, num_timesteps: int) -> np.ndarray:
    """`timesteps` as int64 numpy [K] after checking they are strictly increasing in [0, T)."""
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
    ts = check_timesteps(timesteps, T)
    if ts.size == T:  # strictly increasing in [0, T): every step.
        return sched
    if isinstance(sched.betas, jax.core.Tracer):
        raise ValueError(
            "Respacing needs a concrete schedule, but sched is traced; close over sched "
            "instead of passing it as an argument of the jitted function."
        )
    ac = np.cumprod(1.0 - np.asarray(sched.betas, dtype=np.float64))
    return schedules.make_schedule(schedules.respace_betas(ac, ts))


def resolve_steps(
    sched: schedules.Schedule, num_steps: int | None, timesteps
) -> tuple[schedules.Schedule, np.ndarray]:
    """(respaced schedule, timesteps) of a chain given `num_steps` K or explicit `timesteps`.

    Neither: every step of `sched`. Raises ValueError if both are given.
    """
    T = sched.num_timesteps
    if num_steps is not None and timesteps is not None:
        raise ValueError("Pass num_steps or timesteps, not both.")
    if timesteps is not None:
        ts = check_timesteps(timesteps, T)
    elif num_steps is not None:
        ts = spaced_timesteps(T, num_steps)
    else:
        ts = np.arange(T)
    return respaced_schedule(sched, ts), ts
