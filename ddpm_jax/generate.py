"""Sampling from a trained workdir: `load_sampler` for users' code and `--mode=sample`.

In a few lines::

    from ddpm_jax import generate

    sampler = generate.load_sampler("/tmp/ddpm_cifar10")           # EMA params, latest step
    images = sampler.sample(64, seed=0)                            # uint8 [64, H, W, C]
    fast = sampler.sample(64, seed=0, sampler="ddim", num_steps=50)

`generate(config, workdir)` (`--mode=sample`) writes `config.sampling.num_samples` images to
`<workdir>/samples/` in resumable chunks. A sampling or evaluation run takes the model, data
and schedule from the workdir's `config.json` and only how to sample/evaluate from its own
config (`resolve_config`). See `ddpm_jax.sampler` for the keys each image is drawn with.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import zipfile
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from ddpm_jax import metrics, train
from ddpm_jax import sharding as shd
from ddpm_jax.sampler import Sampler, chunk_sizes, from_process_0, raw_key, show_progress

__all__ = ["Sampler", "apply_overrides", "generate", "load_sampler", "resolve_config"]

# Groups a sampling/eval command line may set: how and where to run, not what was trained.
RUN_GROUPS = ("sampling", "eval", "mesh")
# Fields of the trained groups that only say where things are on this machine.
LOCAL_FIELDS = ("data.data_dir", "data.num_workers")
# What was trained: always taken from the workdir's config.json.
TRAINED_GROUPS = ("data", "model", "diffusion")
# Trained fields that a sampler may still change (the reverse-process variance is a sampling
# choice in Ho et al.).
SAMPLING_DIFFUSION_FIELDS = ("diffusion.variance", "diffusion.clip_denoised")

SAMPLES_SUBDIR = "samples"
COMBINED_FILE = "samples.npz"
META_FILE = "meta.json"


# --------------------------------------------------------------------------- configs


def _plain(config: ml_collections.ConfigDict) -> dict:
    """JSON-normal form (tuples become lists), for comparing a config with config.json."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def _flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resolve_config(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """The config of a sampling or evaluation run on `workdir`.

    `data`, `model`, `diffusion` (and the rest) come from `<workdir>/config.json`, the config
    the checkpoint was trained with; `sampling`, `eval` and `mesh` come from `config` (the
    command line), as do `data.data_dir` and `data.num_workers` unless None there. Trained
    fields on which the two differ are logged as a warning and the workdir's values win.

    Returns:
      A new, unlocked ConfigDict.
    """
    saved = train.load_config(workdir)
    given, trained = _flatten(_plain(config)), _flatten(_plain(saved))
    ignored = sorted(
        k
        for k in set(given) | set(trained)
        if k.split(".")[0] in TRAINED_GROUPS
        and k not in LOCAL_FIELDS
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


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Mapping[str, Any] | None
) -> ml_collections.ConfigDict:
    """Returns a copy of `config` with dotted-path overrides, e.g. {"sampling.batch_size": 64}.

    Raises:
      ValueError: a path outside `sampling`, `eval`, `mesh`, `data.data_dir`,
        `data.num_workers`, `diffusion.variance`, `diffusion.clip_denoised` (the checkpoint
        fixes the rest), or one that names no existing field.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    for path, value in (overrides or {}).items():
        parts = path.split(".")
        allowed = parts[0] in RUN_GROUPS or path in LOCAL_FIELDS + SAMPLING_DIFFUSION_FIELDS
        if len(parts) != 2 or not allowed:
            raise ValueError(
                f"config_overrides key {path!r} cannot be overridden: use 'group.field' in "
                f"{'/'.join(RUN_GROUPS)} or one of {LOCAL_FIELDS + SAMPLING_DIFFUSION_FIELDS}; "
                "the model, data and schedule are fixed by the checkpoint."
            )
        group, field = parts
        if group not in config or field not in config[group]:
            raise ValueError(f"config_overrides key {path!r} names no field of the config.")
        config[group][field] = value
    return config


def load_sampler(
    workdir: str, *, step: int | None = None, config_overrides: Mapping[str, Any] | None = None
) -> Sampler:
    """A `Sampler` for the EMA parameters of a training workdir.

    Reads `<workdir>/config.json` and restores only `ema_params` (no optimizer state) onto
    every device; compiles lazily, once per chunk shape and sampling options.

    Args:
      workdir: the training run's workdir.
      step: checkpoint step; None for the latest.
      config_overrides: dotted-path changes, e.g. `{"sampling.batch_size": 64,
        "sampling.num_steps": 100}` (see `apply_overrides` for what may change).

    Returns:
      The `Sampler`; `sampler.sample(n, seed=s)` gives uint8 [n, H, W, C].
    """
    config = apply_overrides(train.load_config(workdir), config_overrides)
    return Sampler.from_config(config, workdir, step=step)


# --------------------------------------------------------------------------- --mode=sample


def chunk_path(out_dir: str, index: int) -> str:
    """`<out_dir>/chunk_<index:05d>.npz`."""
    return os.path.join(out_dir, f"chunk_{index:05d}.npz")


def save_npz(path: str, **arrays: np.ndarray) -> None:
    """Writes an `.npz` atomically: a reader never sees a partial file under `path`."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def _chunk_complete(path: str, size: int, image_shape: tuple[int, ...]) -> bool:
    if not os.path.exists(path):
        return False
    try:
        with np.load(path, allow_pickle=False) as data:
            shape = data["images"].shape if "images" in data.files else None
    except (OSError, ValueError, zipfile.BadZipFile):  # unreadable: draw it again.
        return False
    return shape == (size, *image_shape)


def _check_meta(out_dir: str, meta: dict) -> None:
    """Writes `meta.json`, or checks that existing chunks were drawn the same way."""
    path = os.path.join(out_dir, META_FILE)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        changed = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
        if changed:
            raise ValueError(
                f"{out_dir} holds samples drawn with different settings ("
                + ", ".join(f"{k}: {old.get(k)!r} then, {meta.get(k)!r} now" for k in changed)
                + f"); resuming would mix them. Move or delete {out_dir}, or restore the "
                "earlier settings."
            )
        return
    with open(path + ".tmp", "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def generate(config: ml_collections.ConfigDict, workdir: str) -> str:
    """`--mode=sample`: writes `config.sampling.num_samples` samples of `workdir`'s model.

    Files under `<workdir>/samples/` (process 0 writes, every process samples):
      - `chunk_<i:05d>.npz`: uint8 `images` [n_i, H, W, C] of chunk i (and int32 `labels`
        for class-conditional models), n_i = `config.sampling.batch_size` except the last;
        `chunk_<i:05d>.png`: its grid;
      - `samples.npz`: all of them, `images` uint8 [N, H, W, C] (and `labels`);
      - `meta.json`: checkpoint step and sampling settings the chunks were drawn with.

    Chunk i is drawn with key `fold_in(PRNGKey(config.sampling.seed), i)`, so the run is
    deterministic and resumable: complete chunks (written atomically) are kept and only the
    missing ones are drawn. Settings that would change existing chunks raise ValueError.

    Args:
      config: the command-line config; only its sampling/eval/mesh groups are used (see
        `resolve_config`): the model is the one in `<workdir>/config.json`.
      workdir: the training run's workdir.

    Returns:
      The path of `samples.npz`.
    """
    config = resolve_config(config, workdir)
    sampler = Sampler.from_config(config, workdir)
    options = sampler.options()
    s = config.sampling
    num, batch, seed = int(s.num_samples), int(s.batch_size), int(s.seed)
    if num < 1:
        raise ValueError(f"config.sampling.num_samples must be >= 1, got {num}.")
    out_dir = os.path.join(workdir, SAMPLES_SUBDIR)
    is_main = jax.process_index() == 0
    sizes = chunk_sizes(num, batch)
    meta = {
        "checkpoint_step": sampler.step,
        "seed": seed,
        "batch_size": batch,
        "image_shape": list(sampler.image_shape),
        **dataclasses.asdict(options),
        "variance": config.diffusion.variance,
        "clip_denoised": bool(config.diffusion.clip_denoised),
    }
    done = np.zeros(len(sizes), bool)
    if is_main:
        os.makedirs(out_dir, exist_ok=True)
        _check_meta(out_dir, meta)
        done = np.array(
            [
                _chunk_complete(chunk_path(out_dir, i), n, sampler.image_shape)
                for i, n in enumerate(sizes)
            ]
        )
    done = from_process_0(done)
    todo = [i for i in range(len(sizes)) if not done[i]]
    logging.info(
        "Sampling %d images of step %d in %d chunks of %d to %s (%d chunks already there).",
        num, sampler.step, len(sizes), batch, out_dir, len(sizes) - len(todo),
    )  # fmt: skip
    key = raw_key(seed, seed)
    bar = show_progress(True, len(sizes), len(sizes) - len(todo), "sample")
    try:
        for i in todo:
            chunk = sampler.sample_chunk(i, sizes[i], key, options=options)
            images, labels = shd.global_to_host((chunk.images, chunk.labels))
            if is_main:
                arrays = {"images": metrics.to_uint8(images[: chunk.num_valid])}
                if sampler.num_classes:
                    arrays["labels"] = labels[: chunk.num_valid].astype(np.int32)
                path = chunk_path(out_dir, i)
                save_npz(path, **arrays)
                grid = metrics.image_grid(arrays["images"])
                metrics.save_png(path.removesuffix(".npz") + ".png", grid)
            bar.update(1)
    finally:
        bar.close()
    combined = os.path.join(out_dir, COMBINED_FILE)
    if is_main:
        parts = []
        for i in range(len(sizes)):
            with np.load(chunk_path(out_dir, i), allow_pickle=False) as data:
                parts.append({k: data[k] for k in data.files})
        save_npz(combined, **{k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
        logging.info("Wrote %d samples to %s.", num, combined)
    return combined
