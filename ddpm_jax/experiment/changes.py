"""Which config changes a workdir accepts, and the workdir's config as a run reads it.

A workdir's `config.json` fixes what was trained. Two kinds of later run meet it:

- a resumed training run: a change of what defines the network, its data or the random
  streams is refused (`RESUME_REFUSED`), one that alters how the run continues is accepted
  with a warning, the rest (run length, cadences, where the data is) is free
  (`classify_resume_changes`);
- a sampling or evaluation run: the trained groups come from config.json, how to sample and
  evaluate from the command line (`resolve_config`), and of the trained fields only the
  reverse-process variance and clipping may change (`apply_overrides`, `run_config`).

`read_config` reads config.json as the current version understands it: fields added since it
was written take their defaults (`defaults.py`), renamed fields their new names.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Mapping
from typing import Any

import ml_collections

from ddpm_jax import files
from ddpm_jax.diffusion import FIXED_VARIANCES
from ddpm_jax.errors import WorkdirError
from ddpm_jax.experiment import defaults
from ddpm_jax.runtime import workdir as wd

# Groups a sampling/eval command line may set: how and where to run, not what was trained.
RUN_GROUPS = ("sampling", "eval", "mesh")
# Fields of the trained groups that only say where things are on this machine.
LOCAL_FIELDS = ("data.data_dir", "data.num_workers", "data.path")
# What was trained: always taken from the workdir's config.json when sampling or evaluating.
TRAINED_GROUPS = ("data", "model", "diffusion", "edm")
# Trained fields that a sampler may still change (the reverse-process variance is a sampling
# choice in Ho et al.).
SAMPLING_DIFFUSION_FIELDS = ("diffusion.variance", "diffusion.clip_denoised")
# Config fields that hold paths (a URL or an absolute path after `resolve_config_paths`).
PATH_FIELDS = (
    "data.data_dir",
    "data.path",
    "eval.inception_weights",
    "eval.fid_cache_dir",
    "eval.reference_file",
)

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
    "diffusion.timestep_proposal",
    "diffusion.formulation",
    "diffusion.rescale_zero_terminal_snr",
    "edm.sigma_data",
    "edm.p_mean",
    "edm.p_std",
    "training.batch_size",
    "training.seed",
    # The power EMAs in the train state: one that was not tracked from step 1 has no history.
    "optim.ema_profiles",
)
# Changes that alter how the run continues but not what it is: accepted with a warning.
# Every other field (run length, logging and saving cadence, sampling, evaluation, mesh,
# where the data is) changes freely. All accepted changes are kept in config_history.jsonl.
RESUME_WARNED_GROUPS = ("optim", "diffusion", "model", "data")
RESUME_WARNED_FIELDS = ("training.grad_accum_steps", "training.label_dropout")

# Fields of earlier versions, under their current names (None: the field was removed).
RENAMED_FIELDS: dict[str, str | None] = {
    "diffusion.timestep_sampler": "diffusion.timestep_proposal",
    "data.eval_split": None,  # the evaluation split is eval.split.
}


# --------------------------------------------------------------------------- reading


def resolve_config_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` whose `PATH_FIELDS` are resolved with `files.resolve_path`."""
    config = ml_collections.ConfigDict(config.to_dict())
    for path in PATH_FIELDS:
        group, field = path.split(".")
        if group in config and field in config[group] and config[group][field] is not None:
            config[group][field] = files.resolve_path(config[group][field])
    return config


def upgrade(saved: Mapping[str, Any], source: str = "the config") -> dict[str, Any]:
    """A config of an earlier version in the current form: renamed fields moved, removed ones
    dropped, fields added since set to their defaults (`defaults.get_config`)."""
    saved = {g: dict(v) if isinstance(v, Mapping) else v for g, v in saved.items()}
    for old, new in RENAMED_FIELDS.items():
        group, field = old.split(".")
        if isinstance(saved.get(group), dict) and field in saved[group]:
            value = saved[group].pop(field)
            if new is not None:
                new_group, new_field = new.split(".")
                saved.setdefault(new_group, {}).setdefault(new_field, value)
    added = []
    merged = wd.config_as_dict(defaults.get_config())
    for group, values in saved.items():
        if isinstance(values, Mapping) and isinstance(merged.get(group), Mapping):
            added += [f"{group}.{k}" for k in merged[group] if k not in values]
            merged[group] = {**merged[group], **values}
        else:
            merged[group] = values
    added += [g for g in merged if g not in saved]
    if added:
        logging.info("%s predates field(s) %s: using their defaults.", source, ", ".join(added))
    return merged


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """`<workdir>/config.json` in the current form (see `upgrade`), as a new ConfigDict.

    Raises:
      WorkdirNotFoundError, WorkdirError: as `runtime.workdir.read_config_json`.
    """
    path = f"{workdir}/{wd.CONFIG_FILE}"
    return ml_collections.ConfigDict(upgrade(wd.read_config_json(workdir), path))


# --------------------------------------------------------------------------- resuming


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
    a, b = flatten(wd.config_as_dict(old)), flatten(wd.config_as_dict(new))
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


# --------------------------------------------------------------------------- sampling, eval


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
    given, trained = flatten(wd.config_as_dict(config)), flatten(wd.config_as_dict(saved))
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
