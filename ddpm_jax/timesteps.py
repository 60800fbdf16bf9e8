"""Which timesteps a reverse chain visits, and the schedule of the chain that visits only those.

A chain of K < T steps keeps ᾱ at the steps it visits and recomputes β from it (Nichol &
Dhariwal's respacing), so every sampler runs unchanged over the `respaced_schedule`, calling
the model with the original timestep indices.

Conventions: timesteps are integers t ∈ {0, …, T-1}, index t being the paper's
step t+1.
"""

from __future__ import annotations

import jax
import numpy as np

from ddpm_jax import schedules

SPACINGS = ("endpoints", "even", "linspace", "leading", "trailing", "logsnr")


def spaced_timesteps(
    num_timesteps: int,
    num_steps: int,
    spacing: str = "endpoints",
    alphas_cumprod: np.ndarray | None = None,
) -> np.ndarray:
    """K of the T timesteps, by one of the `SPACINGS`, increasing.

    - "endpoints" (the default, unchanged since the first release): t_i = floor(i (T-1)/(K-1)
      + 1/2), i = 0..K-1, keeping 0 and T-1 (ties round up); K = 1 gives T-1, so that even a
      one-step chain starts from pure noise.
    - "even": Nichol & Dhariwal's `space_timesteps(T, [K])` exactly: a stride
      (T-1)/(K-1) accumulated in floating point and rounded with Python's `round` (ties to
      even: K = 7, T = 1000 gives 166 and 832 where "endpoints" gives 167 and 833); K = 1
      gives 0.
    - "linspace", "leading", "trailing": diffusers' `timestep_spacing` of
      `DPMSolverMultistepScheduler` and `UniPCMultistepScheduler` (steps_offset 0):
      round(linspace(0, T-1, K+1))[1:], (1..K)·(T // (K+1)), and round(T - j·T/K) - 1
      for j = 0..K-1. "linspace" and "leading" leave out t = 0: the last step goes from
      their smallest timestep to the clean image. (`DDIMScheduler`'s "linspace" and
      "leading" differ: round(linspace(0, T-1, K)) and (0..K-1)·(T // K) are
      `timesteps=` away.)
    - "logsnr": K timesteps evenly spaced in λ = log(α/σ) = log SNR / 2 from T-1 to 0, each
      the nearest integer timestep (a repeat moves to the next free timestep; Lu et al.'s
      recommended spacing for their solver; under zero terminal SNR, λ_{T-1} = -inf, the
      others are spaced from λ_{T-2}): the
      steps of an ODE solver are then of equal size in its own time variable, where the
      timestep spacings above make the last steps before t = 0 huge in λ. Needs
      `alphas_cumprod`.

    Args:
      num_timesteps: T of the full chain.
      num_steps: K, in [1, T].
      spacing: one of `SPACINGS`.
      alphas_cumprod: ᾱ of the full chain, [T] ("logsnr" only).

    Returns:
      int64 numpy array [K], strictly increasing within [0, T).

    Raises:
      ValueError: unknown spacing, K outside [1, T], or a spacing that gives repeated
        timesteps for this K (e.g. "leading" with K + 1 > T).
    """
    if spacing not in SPACINGS:
        raise ValueError(f"Unknown timestep spacing {spacing!r}; expected one of {SPACINGS}.")
    if not isinstance(num_steps, int | np.integer) or isinstance(num_steps, bool):
        raise ValueError(f"num_steps must be an integer or None, got {num_steps!r}.")
    T, K = int(num_timesteps), int(num_steps)
    if not 1 <= K <= T:
        raise ValueError(
            f"num_steps must lie in [1, T] = [1, {T}], got {K}; pass num_steps=None for all "
            "T steps."
        )
    if spacing == "endpoints":
        if K == 1:
            return np.array([T - 1])
        # floor(x + 0.5), not np.round: round-half-to-even can merge neighbours.
        return np.floor(np.linspace(0, T - 1, K) + 0.5).astype(np.int64)
    if spacing == "even":
        stride = 1 if K <= 1 else (T - 1) / (K - 1)
        taken, cur = [], 0.0
        for _ in range(K):
            taken.append(round(cur))
            cur += stride
        ts = np.array(sorted(set(taken)), np.int64)
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, K + 1).round()[::-1][:-1].astype(np.int64)[::-1]
    elif spacing == "logsnr":
        if alphas_cumprod is None:
            raise ValueError('timestep spacing "logsnr" needs the schedule\'s alphas_cumprod.')
        ac = np.asarray(alphas_cumprod, np.float64)
        with np.errstate(divide="ignore"):
            lam = 0.5 * (np.log(ac) - np.log1p(-ac))  # decreasing in t
        # Zero terminal SNR: λ_{T-1} = -inf; space from the last finite λ, start at T - 1.
        top = lam[-1] if np.isfinite(lam[-1]) or T == 1 else lam[-2]
        targets = np.linspace(top, lam[0], K) if K > 1 else np.array([top])
        ts = np.sort([int(np.argmin(np.abs(lam - v))) for v in targets]).astype(np.int64)
        ts[-1] = T - 1
        # Near t = 0 one integer step spans more λ than a step of the spacing: keep the K
        # timesteps distinct by moving a repeated one to the next free timestep.
        for j in range(1, K):
            ts[j] = max(ts[j], ts[j - 1] + 1)
        ts[-1] = min(ts[-1], T - 1)
        for j in range(K - 2, -1, -1):
            ts[j] = min(ts[j], ts[j + 1] - 1)
    elif spacing == "leading":
        ratio = T // (K + 1)
        ts = (np.arange(0, K + 1) * ratio).round()[::-1][:-1].astype(np.int64)[::-1]
    else:
        ts = (np.arange(T, 0, -T / K).round().astype(np.int64) - 1)[::-1]
    if ts.size != K or np.any(np.diff(ts) <= 0) or ts[0] < 0 or ts[-1] >= T:
        raise ValueError(
            f"timestep spacing {spacing!r} gives {ts.size} distinct timesteps for "
            f"num_steps={K} of T={T} ({ts.tolist()[:8]}...); choose fewer steps or another "
            "spacing."
        )
    return np.ascontiguousarray(ts)


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
    sched: schedules.Schedule, num_steps: int | None, timesteps, spacing: str = "endpoints"
) -> tuple[schedules.Schedule, np.ndarray]:
    """(respaced schedule, timesteps) of a chain given `num_steps` K or explicit `timesteps`.

    `num_steps` is spaced by `spacing` (`spaced_timesteps`); neither gives every step of
    `sched`. Raises ValueError if both are given.
    """
    T = sched.num_timesteps
    if num_steps is not None and timesteps is not None:
        raise ValueError("Pass num_steps or timesteps, not both.")
    if timesteps is not None:
        ts = check_timesteps(timesteps, T)
    elif num_steps is not None:
        ac = np.cumprod(1.0 - np.asarray(sched.betas, np.float64)) if spacing == "logsnr" else None
        ts = spaced_timesteps(T, num_steps, spacing, ac)
    else:
        ts = np.arange(T)
    return respaced_schedule(sched, ts), ts
