"""`--mode=sample`: writes `config.sampling.num_samples` images of a workdir's model to disk.

    ddpm-jax sample --workdir=workdirs/digits \
        --config.sampling.num_samples=1000 [--config.sampling.sampler=ddim ...]

Files under `<workdir>/samples/`, drawn in resumable chunks (`write_samples`). The model,
data and schedule come from the workdir's `config.json`; only how to sample comes from the
command line (`experiment.changes.resolve_config`). For sampling from Python, use
`ddpm_jax.load_sampler`.
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

from ddpm_jax import files
from ddpm_jax.errors import WorkdirError
from ddpm_jax.experiment import changes
from ddpm_jax.experiment.chain_program import raw_key
from ddpm_jax.experiment.edm_config import KARRAS_FIELDS
from ddpm_jax.images import image_grid, save_png, to_uint8
from ddpm_jax.inference.trained_model import TrainedModel, chunk_sizes
from ddpm_jax.runtime import sharding as shd
from ddpm_jax.runtime import workdir as wd
from ddpm_jax.runtime.checkpointing import named_emas
from ddpm_jax.runtime.progress import Progress
from ddpm_jax.runtime.startup import StartupTimer

COMBINED_FILE = "samples.npz"
META_FILE = "meta.json"


def chunk_path(out_dir: str, index: int) -> str:
    """`<out_dir>/chunk_<index:05d>.npz`."""
    return os.path.join(out_dir, f"chunk_{index:05d}.npz")


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
            raise WorkdirError(
                f"{out_dir} holds samples drawn with different settings ("
                + ", ".join(f"{k}: {old.get(k)!r} then, {meta.get(k)!r} now" for k in changed)
                + f"); resuming would mix them. Move or delete {out_dir}, or restore the "
                "earlier settings."
            )
        return
    files.write_json(path, meta)


def write_samples(
    config: ml_collections.ConfigDict | None,
    workdir: str,
    *,
    config_overrides: Mapping[str, Any] | None = None,
    timer: StartupTimer | None = None,
) -> str:
    """`--mode=sample`: writes `config.sampling.num_samples` samples of `workdir`'s model.

    Files under `<workdir>/samples/` (`samples/<name>/` for the post-hoc EMA of
    `config.eval.ema`; process 0 writes, every process samples):
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
        `experiment.changes.resolve_config`): the model is the one in `<workdir>/config.json`. None:
        all of config.json.
      workdir: the training run's workdir.
      config_overrides: dotted-path changes applied after that resolution (see
        `experiment.changes.run_config`), e.g. `{"diffusion.variance": "fixedsmall"}`.
      timer: times the phases (`runtime.startup`: restore, compilation or the executables'
        loading, the first chunk's run, writing), written when the samples are.

    Returns:
      The path of `samples.npz`.
    """
    workdir = files.resolve_path(workdir)
    timer = StartupTimer() if timer is None else timer
    run_config = changes.run_config(config, workdir, config_overrides)
    model = TrainedModel.from_config(run_config, workdir, timer=timer)
    options = model.options()
    s = model.config.sampling
    num, batch, seed = s.num_samples, s.batch_size, s.seed
    out_dir = os.path.join(workdir, wd.SAMPLES_SUBDIR)
    if model.ema != named_emas.DEFAULT_EMA:  # a post-hoc EMA's samples: samples/<name>/.
        out_dir = os.path.join(out_dir, model.ema)
    is_main = jax.process_index() == 0
    sizes = chunk_sizes(num, batch)
    # heun/euler's fields only where they apply, so that earlier chunks still match.
    chain = {k: v for k, v in dataclasses.asdict(options).items()
             if options.karras or k not in KARRAS_FIELDS}  # fmt: skip
    meta = {
        "checkpoint_step": model.step,
        "seed": seed,
        "batch_size": batch,
        "image_shape": list(model.image_shape),
        **chain,
        "variance": model.reverse.variance,
        "clip_denoised": model.reverse.clip_denoised,
    }
    if model.ema != named_emas.DEFAULT_EMA:
        meta["ema"] = model.ema
    done = np.zeros(len(sizes), bool)
    if is_main:
        os.makedirs(out_dir, exist_ok=True)
        _check_meta(out_dir, meta)
        done = np.array(
            [
                _chunk_complete(chunk_path(out_dir, i), n, model.image_shape)
                for i, n in enumerate(sizes)
            ]
        )
    done = shd.from_process_0(done)
    todo = [i for i in range(len(sizes)) if not done[i]]
    logging.info(
        "Sampling %d images of step %d in %d chunks of %d to %s (%d chunks already there).",
        num, model.step, len(sizes), batch, out_dir, len(sizes) - len(todo),
    )  # fmt: skip
    key = raw_key(seed, seed)
    steps = model.steps_per_chunk(options)
    bar = Progress(len(sizes) * steps, desc=f"sampling {num} images", unit=options.progress_unit,
                   initial=(len(sizes) - len(todo)) * steps)  # fmt: skip
    try:
        for i in todo:
            chunk = model.sample_chunk(i, sizes[i], key, options=options, progress=bar)
            images, labels = shd.global_to_host((chunk.images, chunk.labels))
            if is_main:
                timer.event("first_images")
                arrays = {"images": to_uint8(images[: chunk.num_valid])}
                if model.num_classes:
                    arrays["labels"] = labels[: chunk.num_valid].astype(np.int32)
                path = chunk_path(out_dir, i)
                files.save_npz(path, **arrays)
                grid = image_grid(arrays["images"])
                save_png(path.removesuffix(".npz") + ".png", grid)
    finally:
        bar.close()
    combined = os.path.join(out_dir, COMBINED_FILE)
    if is_main:
        parts = []
        for i in range(len(sizes)):
            with np.load(chunk_path(out_dir, i), allow_pickle=False) as data:
                parts.append({k: data[k] for k in data.files})
        files.save_npz(combined, **{k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
        logging.info("Wrote %d samples to %s.", num, combined)
    timer.event("done")
    timer.write()
    return combined
