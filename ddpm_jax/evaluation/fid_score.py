"""FID of a workdir's model: its samples against the training split, in Inception features.

Reference statistics of the training split (cached under `config.eval.fid_cache_dir`) against
`config.eval.fid_num_samples` samples drawn as `--mode=sample` draws them (same seed: the same
images), quantised to uint8 before the network as saved images would be.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import fid
from ddpm_jax.data import pipeline, sources
from ddpm_jax.data.config import DataConfig
from ddpm_jax.errors import ConfigError
from ddpm_jax.experiment import ExperimentConfig
from ddpm_jax.experiment.chain_program import raw_key
from ddpm_jax.inference.trained_model import TrainedModel
from ddpm_jax.runtime import sharding as shd
from ddpm_jax.runtime.progress import Progress


def inception_input(images: jax.Array) -> jax.Array:
    """Float [B, H, W, C] in [-1, 1], C in {1, 3} -> the uint8 grid, back in [-1, 1], 3 channels."""
    quantised = jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
    x = fid.images_from_uint8(quantised)
    return jnp.tile(x, (1, 1, 1, 3)) if x.shape[-1] == 1 else x


def make_fid_features_fn(variables: Any, mesh: jax.sharding.Mesh) -> Callable:
    """`features(images sharded [B, H, W, C] in [-1, 1]) -> host float [B, D]`."""
    features_fn = fid.make_feature_fn(shd.global_replicated(variables, mesh))
    prepare = jax.jit(inception_input, out_shardings=shd.batch_sharding(mesh))
    return lambda images: shd.global_to_host(features_fn(prepare(images)))


def _update(stats: fid.FeatureStats | None, features: np.ndarray) -> fid.FeatureStats:
    if stats is None:
        stats = fid.init_feature_stats(features.shape[1])
    return fid.update_feature_stats(stats, features)


def reference_key(data_cfg: DataConfig, num_examples: int) -> str:
    """The dataset part of a reference-statistics cache name.

    A TFDS dataset is its catalog name. Any other source is named by the user, so two
    folders may share a name (or keep the default "cifar10"): their key adds the source
    and a digest of the path, the held-out fraction and the split's size, so that
    statistics of one are never read for another, and a folder that gained or lost
    files is measured again.
    """
    if data_cfg.source == "tfds":
        return data_cfg.name
    ident = "\0".join(
        [data_cfg.source, str(data_cfg.path), repr(data_cfg.eval_fraction), str(num_examples)]
    )
    return f"{data_cfg.name}-{data_cfg.source}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def reference_statistics(
    config: ExperimentConfig,
    features_fn: Callable,
    mesh: jax.sharding.Mesh,
    fingerprint: str,
    cache_dir: str,
) -> tuple[os.PathLike, tuple[np.ndarray, np.ndarray] | None]:
    """FID statistics of the training split, from the cache or computed and cached.

    Uses the first `config.eval.fid_reference_examples` (0: all) of `config.data.split`.

    Returns:
      (path, (mu, sigma)) on process 0; other processes get (path, None).
    """
    data_cfg = config.data
    info = sources.get_dataset_info(data_cfg, data_cfg.split, num_classes=0)
    wanted = config.eval.fid_reference_examples
    n = info.num_examples if wanted <= 0 else min(wanted, info.num_examples)
    path = fid.reference_stats_path(
        cache_dir,
        reference_key(data_cfg, info.num_examples),
        data_cfg.split,
        data_cfg.image_size,
        fingerprint,
        0 if n == info.num_examples else n,
    )
    is_main = jax.process_index() == 0
    if bool(shd.from_process_0(np.asarray(is_main and path.exists()))):
        logging.info("FID reference statistics from %s.", path)
        return path, fid.load_stats(path) if is_main else None
    config.check_devices(mesh.devices.size, jax.process_count(), mode="eval")
    data = pipeline.make_eval_data(
        data_cfg,
        num_classes=0,
        global_batch_size=config.eval.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        split=data_cfg.split,
        num_examples=n,
    )
    stats = None
    bar = Progress(n, desc="FID reference statistics", unit="images")
    for batch in data:
        images, mask = shd.host_to_global((batch["image"], batch["mask"]), mesh)
        valid = shd.global_to_host(mask)
        stats = _update(stats, features_fn(images)[valid])
        bar.update(int(valid.sum()))
    bar.close()
    mu, sigma = fid.mean_and_covariance(stats)
    if is_main:
        fid.save_stats(path, mu, sigma, n)
        logging.info("FID reference statistics of %d images written to %s.", n, path)
    return path, (mu, sigma)


def sample_statistics(
    model: TrainedModel, features_fn: Callable, num_samples: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the features of `num_samples` samples drawn with key PRNGKey(seed)."""
    stats = None
    for chunk in model.iter_chunks(num_samples, raw_key(seed, seed), progress=True):
        stats = _update(stats, features_fn(chunk.images)[: chunk.num_valid])
    return fid.mean_and_covariance(stats)


def load_weights(config: ExperimentConfig) -> tuple[fid.InceptionWeights | None, str | None]:
    """The FID Inception weights of `config.eval`, checked now: (weights, None) or (None, why).

    Called before the bits/dim pass, so that weights that are wrong (a SHA-256 mismatch, a
    file of another format) fail in seconds rather than after it, and weights that cannot be
    had (not configured, not present, no network) are reported in one line.

    Raises:
      ConfigError: the weights are present but wrong.
    """
    ev = config.eval
    if ev.fid_num_samples == 0:
        return None, "config.eval.fid_num_samples = 0"
    if config.data.channels not in (1, 3):
        return None, f"Inception needs 1 or 3 image channels, the data has {config.data.channels}"
    try:
        return fid.try_load_inception_weights(
            ev.inception_weights, ev.inception_sha256, cache_dir(config)
        )
    except ValueError as e:
        raise ConfigError(f"config.eval.inception_weights = {ev.inception_weights!r}: {e}") from e


def cache_dir(config: ExperimentConfig) -> str:
    """Where FID reference statistics are cached: `config.eval.fid_cache_dir` or the default."""
    return config.eval.fid_cache_dir or str(fid.download.default_cache_dir())


def fid_score(
    model: TrainedModel, weights: tuple[fid.InceptionWeights | None, str | None] | None = None
) -> dict[str, Any]:
    """FID of `config.eval.fid_num_samples` samples against the training split.

    Args:
      model: the workdir's model (its config's `eval` and `sampling` groups are used).
      weights: `load_weights(model.config)`'s result, if already loaded.

    Returns:
      {"fid", "fid_num_samples", "fid_reference"}, or {"fid_skipped": reason} (logged as
      one "FID skipped: <reason>" line) when it cannot run.
    """
    config = model.config
    weights, reason = load_weights(config) if weights is None else weights
    if weights is None:
        logging.warning("FID skipped: %s", reason)
        return {"fid_skipped": reason}
    num = config.eval.fid_num_samples
    start = time.perf_counter()
    features_fn = make_fid_features_fn(weights.variables, model.mesh)
    ref_path, ref = reference_statistics(
        config, features_fn, model.mesh, weights.fingerprint, cache_dir(config)
    )
    mu, sigma = sample_statistics(model, features_fn, num, config.sampling.seed)
    score = fid.frechet_distance(mu, sigma, *ref) if ref is not None else 0.0
    score = float(shd.from_process_0(np.asarray(score, np.float64)))
    logging.info(
        "FID %.4g of %d samples at step %d (%.0f s).",
        score, num, model.step, time.perf_counter() - start,
    )  # fmt: skip
    return {"fid": score, "fid_num_samples": num, "fid_reference": str(ref_path)}
