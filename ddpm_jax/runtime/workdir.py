"""The workdir contract: where a run keeps what, its config.json, its owner.

A workdir holds one model's whole life:

    config.json            the resolved config of the last accepted training run
    config_history.jsonl   every accepted change of config.json on resume (one JSON per line)
    checkpoints/<step>/    orbax checkpoints (`ddpm_jax.runtime.checkpointing`)
    ema_snapshots/<step>/  snapshots of the power EMAs of optim.ema_profiles, all kept
    emas/<name>/           post-hoc EMAs reconstructed from them by `ddpm-jax ema`
    metrics.jsonl          training scalars (and TensorBoard event files beside it)
    samples_<step>.png     sample grids written while training
    samples/               `--mode=sample` output; eval/: `--mode=eval` output
    .lock                  the owner of a running training job (host, pid, start time)

Which config changes a workdir accepts, on resume and for sampling or evaluation, is the
experiment layer's policy (`ddpm_jax.experiment.changes`); this module only reads and writes.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections

from ddpm_jax import files
from ddpm_jax.errors import WorkdirError, WorkdirNotFoundError

CONFIG_FILE = "config.json"
CONFIG_HISTORY_FILE = "config_history.jsonl"
CHECKPOINT_SUBDIR = "checkpoints"
EMA_SNAPSHOT_SUBDIR = "ema_snapshots"
NAMED_EMA_SUBDIR = "emas"
METRICS_FILE = "metrics.jsonl"
SAMPLES_SUBDIR = "samples"
EVAL_SUBDIR = "eval"
LOCK_FILE = ".lock"


def checkpoint_dir(workdir: str | os.PathLike) -> str:
    """`<workdir>/checkpoints`, the directory of the step directories."""
    return os.path.join(os.fspath(workdir), CHECKPOINT_SUBDIR)


def make_workdir(workdir: str) -> str:
    """Creates `workdir` (and its parents) if needed; returns it.

    Raises:
      WorkdirError: the path exists and is not a directory, or cannot be created (a
        read-only or virtual file system, no permission), naming the path and the cause.
    """
    if "://" in workdir:
        return workdir
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(
            f"--workdir={workdir} is an existing file, not a directory; choose a directory "
            "(a new one is created)."
        )
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise WorkdirError(
            f"--workdir={workdir} cannot be created ({e.strerror or type(e).__name__}); choose "
            "a directory you can write to."
        ) from e
    return workdir


def check_workdir(workdir: str) -> str:
    """Raises as `make_workdir` would for a path that cannot be a workdir, creating nothing.

    A missing directory is created to see that it can be, then removed again (with every
    parent this created), so that a run which stops later for another reason leaves nothing.
    """
    if "://" in workdir or os.path.isdir(workdir):
        return workdir
    top = os.path.abspath(workdir)
    while not os.path.exists(os.path.dirname(top)) and os.path.dirname(top) != top:
        top = os.path.dirname(top)
    make_workdir(workdir)
    if not os.path.exists(top):  # an existing file, reported by make_workdir.
        return workdir
    for root, _, names in os.walk(top, topdown=False):
        if not names:
            os.rmdir(root)
    return workdir


# --------------------------------------------------------------------------- config.json


def config_as_dict(config: ml_collections.ConfigDict | Mapping) -> dict[str, Any]:
    """The JSON-normal form of a config (tuples become lists), for writing and comparing."""
    if isinstance(config, ml_collections.ConfigDict):
        return json.loads(config.to_json_best_effort(sort_keys=True))
    return json.loads(json.dumps(config, sort_keys=True))


def write_config(config: ml_collections.ConfigDict | Mapping, workdir: str) -> None:
    """Writes the resolved config to `<workdir>/config.json` (read back by sampling/eval)."""
    make_workdir(workdir)
    files.write_json(os.path.join(workdir, CONFIG_FILE), config_as_dict(config))


def has_config(workdir: str) -> bool:
    """True if `<workdir>/config.json` exists."""
    return os.path.exists(os.path.join(workdir, CONFIG_FILE))


def read_config_json(workdir: str) -> dict[str, Any]:
    """The config a training run (or an import) wrote to `<workdir>/config.json`, as written.

    Fields of an earlier version are not updated here: `experiment.changes.read_config` does.

    Raises:
      WorkdirNotFoundError: no config.json (with what to do when checkpoints exist).
      WorkdirError: config.json is not valid JSON.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        if os.path.isdir(checkpoint_dir(workdir)) and os.listdir(checkpoint_dir(workdir)):
            raise WorkdirNotFoundError(
                f"{path} is missing but {checkpoint_dir(workdir)} holds checkpoints: the model "
                "they hold is described only by config.json; restore it from a backup (or "
                "write it again with the training config: ddpm_jax.runtime.workdir."
                "write_config(config, workdir))."
            )
        raise WorkdirNotFoundError(
            f"{path} not found: {workdir} is not a ddpm_jax workdir (train there first, or "
            "import weights with ddpm-jax-import)."
        )
    try:
        with open(path) as f:
            saved = json.load(f)
    except json.JSONDecodeError as e:
        raise WorkdirError(f"{path} is not valid JSON ({e}); restore it from a backup.") from e
    if not isinstance(saved, dict):
        raise WorkdirError(f"{path} holds no config (a JSON object); restore it from a backup.")
    return saved


def append_config_history(workdir: str, step: int, changes: Iterable[Any]) -> None:
    """Appends one accepted change set (resuming at `step`) to config_history.jsonl.

    `changes`: objects with `field`, `old` and `new` (`experiment.changes.FieldChange`).
    """
    record = {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "resumed_at_step": int(step),
        "changes": {c.field: [c.old, c.new] for c in changes},
    }
    with open(os.path.join(workdir, CONFIG_HISTORY_FILE), "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- the owner lock


class WorkdirLock:
    """An exclusive lock on a workdir for one training run, with its owner written inside.

    `fcntl.flock` on `<workdir>/.lock`: the kernel releases it when the owner exits, however
    it exits (`kill -9` included), so a lock is held exactly while its run lives. The file's
    content (host, pid, start time) names the owner for the message a second run gets; a file
    left by a run that died is stale, reported and taken over. URLs (gs://...) are not locked.
    """

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> WorkdirLock:
        """Takes the lock or raises `WorkdirError` naming the run that holds it."""
        if "://" in self.workdir:
            return self
        make_workdir(self.workdir)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise WorkdirError(
                f"{self.workdir} is in use by another training run ({self._owner()}); two "
                "runs on one workdir would delete each other's checkpoints. Stop that run "
                "first, or use another --workdir."
            ) from None
        previous = os.read(fd, 4096).decode(errors="replace").strip()
        if previous:
            logging.warning(
                "%s names an earlier run that has ended (%s): the lock was stale; taking it.",
                self.path,
                _describe_owner(previous),
            )
        owner = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        self._fd = fd
        return self

    def _owner(self) -> str:
        try:
            with open(self.path) as f:
                return _describe_owner(f.read())
        except OSError:
            return "owner unknown"

    def release(self) -> None:
        """Empties the owner record and releases the lock."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def _describe_owner(text: str) -> str:
    try:
        owner = json.loads(text)
        return f"host {owner['host']}, pid {owner['pid']}, since {owner['since']}"
    except (ValueError, KeyError, TypeError):
        return "owner unknown"
