"""`Checkpointer`: the orbax manager of a training run's checkpoints, with this project's policy."""

from __future__ import annotations

import concurrent.futures
import logging
import os
from collections.abc import Mapping
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from ddpm_jax.errors import NonFiniteError, WorkdirError, WorkdirNotFoundError
from ddpm_jax.runtime.checkpointing import dirs
from ddpm_jax.runtime.checkpointing.items import (
    EXTRA_ITEM,
    STATE_ITEM,
    CheckpointSaveError,
    check_structure,
    cpm,
    first_line,
    handler_registry,
    nonfinite_leaves,
    restore_target,
    sync_processes,
    to_json,
)
from ddpm_jax.runtime.workdir import checkpoint_dir

PyTree = Any

# Orbax's message for a restore target whose tree differs from the saved one (nodes, not just
# leaves: e.g. an empty subtree), which must not be taken for a damaged checkpoint.
STRUCTURE_MISMATCH = "tree structures do not match"


class Checkpointer:
    """An orbax `CheckpointManager` over `<workdir>/checkpoints` with this project's policy.

    Saves are asynchronous: `save` returns once the arrays are copied to host memory (so the
    state may be donated to the next step) and files are written in a background thread. It
    is collective: in a multi-process run every process makes the same calls.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        save_every_steps: int,
        keep_last: int = 3,
        keep_period: int | None = None,
        async_save: bool = True,
    ):
        """Opens (creating if needed) the checkpoint directory of `workdir`.

        Args:
          workdir: the run's workdir; checkpoints go to `<workdir>/checkpoints`.
          save_every_steps: `save` writes at steps divisible by this (and when forced, or at a
            preemption sync point).
          keep_last: how many of the most recent checkpoints to keep.
          keep_period: also keep forever every checkpoint whose step is divisible by this;
            None or 0 disables.
          async_save: write in a background thread (False: `save` blocks until written).
        """
        if not isinstance(save_every_steps, int) or save_every_steps < 1:
            raise ValueError(
                f"save_every_steps (training.checkpoint_every_steps) must be an int >= 1, got "
                f"{save_every_steps!r}."
            )
        if not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(
                f"keep_last (training.keep_checkpoints) must be an int >= 1, got {keep_last!r}."
            )
        if keep_period is not None and (not isinstance(keep_period, int) or keep_period < 0):
            raise ValueError(
                f"keep_period (training.keep_period) must be None or an int >= 0, got "
                f"{keep_period!r}."
            )
        self.directory = checkpoint_dir(workdir)
        # Before the manager lists the steps: one that is empty or lacks an item would look
        # like the newest checkpoint and fail to restore.
        if dirs.is_primary() and epath.Path(self.directory).exists():
            dirs.quarantine_incomplete(self.directory)
        sync_processes("ddpm_jax_checkpoint_open")
        preserve = [cpm.LatestN(keep_last)]
        if keep_period:
            preserve.append(cpm.EveryNSteps(keep_period))
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=cpm.AnySavePolicy(
                [cpm.FixedIntervalPolicy(save_every_steps), cpm.PreemptionCheckpointingPolicy()]
            ),
            preservation_policy=cpm.AnyPreservationPolicy(preserve),
            todelete_subdir=dirs.TRASH_SUBDIR,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, handler_registry=handler_registry()
        )
        # Synchronous, before any save: no new write or rename can race with a stale entry.
        dirs.remove_partial_writes(self.directory)
        dirs.empty_trash(self.directory)
        self._trash_pool = concurrent.futures.ThreadPoolExecutor(1, "ckpt_trash")
        self._trash_job: concurrent.futures.Future | None = None

    @classmethod
    def from_config(cls, workdir: str | os.PathLike, training_config: Any) -> Checkpointer:
        """Builds from `config.training` (`checkpoint_every_steps`, `keep_checkpoints`,
        `keep_period`)."""
        return cls(
            workdir,
            save_every_steps=int(training_config.checkpoint_every_steps),
            keep_last=int(training_config.keep_checkpoints),
            keep_period=training_config.get("keep_period", None),
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None if there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints kept, ascending."""
        return sorted(self._manager.all_steps())

    def reached_preemption(self, step: int) -> bool:
        """True when all processes reached the JAX preemption sync point at `step`.

        Only fires in multi-process runs under `jax.distributed` (its preemption service
        watches SIGTERM there); every process must call it at every step.
        """
        return self._manager.reached_preemption(step)

    def should_save(self, step: int) -> bool:
        """True if `save(step, ...)` without `force` would write a checkpoint."""
        latest = self._manager.latest_step()
        if latest is not None and step <= latest:
            return False
        return self._manager.should_save(step)

    def save(
        self,
        step: int,
        state: PyTree,
        extra: Mapping[str, Any] | None = None,
        *,
        force: bool = False,
    ) -> bool:
        """Starts an async save of `state` and `extra` at `step` if the policy says so.

        Args:
          step: the training step the state belongs to (the number of updates applied).
          state: pytree of `jax.Array`s (any sharding) and numpy arrays.
          extra: JSON-able dict of host-side state; numpy scalars/arrays are converted.
          force: save even if `step` is not on the save interval (final step, preemption).

        Returns:
          True if a save was started; False if the policy skipped the step or a checkpoint at
          `step` or later already exists.

        Raises:
          NonFiniteError: if a floating-point leaf holds NaN or Inf (nothing is written).
          ValueError: if `extra` is not JSON-able.
        """
        step = int(step)
        latest = self._manager.latest_step()
        if latest is not None and step <= latest:
            if force:
                logging.info("Checkpoint at step %d skipped: step %d exists.", step, latest)
            return False
        if not force and not self._manager.should_save(step):
            return False
        extra_json = to_json(extra, step)
        bad = nonfinite_leaves(state)
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise NonFiniteError(
                f"Refusing to save the checkpoint at step {step}: non-finite values (NaN/Inf) in "
                f"{shown}. The last good checkpoint is step {latest}."
            )
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    STATE_ITEM: ocp.args.PyTreeSave(state),
                    EXTRA_ITEM: ocp.args.JsonSave(extra_json),
                }
            ),
            force=True,
        )
        if saved:
            logging.info("Saving checkpoint at step %d to %s.", step, self.directory)
        # The previous save's finalization (which moves old steps to the trash) is done by now.
        if self._trash_job is None or self._trash_job.done():
            self._trash_job = self._trash_pool.submit(dirs.empty_trash, self.directory)
        return saved

    def restore(
        self, abstract_state: PyTree, step: int | None = None
    ) -> tuple[PyTree, dict[str, Any]]:
        """Restores the state at `step` (default: the newest that restores) onto the target.

        Without `step`, a newest checkpoint that cannot be read (a truncated file, a corrupt
        chunk) is moved to `_quarantine/` (never deleted), with one warning that names the
        step and the reason, and the next older one is tried.

        Args:
          abstract_state: the target: a pytree of `jax.ShapeDtypeStruct` with `.sharding`
            (from `sharding.sharded_abstract`), or of `jax.Array`s whose shardings are used.
            Its structure, shapes and dtypes must match the saved state.
          step: the step to restore; None for the newest that restores.

        Returns:
          `(state, extra)`: the state with the structure and shardings of `abstract_state`,
          and the `extra` dict saved with it.

        Raises:
          WorkdirNotFoundError: there is no complete checkpoint (or none at `step`), or none
            that restores.
          WorkdirError: the checkpoint holds another structure or other shapes than the
            target (a different model), or `step` was asked for and cannot be read.
        """
        candidates = [self._resolve_step(step)] if step is not None else self.all_steps()[::-1]
        if not candidates:
            raise WorkdirNotFoundError(f"No complete checkpoint in {self.directory}.")
        target = restore_target(abstract_state)
        for s in candidates:
            try:  # orbax refuses other shapes (strict): only a failure needs the diagnosis.
                out = self._restore_step(s, target)
                return out[STATE_ITEM], dict(out[EXTRA_ITEM] or {})
            except Exception:
                pass  # read the metadata below: another model, or a damaged checkpoint.
            try:
                saved = self._manager.item_metadata(s)[STATE_ITEM]
                reason = None if saved is not None else "its state item has no metadata"
            except Exception as e:
                saved, reason = None, first_line(e)
            if saved is not None:
                # A different model is the user's error, not a damaged checkpoint.
                check_structure(target, saved.tree, s, self.directory)
                try:
                    out = self._restore_step(s, target)
                    return out[STATE_ITEM], dict(out[EXTRA_ITEM] or {})
                except ValueError as e:
                    if STRUCTURE_MISMATCH in str(e):  # a state of another layout: not damage.
                        raise WorkdirError(
                            f"The checkpoint at step {s} in {self.directory} holds a state of "
                            f"another layout than this config builds ({first_line(e)}); use the "
                            "config it was trained with, or another --workdir."
                        ) from e
                    reason = first_line(e)
                except Exception as e:
                    reason = first_line(e)
            if step is not None:
                raise WorkdirError(
                    f"The checkpoint at step {s} in {self.directory} cannot be restored: {reason}"
                )
            where = dirs.quarantine(self.directory, s, f"cannot be restored: {reason}")
            sync_processes("ddpm_jax_checkpoint_quarantine")
            self._manager.reload()
            older = self.all_steps()
            logging.warning(
                "Checkpoint at step %d cannot be restored (%s); moved to %s; %s.",
                s, reason, where,
                f"trying step {older[-1]}" if older else "no older checkpoint is left",
            )  # fmt: skip
        raise WorkdirNotFoundError(
            f"No checkpoint in {self.directory} restores; the unreadable ones were moved to "
            f"{os.path.join(self.directory, dirs.QUARANTINE_SUBDIR)}."
        )

    def _restore_step(self, step: int, target: PyTree) -> dict[str, Any]:
        return self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    STATE_ITEM: ocp.args.PyTreeRestore(
                        item=target,
                        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    ),
                    EXTRA_ITEM: ocp.args.JsonRestore(),
                }
            ),
        )

    def roll_back_to(self, step: int) -> list[int]:
        """Sets aside every checkpoint newer than `step` (to `_quarantine/`), so that a run
        resumed from `step` saves its own steps after it; returns the steps set aside."""
        step = self._resolve_step(step)
        newer = [s for s in self.all_steps() if s > step]
        for s in newer:
            where = dirs.quarantine(self.directory, s, f"newer than step {step}, rolled back to")
            logging.warning("Rolling back to step %d: checkpoint %d moved to %s.", step, s, where)
        if newer:
            sync_processes("ddpm_jax_checkpoint_rollback")
            self._manager.reload()
        return newer

    def _resolve_step(self, step: int | None) -> int:
        steps = self._manager.all_steps()
        if step is None:
            if not steps:
                raise WorkdirNotFoundError(f"No complete checkpoint in {self.directory}.")
            return max(steps)
        if step not in steps:
            raise WorkdirNotFoundError(
                f"No checkpoint at step {step} in {self.directory}; kept steps: {sorted(steps)}."
            )
        return int(step)

    def check_for_errors(self) -> None:
        """Raises `CheckpointSaveError` if an asynchronous save has failed since the last call.

        Cheap (it reads a flag the background thread sets), so a train loop calls it every
        step and stops at the first failure instead of at the next save.
        """
        try:
            self._manager.check_for_errors()
        except Exception as e:
            latest = self.all_steps()
            raise CheckpointSaveError(
                f"Saving a checkpoint to {self.directory} failed ({first_line(e)}); stopping. "
                f"The checkpoints written before it are intact (newest: step "
                f"{latest[-1] if latest else None}); free space or fix the directory, then run "
                "again to resume."
            ) from e

    def wait_until_finished(self) -> None:
        """Blocks until pending async saves and removals of old steps are done."""
        self._manager.wait_until_finished()
        self.check_for_errors()
        if self._trash_job is not None:
            self._trash_job.result()
        dirs.empty_trash(self.directory)

    def close(self) -> None:
        """Waits for pending saves and removals, and releases the manager's threads."""
        self._manager.close()
        self._trash_pool.shutdown(wait=True)
        dirs.empty_trash(self.directory)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
