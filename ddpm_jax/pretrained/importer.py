"""`import_diffusers(source, workdir)`: a diffusers DDPM (Ho et al.'s releases) as a workdir.

    import ddpm_jax
    from ddpm_jax import pretrained

    pretrained.import_diffusers("google/ddpm-cifar10-32", "workdirs/cifar10_ho")
    sampler = ddpm_jax.load_sampler("workdirs/cifar10_ho")

The workdir it writes is an ordinary one: a full config.json (the package defaults, with the
model, data and diffusion groups of the imported model) and one checkpoint at step 0 whose
state is `{"step", "params", "ema_params"}` (both trees the imported weights) and whose
extra records where they came from (`imported_from`, `revision`, `sha256` of each file).
Sampling (`load_sampler`, `--mode=sample`) and evaluation (`--mode=eval`) read it unchanged;
training refuses it (there is no optimizer state to resume).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any

import ml_collections
import numpy as np

from ddpm_jax import files
from ddpm_jax.errors import DataError, WorkdirError
from ddpm_jax.pretrained import diffusers_unet, hub, weights
from ddpm_jax.pretrained import repo as repo_lib

IMPORT_STEP = 0
# The datasets of Ho et al.'s released models: hub name -> config.data fields, and the split
# its evaluation reads (config.eval.split).
HO_DATA = (
    (r"ddpm-(ema-)?cifar10-32", {"name": "cifar10", "random_flip": True}, "test"),
    (r"ddpm-(ema-)?celebahq-256", {"name": "celeb_a_hq/256", "random_flip": True}, "train"),
    (r"ddpm-(ema-)?church-256", {"name": "lsun/church_outdoor", "random_flip": True}, "validation"),
    (r"ddpm-(ema-)?bedroom-256", {"name": "lsun/bedroom", "random_flip": True}, "validation"),
    (r"ddpm-(ema-)?cat-256", {"name": "lsun/cat", "random_flip": True}, "train"),
)
UNKNOWN_DATA = "unknown"


@dataclasses.dataclass(frozen=True)
class ImportResult:
    """What `import_diffusers` wrote.

    Attributes:
      workdir: the workdir (absolute path).
      config: the config written to config.json.
      step: the checkpoint's step.
      extra: the checkpoint's extra (imported_from, revision, sha256).
      num_params: parameters of the imported U-Net.
    """

    workdir: str
    config: ml_collections.ConfigDict
    step: int
    extra: dict[str, Any]
    num_params: int


def import_diffusers(
    source: str,
    workdir: str,
    *,
    data_name: str | None = None,
    api: Any = None,
    cache_dir: str | None = None,
) -> ImportResult:
    """Imports a diffusers `UNet2DModel` + `DDPMScheduler` repository into a new workdir.

    Args:
      source: a local directory (either layout: root files, or unet/ + scheduler/) or a hub
        id, optionally pinned: "google/ddpm-cifar10-32", "google/ddpm-church-256@<commit>".
      workdir: the workdir to write; it must hold no checkpoint yet. Relative paths and `~`
        are resolved here.
      data_name: `config.data.name` of the dataset the model was trained on (a TFDS name or
        "digits"); None: recognised from Ho et al.'s repository names, else "unknown".
      api: a `huggingface_hub.HfApi` for hub sources (tests pass a stand-in).
      cache_dir: huggingface_hub's cache directory for hub sources.

    Returns:
      An `ImportResult`.

    Raises:
      WorkdirError: `workdir` already holds checkpoints, or a config.json of another run.
      ConfigError: a config field the U-Net or the diffusion cannot express (named).
      DataError, DataNotFoundError: a missing or unreadable file, pickled weights only, a
        checksum mismatch, weights that do not fit config.json, or no network for a hub id.
    """
    from ddpm_jax.runtime import checkpointing
    from ddpm_jax.runtime import workdir as wd

    workdir = files.resolve_path(workdir)
    ckpt_dir = wd.checkpoint_dir(workdir)
    if os.path.isdir(ckpt_dir) and [n for n in os.listdir(ckpt_dir) if not n.startswith(".")]:
        raise WorkdirError(
            f"{workdir} already holds checkpoints ({ckpt_dir}); import into a new --workdir."
        )
    repo = resolve_source(source, api=api, cache_dir=cache_dir)
    config = make_config(repo, data_name)
    if wd.has_config(workdir) and _read_json(os.path.join(workdir, wd.CONFIG_FILE)) != (
        wd.config_as_dict(config)
    ):  # the same config: an import that stopped before its checkpoint, run again.
        raise WorkdirError(
            f"{workdir} already has a config.json of another run; import into a new --workdir."
        )
    params, num_params = load_params(repo, config)
    sha = {name: files.sha256_file(path) for name, path in sorted(repo.files.items())}
    extra = {
        "data_step": IMPORT_STEP,
        "imported_from": repo.source,
        "revision": repo.revision,
        "sha256": sha,
    }
    state = {"step": np.int32(IMPORT_STEP), "params": params, "ema_params": params}
    wd.write_config(config, workdir)  # first: a crash before the checkpoint can be re-run.
    with checkpointing.Checkpointer(workdir, save_every_steps=1, async_save=False) as ckpt:
        ckpt.save(IMPORT_STEP, state, extra, force=True)
    logging.info(
        "Imported %s%s (%d parameters) into %s: sample with ddpm-jax sample --workdir=%s.",
        repo.source, f"@{repo.revision}" if repo.revision else "", num_params, workdir, workdir,
    )  # fmt: skip
    return ImportResult(workdir, config, IMPORT_STEP, extra, num_params)


def resolve_source(source: str, *, api: Any = None, cache_dir: str | None = None):
    """The `repo.Repo` of a local directory or a hub id (downloaded, pinned, checksummed)."""
    if not isinstance(source, str) or not source:
        raise DataError(f"--source={source!r}: give a directory or a hub id.")
    path = files.resolve_path(source)
    local_like = source.startswith((".", "/", "~")) or os.path.exists(path)
    parsed = None if local_like else hub.parse_hub_id(source)
    if parsed is None:
        return repo_lib.local(path)
    return hub.download(*parsed, api=api, cache_dir=cache_dir)


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path} cannot be read as JSON: {e}") from e
    if not isinstance(value, dict):
        raise DataError(f"{path} holds no JSON object.")
    return value


def data_fields(repo: repo_lib.Repo, data_name: str | None) -> tuple[dict[str, Any], str]:
    """`config.data` fields naming the dataset the model is of, and its evaluation split.

    The repository's own name decides (a hub id, or a local directory's name; see
    `HO_DATA`), never the `_name_or_path` of its config.json: a model fine-tuned from Ho et
    al.'s keeps theirs. Unknown datasets are evaluated on "test".
    """
    if data_name is not None:
        known = [(f, split) for _, f, split in HO_DATA if f["name"] == data_name]
        return (
            (dict(known[0][0]), known[0][1])
            if known
            else ({"name": data_name, "random_flip": False}, "test")
        )
    candidates = [repo.source, os.path.basename(os.path.normpath(repo.source))]
    for pattern, data, split in HO_DATA:
        if any(re.search(rf"(^|/){pattern}$", c) for c in candidates):
            return dict(data), split
    logging.warning(
        "The dataset %s was trained on is not known: config.data.name = %r (sampling works; "
        "to evaluate, import again with --data_name=<its TFDS name>).",
        repo.source, UNKNOWN_DATA,
    )  # fmt: skip
    return {"name": UNKNOWN_DATA, "random_flip": False}, "test"


def make_config(repo: repo_lib.Repo, data_name: str | None = None) -> ml_collections.ConfigDict:
    """The full config of the imported model: the package defaults, with its groups.

    Raises:
      ConfigError: a field of the U-Net or scheduler config that cannot be imported, or a
        resulting config that does not pass `ExperimentConfig`'s checks.
    """
    from ddpm_jax.experiment import ExperimentConfig, defaults

    unet = _read_json(repo.path(repo.unet_config))
    scheduler = _read_json(repo.path(repo.scheduler_config))
    where = f"{repo.source}/{repo.unet_config}"
    model, image_size, channels = diffusers_unet.model_group(unet, where)
    diffusion = diffusers_unet.diffusion_group(scheduler, f"{repo.source}/{repo.scheduler_config}")
    data, eval_split = data_fields(repo, data_name)
    config = defaults.get_config()
    config.data.update({**data, "image_size": image_size, "channels": channels})
    config.eval.split = eval_split
    config.model.update(model)
    config.diffusion.update(diffusion)
    if image_size >= 256:  # as configs/celeba_hq256.py and lsun256.py
        config.sampling.batch_size = config.eval.batch_size = 64
    ExperimentConfig.from_config(config)  # every field checked before anything is written.
    return config


def load_params(repo: repo_lib.Repo, config: ml_collections.ConfigDict) -> tuple[Any, int]:
    """The imported weights as our params tree (float32 numpy), and their count."""
    import jax

    from ddpm_jax.experiment import Experiment

    experiment = Experiment.from_config(config)
    abstract = jax.eval_shape(experiment.init_params, jax.random.PRNGKey(0))
    tensors = weights.read_safetensors(repo.path(repo.weights))
    where = f"{repo.source}/{repo.weights}"
    params = weights.convert(tensors, abstract, len(experiment.config.model.ch_mult), where)
    return params, sum(int(x.size) for x in jax.tree.leaves(params))
