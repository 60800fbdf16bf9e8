"""Post-hoc EMAs of a workdir: EDM2's least squares over its snapshots, written as named EMAs.

    plans = [reconstruct.plan(workdir, s) for s in (0.05, 0.10)]   # solves, loads nothing
    for p in plans:
        reconstruct.write(workdir, p)            # -> <workdir>/emas/<p.name>/

A training run with `optim.ema_profiles` and `optim.ema_snapshot_every` leaves snapshots of
its power EMAs in `<workdir>/ema_snapshots/` (`runtime.checkpointing.snapshots`). The average
of any width σ_rel at a snapshot step is a linear combination of them, Σ_k c_k (snapshot k),
with the coefficients of `posthoc_ema.solve_coefficients` (Karras et al. 2024, EDM2, the
appendix on post-hoc EMA), accumulated in float64 one snapshot at a time.

The target step must be a snapshot step: between two, the target's weights end where a narrow
profile weighs most, and no combination of snapshots taken after it can cut them off there
(the weight error is then of order 0.1).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ddpm_jax import posthoc_ema
from ddpm_jax.errors import ConfigError, WorkdirNotFoundError
from ddpm_jax.runtime.checkpointing import named_emas, snapshots

PyTree = Any

# Above this relative error of the weights, the reconstruction is reported as poor.
POOR_WEIGHT_ERROR = 0.05
# σ_rel's of different runs or flags are the same profile when they agree to this (relative).
_SAME_SIGMA_REL = 1e-9


def default_name(sigma_rel: float, step: int) -> str:
    """`sigma_rel_<σ_rel>_step_<step>`, e.g. `sigma_rel_0.07_step_2000`."""
    return f"sigma_rel_{float(sigma_rel):g}_step_{int(step)}"


@dataclasses.dataclass(frozen=True)
class Plan:
    """One post-hoc EMA, solved: which snapshots with which coefficients.

    Attributes:
      sigma_rel: the target width.
      step: the target step (a snapshot step).
      snapshots: (step, σ_rel) of each snapshot used, in the order of `coefficients`.
      coefficients: c_k, float64 [K].
      weight_error: ‖Σ c_k w^(k) − w*‖ / ‖w*‖ of the weights on the steps, exactly.
      name: the named EMA it is written as.
    """

    sigma_rel: float
    step: int
    snapshots: tuple[tuple[int, float], ...]
    coefficients: np.ndarray
    weight_error: float
    name: str

    @property
    def sum_abs(self) -> float:
        """Σ|c_k|: how much the float32 rounding of the snapshots is amplified."""
        return float(np.sum(np.abs(self.coefficients)))

    def metadata(self) -> dict[str, Any]:
        """What `metadata.json` of the named EMA records."""
        return {
            "sigma_rel": self.sigma_rel,
            "gamma": float(posthoc_ema.sigma_rel_to_gamma(self.sigma_rel)),
            "step": self.step,
            "snapshots": [[int(t), float(s)] for t, s in self.snapshots],
            "coefficients": [float(c) for c in self.coefficients],
            "sum_abs_coefficients": self.sum_abs,
            "weight_error": self.weight_error,
            "method": "discrete least squares (EDM2, exact inner products of the weights)",
        }

    def summary(self) -> str:
        """One line: name, target, snapshots used, Σ|c| and the weight error."""
        return (
            f"{self.name}  sigma_rel={self.sigma_rel:g} step={self.step} "
            f"snapshots={len(self.snapshots)} sum|c|={self.sum_abs:.3g} "
            f"weight_error={self.weight_error:.2e}"
        )


def _check_sigma_rel(sigma_rel: Any, what: str) -> float:
    ok = isinstance(sigma_rel, int | float | np.floating) and not isinstance(sigma_rel, bool)
    if not ok or not (0.0 < float(sigma_rel) <= posthoc_ema.SIGMA_REL_MAX):
        raise ConfigError(
            f"{what} {sigma_rel!r} is not in (0, 1/sqrt(12) = {posthoc_ema.SIGMA_REL_MAX:.4f}]: "
            "sigma_rel is the EMA's width relative to the training length, and 0.2887 is "
            "already the plain average of every step."
        )
    return float(sigma_rel)


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=_SAME_SIGMA_REL)


def plan(
    workdir: str,
    sigma_rel: float,
    step: int | None = None,
    *,
    from_profiles: Sequence[float] | None = None,
    name: str | None = None,
) -> Plan:
    """Solves for the post-hoc EMA of width `sigma_rel` at `step` over `workdir`'s snapshots.

    Args:
      workdir: a training run's workdir with snapshots (`optim.ema_snapshot_every`).
      sigma_rel: the target σ_rel, in (0, 1/√12].
      step: the target step, a snapshot step; None: the last one.
      from_profiles: use only the snapshots of these tracked σ_rel's; None: all of them.
      name: the named EMA to write it as; None: `default_name`.

    Raises:
      WorkdirNotFoundError: the workdir has no snapshots.
      ConfigError: a σ_rel out of range, a profile the run did not track, or a step that is
        not a snapshot step.
    """
    sigma_rel = _check_sigma_rel(sigma_rel, "--sigma_rel")
    found = snapshots.list_snapshots(workdir)
    if not found:
        raise WorkdirNotFoundError(
            f"{snapshots.snapshot_dir(workdir)} holds no EMA snapshots: train with "
            "config.optim.ema_profiles (e.g. (0.05, 0.10)) and config.optim.ema_snapshot_every "
            "(e.g. a few hundred steps) to choose the EMA after training."
        )
    tracked = sorted({s for snap in found for s in snap.sigma_rels})
    used = tracked
    if from_profiles is not None:
        used = [_check_sigma_rel(s, "--from_profiles") for s in from_profiles]
        missing = [s for s in used if not any(_same(s, t) for t in tracked)]
        if missing or not used:
            raise ConfigError(
                f"--from_profiles={','.join(f'{s:g}' for s in used)}: the snapshots hold the "
                f"profiles {', '.join(f'{t:g}' for t in tracked)} only."
            )
    steps = sorted({snap.step for snap in found})
    target = steps[-1] if step is None else int(step)
    if target not in steps:
        before = [t for t in steps if t < target]
        after = [t for t in steps if t > target]
        near = ", ".join(str(t) for t in (before[-1:] + after[:1]))
        raise ConfigError(
            f"--step={target} is not a snapshot step (nearest: {near or 'none'}; the first "
            f"{steps[0]}, the last {steps[-1]}): between snapshots no combination of them "
            "ends its average there; use a snapshot step."
        )
    pairs = tuple(
        (snap.step, s)
        for snap in found
        if snap.step <= target
        for s in snap.sigma_rels
        if any(_same(s, u) for u in used)
    )
    snap_steps = [t for t, _ in pairs]
    snap_sigmas = [s for _, s in pairs]
    c = posthoc_ema.solve_coefficients(snap_steps, snap_sigmas, sigma_rel, target)
    err = posthoc_ema.weight_error(snap_steps, snap_sigmas, c, sigma_rel, target)
    out = Plan(sigma_rel, target, pairs, c, err, name or default_name(sigma_rel, target))
    named_emas.check_name(out.name)
    if err > POOR_WEIGHT_ERROR:
        logging.warning(
            "sigma_rel %g at step %d: the snapshots make its weights only to a relative error "
            "of %.1f%% (the profiles tracked are %s); the average is approximate.",
            sigma_rel, target, 100 * err, ", ".join(f"{t:g}" for t in tracked),
        )  # fmt: skip
    return out


def _snapshot_params(workdir: str, pairs: Sequence[tuple[int, float]]) -> Iterator[PyTree]:
    """The parameters of each (step, σ_rel), in order, loading each snapshot step once."""
    index = {snap.step: snap.sigma_rels for snap in snapshots.list_snapshots(workdir)}
    loaded_step, loaded = None, None
    for t, s in pairs:
        if t != loaded_step:
            loaded_step, loaded = t, snapshots.load_snapshot(workdir, t)
        k = next(i for i, x in enumerate(index[t]) if _same(x, s))
        yield loaded[k]


def reconstruct(workdir: str, p: Plan) -> PyTree:
    """The parameters of `p`: Σ_k c_k (snapshot k) in float64, returned as float32 numpy."""
    return posthoc_ema.reconstruct(_snapshot_params(workdir, p.snapshots), p.coefficients)


def write(workdir: str, p: Plan) -> str:
    """Reconstructs `p` and writes it as the named EMA `p.name`; returns its directory."""
    path = named_emas.write_named_ema(workdir, p.name, reconstruct(workdir, p), p.metadata())
    logging.info("Wrote %s (%s).", path, p.summary())
    return path
