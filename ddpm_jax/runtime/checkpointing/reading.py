"""Reading a workdir's checkpoints without changing anything: for sampling and evaluation."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm_jax.errors import WorkdirError, WorkdirNotFoundError
from ddpm_jax.runtime import sharding as sharding_lib
from ddpm_jax.runtime.checkpointing import dirs
from ddpm_jax.runtime.checkpointing.items import (
    EXTRA_ITEM,
    STATE_ITEM,
    check_structure,
    first_line,
)
from ddpm_jax.runtime.workdir import checkpoint_dir

PyTree = Any


def complete_steps(workdir: str | os.PathLike) -> list[int]:
    """Steps of the complete checkpoints in `workdir`, ascending (reads only)."""
    directory = checkpoint_dir(workdir)
    return sorted(s for s, p in dirs.step_dirs(directory).items() if not dirs.missing_markers(p))


def latest_step(workdir: str | os.PathLike) -> int | None:
    """The newest complete checkpoint step in `workdir`, or None (reads only)."""
    steps = complete_steps(workdir)
    return steps[-1] if steps else None


class _DropReadOnlyNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Given directory is read only")


@contextlib.contextmanager
def _read_only_manager(directory: str) -> Iterator[ocp.CheckpointManager]:
    """A read-only manager of the state and extra items (without orbax's notice saying so)."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(STATE_ITEM, ocp.args.PyTreeRestore, ocp.handlers.PyTreeCheckpointHandler)
    registry.add(EXTRA_ITEM, ocp.args.JsonRestore, ocp.handlers.JsonCheckpointHandler)
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    absl_logger, quiet = logging.getLogger("absl"), _DropReadOnlyNotice()
    absl_logger.addFilter(quiet)
    try:
        manager = ocp.CheckpointManager(directory, options=options, handler_registry=registry)
    finally:
        absl_logger.removeFilter(quiet)
    try:
        yield manager
    finally:
        manager.close()


def restore_subtree(
    workdir: str | os.PathLike,
    key: str = "ema_params",
    abstract: PyTree | None = None,
    *,
    step: int | None = None,
    sharding: jax.sharding.Sharding | None = None,
) -> tuple[PyTree, int]:
    """Restores one top-level field of the saved state (e.g. `ema_params`) and nothing else.

    No optimizer or train state needs to be built: a sampling job calls
    `restore_subtree(workdir, "ema_params")` and gets the parameter pytree. Nothing in the
    workdir is changed: without `step`, a newest checkpoint that cannot be read is skipped
    with a warning and the next older one is used.

    Args:
      workdir: the training run's workdir.
      key: the field of the saved state: an attribute of a dataclass state or a dict key.
      abstract: optional target for the subtree (ShapeDtypeStructs or arrays); leaves without
        a sharding get `sharding`. Default: shapes and dtypes from the checkpoint's metadata.
      step: which checkpoint; default the newest that restores.
      sharding: sharding for leaves that have none; default replicated over all devices.

    Returns:
      (subtree, step): the subtree, as saved (nested dicts of `jax.Array`), on `sharding`,
      and the step it was restored from.

    Raises:
      WorkdirNotFoundError: no checkpoint in `workdir` (or none at `step`, or none readable).
      WorkdirError: `abstract` does not match the checkpoint, or `step` cannot be read.
      KeyError: `key` is not a top-level field of the saved state.
    """
    directory = checkpoint_dir(workdir)
    steps = complete_steps(workdir)
    if step is not None and int(step) not in steps:
        raise WorkdirNotFoundError(
            f"No checkpoint at step {step} in {directory}; kept steps: {steps}."
        )
    if not steps:
        raise WorkdirNotFoundError(f"No checkpoint in {directory}: train first.")
    if sharding is None:
        sharding = NamedSharding(sharding_lib.make_mesh(), P())

    def to_struct(x):
        s = getattr(x, "sharding", None)
        s = s if isinstance(s, jax.sharding.Sharding) else sharding
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    candidates = [int(step)] if step is not None else steps[::-1]
    with _read_only_manager(directory) as manager:
        for s in candidates:
            try:
                tree = manager.item_metadata(s)[STATE_ITEM].tree
            except Exception as e:
                reason = first_line(e)
            else:
                if not isinstance(tree, Mapping) or key not in tree:
                    fields = sorted(tree) if isinstance(tree, Mapping) else []
                    raise KeyError(f"{key!r} is not a field of the saved state; fields: {fields}.")
                wanted = tree[key] if abstract is None else abstract
                target = {key: jax.tree.map(to_struct, wanted)}
                if abstract is not None:
                    check_structure(target, {key: tree[key]}, s, directory)
                try:
                    out = manager.restore(
                        s,
                        args=ocp.args.Composite(
                            **{
                                STATE_ITEM: ocp.args.PyTreeRestore(
                                    item=target,
                                    restore_args=ocp.checkpoint_utils.construct_restore_args(
                                        target
                                    ),
                                    partial_restore=True,
                                )
                            }
                        ),
                    )
                    return out[STATE_ITEM][key], s
                except Exception as e:
                    reason = first_line(e)
            if step is not None:
                raise WorkdirError(
                    f"The checkpoint at step {s} in {directory} cannot be restored: {reason}"
                )
            logging.warning(
                "Checkpoint at step %d cannot be restored (%s); skipping it.", s, reason
            )
    raise WorkdirNotFoundError(f"No checkpoint in {directory} can be restored.")
