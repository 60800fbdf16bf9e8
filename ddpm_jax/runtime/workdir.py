"""The workdir contract: where a run keeps what, its config.json, atomic writes, its owner.

A workdir holds one model's whole life:

    config.json            the resolved config of the last accepted training run
    config_history.jsonl   every accepted change of config.json on resume (one JSON per line)
    checkpoints/<step>/    orbax checkpoints (`ddpm_jax.runtime.checkpointing`)
    metrics.jsonl          training scalars (and TensorBoard event files beside it)
    samples_<step>.png     sample grids written while training
    samples/               `--mode=sample` output; eval/: `--mode=eval` output
    .lock                  the owner of a running training job (host, pid, start time)

Sampling and evaluation read the model, data and schedule from config.json and take only how
to sample and evaluate from their own config (`resolve_config`); training checks a new config
against config.json before it writes anything (`config_changes` and the field lists below).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import ml_collections

from ddpm_jax.diffusion import FIXED_VARIANCES
from ddpm_jax.errors import WorkdirError, WorkdirNotFoundError

CONFIG_FILE = "config.json"
CONFIG_HISTORY_FILE = "config_history.jsonl"
CHECKPOINT_SUBDIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
SAMPLES_SUBDIR = "samples"
EVAL_SUBDIR = "eval"
LOCK_FILE = ".lock"

# Groups a sampling/eval command line may set: how and where to run, not what was trained.
RUN_GROUPS = ("sampling", "eval", "mesh")
# Fields of the trained groups that only say where things are on this machine.
LOCAL_FIELDS = ("data.data_dir", "data.num_workers", "data.path")
# What was trained: always taken from the workdir's config.json when sampling or evaluating.
TRAINED_GROUPS = ("data", "model", "diffusion")
# Trained fields that a sampler may still change (the reverse-process variance is a sampling
# choice in Ho et al.).
SAMPLING_DIFFUSION_FIELDS = ("diffusion.variance", "diffusion.clip_denoised")

# On resume, a change of these is refused unless training.allow_config_change = True: they
# define the network and the data it was trained on, or the data order and the random
# streams that make a resumed run bit-identical to an uninterrupted one.
RESUME_REFUSED = (
    "data.source",
    "data.name",
    "data.split",
    "data.image_size",
    "data.channels",
    "data.eval_fraction",
    "model.ch",
    "model.ch_mult",
    "model.num_res_blocks",
    "model.attn_resolutions",
    "model.num_heads",
    "model.resblock_updown",
    "model.conv_resample",
    "model.out_channels",
    "model.num_classes",
    "model.norm_groups",
    "diffusion.schedule",
    "diffusion.num_timesteps",
    "diffusion.beta_start",
    "diffusion.beta_end",
    "diffusion.parameterization",
    "diffusion.timestep_sampler",
    "training.batch_size",
    "training.seed",
)
# Changes that alter how the run continues but not what it is: accepted with a warning.
# Every other field (run length, logging and saving cadence, sampling, evaluation, mesh,
# where the data is) changes freely. All accepted changes are kept in config_history.jsonl.
RESUME_WARNED_GROUPS = ("optim", "diffusion", "model", "data")
RESUME_WARNED_FIELDS = ("training.grad_accum_steps",)


def resolve_path(path: str | os.PathLike | None) -> str | None:
    """A user-given path as the program should use it: `~` expanded and made absolute.

    Relative paths are taken from the current directory, once, where the program starts;
    orbax, TensorStore and Grain workers all need absolute paths. URLs (`gs://...`) and None
    are returned as they are.
    """
    if path is None:
        return None
    path = os.fspath(path)
    if "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


# Config fields that hold paths (a URL or an absolute path after `resolve_config_paths`).
PATH_FIELDS = ("data.data_dir", "data.path", "eval.inception_weights", "eval.fid_cache_dir")


def resolve_config_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` whose `PATH_FIELDS` are resolved with `resolve_path`."""
    config = ml_collections.ConfigDict(config.to_dict())
    for path in PATH_FIELDS:
        group, field = path.split(".")
        if group in config and field in config[group] and config[group][field] is not None:
            config[group][field] = resolve_path(config[group][field])
    return config


def checkpoint_dir(workdir: str | os.PathLike) -> str:
    """`<workdir>/checkpoints`, the directory of the step directories."""
    return os.path.join(os.fspath(workdir), CHECKPOINT_SUBDIR)


# --------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Opens `<path>.tmp` for writing and renames it to `path` once the block succeeds.

    A reader (or a run killed mid-write) never sees a partial file under `path`; if the block
    raises, the temporary file is removed and `path` keeps its old content.
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    try:
        with open(tmp, mode) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Writes `data` to `path` atomically (see `atomic_writer`)."""
    with atomic_writer(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def write_json(path: str | os.PathLike, value: Any, *, sort_keys: bool = True) -> None:
    """Writes `value` as indented JSON (keys sorted unless `sort_keys=False`), atomically."""
    atomic_write(path, json.dumps(value, indent=2, sort_keys=sort_keys) + "\n")


# --------------------------------------------------------------------------- config.json


def config_as_dict(config: ml_collections.ConfigDict | Mapping) -> dict[str, Any]:
    """The JSON-normal form of a config (tuples become lists), for writing and comparing."""
    if isinstance(config, ml_collections.ConfigDict):
        return json.loads(config.to_json_best_effort(sort_keys=True))
    return json.loads(json.dumps(config, sort_keys=True))


def write_config(config: ml_collections.ConfigDict | Mapping, workdir: str) -> None:
    """Writes the resolved config to `<workdir>/config.json` (read back by sampling/eval)."""
    os.makedirs(workdir, exist_ok=True)
    write_json(os.path.join(workdir, CONFIG_FILE), config_as_dict(config))


def has_config(workdir: str) -> bool:
    """True if `<workdir>/config.json` exists."""
    return os.path.exists(os.path.join(workdir, CONFIG_FILE))


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """Reads the resolved config a training run (or an import) wrote to `<workdir>/config.json`.

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
            "import weights with python -m ddpm_jax.pretrained)."
        )
    try:
        with open(path) as f:
            saved = json.load(f)
    except json.JSONDecodeError as e:
        raise WorkdirError(f"{path} is not valid JSON ({e}); restore it from a backup.") from e
    return ml_collections.ConfigDict(_with_new_fields(saved, path))


def _with_new_fields(saved: dict[str, Any], path: str) -> dict[str, Any]:
    """A config.json of an earlier version, with the fields added since set to their defaults."""
    from ddpm_jax.experiment import defaults  # the layer above; imported when first needed.

    added = []
    merged = config_as_dict(defaults.get_config())
    for group, values in saved.items():
        if isinstance(values, Mapping) and isinstance(merged.get(group), Mapping):
            added += [f"{group}.{k}" for k in merged[group] if k not in values]
            merged[group] = {**merged[group], **values}
        else:
            merged[group] = values
    added += [g for g in merged if g not in saved]
    if added:
        logging.info("%s predates field(s) %s: using their defaults.", path, ", ".join(added))
    return merged


def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"group.field": value} of a nested mapping."""
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@dataclasses.dataclass(frozen=True)
class FieldChange:
    """One field whose value differs between two configs (None: absent from that config)."""

    field: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.field} ({self.old!r} -> {self.new!r})"


def config_changes(old: Mapping, new: Mapping) -> list[FieldChange]:
    """The fields whose values differ between two configs, sorted by name."""
    a, b = flatten(config_as_dict(old)), flatten(config_as_dict(new))
    return [
        FieldChange(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
    ]


def classify_resume_changes(
    changes: list[FieldChange],
) -> tuple[list[FieldChange], list[FieldChange], list[FieldChange]]:
    """Splits resume changes into (refused, warned, free); see `RESUME_REFUSED`."""
    refused, warned, free = [], [], []
    for c in changes:
        if c.field in RESUME_REFUSED:
            refused.append(c)
        elif c.field in RESUME_WARNED_FIELDS or (
            c.field.split(".")[0] in RESUME_WARNED_GROUPS and c.field not in LOCAL_FIELDS
        ):
            warned.append(c)
        else:
            free.append(c)
    return refused, warned, free


def append_config_history(workdir: str, step: int, changes: list[FieldChange]) -> None:
    """Appends one accepted change set (resuming at `step`) to config_history.jsonl."""
    record = {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "resumed_at_step": int(step),
        "changes": {c.field: [c.old, c.new] for c in changes},
    }
    with open(os.path.join(workdir, CONFIG_HISTORY_FILE), "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def resolve_config(
    config: ml_collections.ConfigDict | None, workdir: str, *, overridden: Collection[str] = ()
) -> ml_collections.ConfigDict:
    """The config of a sampling or evaluation run on `workdir`.

    `data`, `model`, `diffusion` (and the rest) come from `<workdir>/config.json`, the config
    the checkpoint was trained with; `sampling`, `eval` and `mesh` come from `config` (the
    command line), as do `data.data_dir` and `data.num_workers` unless None there. Trained
    fields on which the two differ are logged as a warning and the workdir's values win.
    With `config` None, everything comes from config.json. Fields in `overridden` (set
    afterwards by `apply_overrides`, see `run_config`) are not warned about.

    Returns:
      A new, unlocked ConfigDict.
    """
    saved = read_config(workdir)
    if config is None:
        return saved
    given, trained = flatten(config_as_dict(config)), flatten(config_as_dict(saved))
    ignored = sorted(
        k
        for k in set(given) | set(trained)
        if k.split(".")[0] in TRAINED_GROUPS
        and k not in LOCAL_FIELDS
        and k not in overridden
        and given.get(k) != trained.get(k)
    )
    if ignored:
        logging.warning(
            "The config differs from %s/config.json in trained field(s) %s; using the "
            "workdir's values (only %s, %s may change after training).",
            workdir,
            ", ".join(f"{k} ({given.get(k)!r} -> {trained.get(k)!r})" for k in ignored),
            "/".join(RUN_GROUPS),
            ", ".join(LOCAL_FIELDS),
        )
    merged = ml_collections.ConfigDict(saved.to_dict())
    for group in RUN_GROUPS:
        if group in config:
            merged[group] = ml_collections.ConfigDict(config[group].to_dict())
    for path in LOCAL_FIELDS:
        group, field = path.split(".")
        value = config[group].get(field) if group in config else None
        if value is not None:  # unset (None): where the training run had it.
            merged[group][field] = value
    return merged


def run_config(
    config: ml_collections.ConfigDict | None,
    workdir: str,
    overrides: Mapping[str, Any] | None = None,
) -> ml_collections.ConfigDict:
    """The config of a sampling or evaluation run: `resolve_config`, then `apply_overrides`.

    The overrides come last, so that the trained fields a sampler may change
    (`diffusion.variance`, `diffusion.clip_denoised`) take effect although `resolve_config`
    keeps the workdir's trained values.
    """
    overrides = dict(overrides or {})
    return apply_overrides(resolve_config(config, workdir, overridden=overrides), overrides)


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Mapping[str, Any] | None
) -> ml_collections.ConfigDict:
    """Returns a copy of `config` with dotted-path overrides, e.g. {"sampling.batch_size": 64}.

    Raises:
      WorkdirError: a path outside `sampling`, `eval`, `mesh`, `data.data_dir`,
        `data.num_workers`, `diffusion.variance`, `diffusion.clip_denoised` (the checkpoint
        fixes the rest), one that names no existing field, or a `diffusion.variance` change
        to or from a learned variance.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    for path, value in (overrides or {}).items():
        parts = path.split(".")
        allowed = parts[0] in RUN_GROUPS or path in LOCAL_FIELDS + SAMPLING_DIFFUSION_FIELDS
        if len(parts) != 2 or not allowed:
            raise WorkdirError(
                f"config.{path} cannot be changed for sampling or evaluation: the model, data "
                "and schedule are fixed by the checkpoint; only the groups "
                f"{'/'.join(RUN_GROUPS)} and {', '.join(LOCAL_FIELDS + SAMPLING_DIFFUSION_FIELDS)} "
                "may change."
            )
        group, field = parts
        if group not in config or field not in config[group]:
            raise WorkdirError(f"config.{path} names no field of the config.")
        _check_variance_change(path, config[group][field], value)
        config[group][field] = value
    return config


def _check_variance_change(path: str, trained: Any, value: Any) -> None:
    """A sampler may swap one fixed variance for the other; a learned one is in the network."""
    if path != "diffusion.variance" or value == trained:
        return
    if trained not in FIXED_VARIANCES or value not in FIXED_VARIANCES:
        raise WorkdirError(
            f"config.diffusion.variance = {value!r}: the checkpoint was trained with "
            f"{trained!r}; sampling and evaluation may switch only between "
            f"{' and '.join(map(repr, FIXED_VARIANCES))} (a learned variance is an output of "
            "the network)."
        )


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
        os.makedirs(self.workdir, exist_ok=True)
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
