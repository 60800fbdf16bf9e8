"""The step directories of `<workdir>/checkpoints`: which are complete, and moving them aside.

Layout under `<workdir>/checkpoints/`:

    <step>/                         a complete checkpoint (orbax renames it into place)
    <step>.orbax-checkpoint-tmp/    a save still being written, or cut short by a kill
    _deleted/<step>/                old steps on their way out (renamed here, then removed)
    _quarantine/<step>-<time>/      steps set aside, never deleted: incomplete, unreadable, or
                                    newer than the step a run was rolled back to; each holds
                                    `QUARANTINE_REASON.txt`

Only the primary process (process 0) changes anything here.
"""

from __future__ import annotations

import datetime
import logging
import os

import jax
from etils import epath

# Steps to delete are renamed here first: a step directory half removed by a killed
# `rmtree` would otherwise stay visible as a step.
TRASH_SUBDIR = "_deleted"
QUARANTINE_SUBDIR = "_quarantine"
QUARANTINE_REASON_FILE = "QUARANTINE_REASON.txt"
# Orbax's marker for a step still being written (`<step>.orbax-checkpoint-tmp`).
TMP_MARKER = ".orbax-checkpoint-tmp"
# Files orbax writes last into a complete step: the step's metadata and each item's.
_COMPLETE_MARKERS = ("_CHECKPOINT_METADATA", "state/_METADATA", "extra/metadata")


def is_primary() -> bool:
    """True on the process that manages the directory (process 0)."""
    return jax.process_index() == 0


def remove(paths: list[epath.Path]) -> None:
    """Removes files and directory trees, logging (not raising) what could not be removed."""
    for path in paths:
        try:
            path.rmtree() if path.is_dir() else path.unlink()
        except OSError as e:  # best effort: retried at the next save or restart.
            logging.warning("Could not remove %s: %s", path, e)


def empty_trash(directory: str) -> None:
    """Removes the steps renamed into the trash subdirectory (primary process only)."""
    trash = epath.Path(directory) / TRASH_SUBDIR
    if is_primary() and trash.exists():
        remove(list(trash.iterdir()))


def remove_partial_writes(directory: str) -> None:
    """Removes step directories a killed process left half-written (primary process only).

    Runs before the manager can start a save, and only while this process owns the workdir
    (`workdir.WorkdirLock`): another run's save in flight looks exactly the same. Orbax's own
    clean-up option is not used: it runs asynchronously and nothing waits for it when no save
    follows.
    """
    if is_primary():
        remove([p for p in epath.Path(directory).iterdir() if TMP_MARKER in p.name])


def step_dirs(directory: str) -> dict[int, epath.Path]:
    """{step: path} of the directories named by a step number (complete or not)."""
    root = epath.Path(directory)
    if not root.exists():
        return {}
    return {int(p.name): p for p in root.iterdir() if p.name.isdigit() and p.is_dir()}


def missing_markers(step_dir: epath.Path) -> list[str]:
    """The files of a complete checkpoint that `step_dir` lacks ([] when complete)."""
    return [m for m in _COMPLETE_MARKERS if not (step_dir / m).exists()]


def quarantine(directory: str, step: int, reason: str) -> str:
    """Moves step `step` to `_quarantine/<step>-<UTC time>/` with `reason`; returns the path.

    Never deletes: a checkpoint that will not restore today may still hold what someone needs.
    """
    src = epath.Path(directory) / str(step)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
    dest = epath.Path(directory) / QUARANTINE_SUBDIR / f"{step}-{stamp}"
    if is_primary():
        dest.parent.mkdir(parents=True, exist_ok=True)
        src.rename(dest)
        (dest / QUARANTINE_REASON_FILE).write_text(reason + "\n")
    return os.fspath(dest)


def quarantine_incomplete(directory: str) -> list[int]:
    """Moves every incomplete step directory (empty, or missing an item) aside; their steps."""
    moved = []
    for step, path in sorted(step_dirs(directory).items()):
        missing = missing_markers(path)
        if missing:
            reason = f"incomplete checkpoint: no {', '.join(missing)}"
            where = quarantine(directory, step, reason)
            logging.warning("Checkpoint at step %d is incomplete (no %s): moved to %s.",
                            step, ", ".join(missing), where)  # fmt: skip
            moved.append(step)
    return moved
