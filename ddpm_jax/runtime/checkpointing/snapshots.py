"""Snapshots of the power EMAs (post-hoc EMA, `ddpm_jax.posthoc_ema`), kept for reconstruction.

Layout under `<workdir>/ema_snapshots/`, with the rules of `checkpoints/` (`dirs`):

    <step>/                         a complete snapshot: items "state", the power EMAs of
                                    `optim.ema_profiles` at that step (one pytree like the
                                    parameters per profile), and "extra", {"step",
                                    "sigma_rels"}
    <step>.orbax-checkpoint-tmp/    a snapshot being written, or cut short by a kill
    _quarantine/<step>-<time>/      set aside, never deleted: incomplete, or newer than the
                                    step a run resumed from (`QUARANTINE_REASON.txt`)

A snapshot appears under its step only once complete (orbax renames it into place), so a
run that dies loses none that was written; none is ever deleted (a trajectory needs them
all). A resumed run sets aside the snapshots after the step it restored, which belong to
a trajectory it does not continue (it writes its own at those steps).

A snapshot costs one float32 copy of the parameters per profile (4 bytes per parameter and
profile) and is written asynchronously, like a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from ddpm_jax.errors import NonFiniteError, WorkdirError, WorkdirNotFoundError
from ddpm_jax.runtime import workdir as wd
from ddpm_jax.runtime.checkpointing import dirs
from ddpm_jax.runtime.checkpointing.items import (
    EXTRA_ITEM,
    STATE_ITEM,
    CheckpointSaveError,
    first_line,
    handler_registry,
    nonfinite_leaves,
    sync_processes,
)
from ddpm_jax.runtime.checkpointing.reading import _read_only_manager

PyTree = Any


def snapshot_dir(workdir: str | os.PathLike) -> str:
    """`<workdir>/ema_snapshots`, the directory of the snapshot steps."""
    return os.path.join(os.fspath(workdir), wd.EMA_SNAPSHOT_SUBDIR)


def set_aside_after(workdir: str | os.PathLike, step: int) -> list[int]:
    """Moves the snapshots newer than `step` to `_quarantine/`; returns their steps.

    Called (by every process) with the step a training run resumed from, before it opens a
    `SnapshotWriter`: the snapshots after that step were written by a run whose state past
    it was lost or rolled back, and this run writes its own.
    """
    directory = snapshot_dir(workdir)
    newer = [s for s in sorted(dirs.step_dirs(directory)) if s > step]
    for s in newer:
        where = dirs.quarantine(directory, s, f"newer than step {step}, which the run resumed from")
        logging.warning("Resuming at step %d: EMA snapshot %d moved to %s.", step, s, where)
    if newer:
        sync_processes("ddpm_jax_snapshots_set_aside")
    return newer


class SnapshotWriter:
    """The orbax manager of `<workdir>/ema_snapshots`: asynchronous saves, all kept.

    Collective like `Checkpointer`: in a multi-process run every process makes the same
    calls; only process 0 moves directories.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        every: int,
        sigma_rels: Sequence[float],
        async_save: bool = True,
    ):
        """Opens (creating if needed) the snapshot directory of `workdir`.

        Args:
          workdir: the run's workdir.
          every: `due` every this many steps (`optim.ema_snapshot_every`, >= 1).
          sigma_rels: σ_rel of each power EMA, in the order of the train state's
            `power_emas` (`optim.ema_profiles`); recorded in every snapshot.
          async_save: write in a background thread (False: `save` blocks until written).
        """
        if not isinstance(every, int) or every < 1:
            raise ValueError(
                f"every (optim.ema_snapshot_every) must be an int >= 1, got {every!r}."
            )
        self.every = every
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.directory = snapshot_dir(workdir)
        if dirs.is_primary() and epath.Path(self.directory).exists():
            dirs.quarantine_incomplete(self.directory)
        sync_processes("ddpm_jax_snapshots_open")
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save, create=True
        )  # no preservation policy: every snapshot is kept.
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, handler_registry=handler_registry()
        )
        dirs.remove_partial_writes(self.directory)  # this run owns the workdir (its lock).

    def all_steps(self) -> list[int]:
        """Steps of the complete snapshots, ascending."""
        return sorted(self._manager.all_steps())

    def due(self, step: int, final: bool) -> bool:
        """Every `every` steps, and at the last step of a run (or when it stops)."""
        return step % self.every == 0 or final

    def save(self, step: int, power_emas: Sequence[PyTree]) -> bool:
        """Starts the asynchronous save of the power EMAs at `step`; False if it exists.

        Raises:
          NonFiniteError: a power EMA holds NaN or Inf (nothing is written).
          ValueError: not one pytree per profile.
        """
        step = int(step)
        if len(power_emas) != len(self.sigma_rels):
            raise ValueError(f"{len(power_emas)} power EMAs for profiles {self.sigma_rels}.")
        if step in self._manager.all_steps():
            logging.info("EMA snapshot at step %d skipped: it exists.", step)
            return False
        bad = nonfinite_leaves(tuple(power_emas))
        if bad:
            raise NonFiniteError(
                f"Refusing to save the EMA snapshot at step {step}: non-finite values in "
                f"{', '.join(bad[:5])}."
            )
        extra = {"step": step, "sigma_rels": self.sigma_rels}
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    STATE_ITEM: ocp.args.PyTreeSave(tuple(power_emas)),
                    EXTRA_ITEM: ocp.args.JsonSave(extra),
                }
            ),
            force=True,
        )
        if saved:
            logging.info("Saving EMA snapshot at step %d to %s.", step, self.directory)
        return saved

    def check_for_errors(self) -> None:
        """Raises `CheckpointSaveError` if an asynchronous save has failed."""
        try:
            self._manager.check_for_errors()
        except Exception as e:
            raise CheckpointSaveError(
                f"Saving an EMA snapshot to {self.directory} failed ({first_line(e)}); "
                "stopping. The snapshots written before it are intact; free space or fix the "
                "directory, then run again to resume."
            ) from e

    def wait_until_finished(self) -> None:
        """Blocks until pending saves are written."""
        self._manager.wait_until_finished()
        self.check_for_errors()

    def close(self) -> None:
        """Waits for pending saves and releases the manager's threads."""
        self._manager.close()


# --------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One complete snapshot: its step and the σ_rel of each power EMA it holds."""

    step: int
    sigma_rels: tuple[float, ...]


def list_snapshots(workdir: str | os.PathLike) -> list[Snapshot]:
    """The complete snapshots of `workdir`, by step (reads only; a run may be writing).

    Raises:
      WorkdirError: a snapshot whose record of its profiles cannot be read.
    """
    directory = snapshot_dir(workdir)
    out = []
    for step, path in sorted(dirs.step_dirs(directory).items()):
        if dirs.missing_markers(path):
            continue  # incomplete: the next training run sets it aside.
        meta = os.path.join(os.fspath(path), EXTRA_ITEM, "metadata")
        try:
            with open(meta) as f:
                record = json.load(f)
            sigma_rels = tuple(float(s) for s in record["sigma_rels"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise WorkdirError(
                f"The EMA snapshot {path} has no readable record of its profiles ({e}); move "
                "it out of the way."
            ) from e
        out.append(Snapshot(step, sigma_rels))
    return out


def load_snapshot(workdir: str | os.PathLike, step: int) -> list[PyTree]:
    """The power EMAs of the snapshot at `step`, as numpy pytrees on the host (reads only).

    Returns:
      One pytree of float32 numpy arrays per profile, in the snapshot's `sigma_rels` order.

    Raises:
      WorkdirNotFoundError: no complete snapshot at `step`.
      WorkdirError: it cannot be read.
    """
    directory = snapshot_dir(workdir)
    if int(step) not in {s.step for s in list_snapshots(workdir)}:
        raise WorkdirNotFoundError(f"No complete EMA snapshot at step {step} in {directory}.")
    with _read_only_manager(directory) as manager:
        try:
            tree = manager.item_metadata(int(step))[STATE_ITEM].tree
            args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
            out = manager.restore(
                int(step),
                args=ocp.args.Composite(
                    **{STATE_ITEM: ocp.args.PyTreeRestore(item=tree, restore_args=args)}
                ),
            )
        except Exception as e:
            raise WorkdirError(
                f"The EMA snapshot at step {step} in {directory} cannot be read: {first_line(e)}"
            ) from e
    return list(out[STATE_ITEM])
