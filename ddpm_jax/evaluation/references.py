"""What the samples are compared with: a split of the data, or a published reference file.

`config.eval.fid_reference` names it:

- "train": the training split (`config.data.split`), against which Ho et al. report FID 3.17;
- "test": the evaluation split (`config.eval.split`);
- "file": `config.eval.reference_file`, read as published (`fid.load_reference`): an ADM
  batch (guided-diffusion: `arr_0` images with `mu`/`sigma`/`mu_s`/`sigma_s`) or EDM's
  statistics (`mu`/`sigma`). As ADM's evaluator does, the file's statistics are used for FID
  and sFID where it has them, and its images, through this Inception, for precision and recall
  (and for statistics it lacks). EDM's files give FID only.

A split's statistics are cached under `config.eval.fid_cache_dir` (the pool3 statistics in the
file FID has always used, so that earlier caches stay valid; the spatial statistics, the pool
features of every image and their k-NN radii in a `-adm` file beside it: 410 MB for 50,000
images). A file's image features are cached likewise, under the file's SHA-256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ddpm_jax import fid, files
from ddpm_jax.data import pipeline, sources
from ddpm_jax.data.config import DataConfig
from ddpm_jax.errors import ConfigError
from ddpm_jax.evaluation import features as feats
from ddpm_jax.experiment import ExperimentConfig
from ddpm_jax.runtime import sharding as shd
from ddpm_jax.runtime.progress import Progress

# Neighbourhood size of precision and recall (ADM's `ManifoldEstimator`, nhood_sizes=(3,)).
PR_K = 3


@dataclasses.dataclass
class Reference:
    """The reference side of the sample metrics (arrays on process 0 only; None elsewhere).

    Attributes:
      record: what the evaluation JSON says of it: "choice", "split", "count", "file",
        "sha256" and where its statistics came from.
      mu, sigma: float64 pool3 statistics [2048], [2048, 2048] (FID).
      mu_s, sigma_s: float64 spatial statistics [2023], [2023, 2023] (sFID), or None.
      pool: float32 [N, 2048] pool3 features of every reference image (precision and recall),
        or None.
      radii: float32 [N] squared k-NN radii of `pool` (k = `PR_K`), or None.
      skipped: {"sfid" | "precision_recall": why} for what this reference cannot give.
    """

    record: dict[str, Any]
    mu: np.ndarray | None = None
    sigma: np.ndarray | None = None
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    pool: np.ndarray | None = None
    radii: np.ndarray | None = None
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)


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


def open_reference_file(config: ExperimentConfig) -> fid.ReferenceFile | None:
    """`config.eval.reference_file` read and checked against `reference_sha256`, or None.

    Called before the likelihood pass, so that a missing or wrong file fails in seconds.

    Raises:
      ConfigError: no such file, not a reference file, or a SHA-256 mismatch.
    """
    ev = config.eval
    if ev.fid_reference != "file":
        return None
    try:
        ref = fid.load_reference(ev.reference_file)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"config.eval.reference_file = {ev.reference_file!r}: {e}") from e
    if ev.reference_sha256 is not None and ref.sha256 != ev.reference_sha256:
        raise ConfigError(
            f"config.eval.reference_sha256 = {ev.reference_sha256!r}: {ref.path} has SHA-256 "
            f"{ref.sha256}; the file is not the expected one (or fix the digest)."
        )
    if ev.reference_sha256 is None:
        logging.info("Reference %s has SHA-256 %s (set config.eval.reference_sha256 to check "
                     "it).", ref.path, ref.sha256)  # fmt: skip
    return ref


def reference(
    config: ExperimentConfig,
    features_fn: feats.FeaturesFn,
    mesh: jax.sharding.Mesh,
    weights: fid.InceptionWeights,
    cache_dir: str,
    ref_file: fid.ReferenceFile | None = None,
) -> Reference:
    """The reference of `config.eval.fid_reference`, from the cache or computed and cached.

    Args:
      config: the run's config.
      features_fn: `features.make_features(weights, mesh, ("pool", "spatial"))`.
      mesh: the devices.
      weights: the Inception weights (their fingerprint keys the cache).
      cache_dir: where statistics are cached.
      ref_file: `open_reference_file(config)`'s result, if already read.
    """
    if config.eval.fid_reference == "file":
        ref_file = ref_file or open_reference_file(config)
        return _file_reference(
            ref_file, features_fn, mesh, weights.fingerprint, cache_dir, config.eval.batch_size
        )
    return _split_reference(config, features_fn, mesh, weights.fingerprint, cache_dir)


def _adm_path(stats_path: Path) -> Path:
    return stats_path.with_name(stats_path.stem + "-adm.npz")


def _load_adm(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in ("mu_s", "sigma_s", "pool", "radii")}


def _save_adm(path: Path, features: feats.FeatureSet) -> dict[str, np.ndarray]:
    mu_s, sigma_s = features.statistics("spatial")
    pool = features.kept_rows("pool")
    arrays = {"mu_s": mu_s, "sigma_s": sigma_s, "pool": pool,
              "radii": fid.knn_radii(pool, PR_K)}  # fmt: skip
    files.save_npz(path, **arrays, num_examples=np.asarray(features.count, np.int64))
    return arrays


def _cached(path: Path) -> bool:
    """Whether process 0 has `path` (the same answer on every process)."""
    return bool(shd.from_process_0(np.asarray(jax.process_index() == 0 and path.exists())))


def _split_reference(config, features_fn, mesh, fingerprint, cache_dir) -> Reference:
    data_cfg, ev = config.data, config.eval
    split = data_cfg.split if ev.fid_reference == "train" else ev.split
    info = sources.get_dataset_info(data_cfg, split, num_classes=0)
    n = info.num_examples if ev.fid_reference_examples <= 0 else min(
        ev.fid_reference_examples, info.num_examples)  # fmt: skip
    stats_path = fid.reference_stats_path(
        cache_dir,
        reference_key(data_cfg, info.num_examples),
        split,
        data_cfg.image_size,
        fingerprint,
        0 if n == info.num_examples else n,
    )
    adm_path = _adm_path(stats_path)
    is_main = jax.process_index() == 0
    have_stats, have_adm = _cached(stats_path), _cached(adm_path)
    if have_stats and have_adm:
        logging.info("Reference statistics from %s and %s.", stats_path, adm_path)
        mu, sigma = fid.load_stats(stats_path) if is_main else (None, None)
        adm = _load_adm(adm_path) if is_main else {}
    else:
        config.check_devices(mesh.devices.size, jax.process_count(), mode="eval")
        data = pipeline.make_eval_data(
            data_cfg,
            num_classes=0,
            global_batch_size=ev.batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            split=split,
            num_examples=n,
        )
        kept = feats.FeatureSet(n, ("pool", "spatial"), ("pool",))
        bar = Progress(n, desc=f"reference features of {split}", unit="images")
        for batch in data:
            images, mask = shd.host_to_global((batch["image"], batch["mask"]), mesh)
            valid = shd.global_to_host(mask)
            kept.add({k: v[valid] for k, v in features_fn(images).items()})
            bar.update(int(valid.sum()))
        bar.close()
        mu, sigma = kept.statistics("pool")
        adm = {}
        if is_main:
            if not have_stats:  # an existing file stays as it is (same values).
                fid.save_stats(stats_path, mu, sigma, n)
            adm = _save_adm(adm_path, kept)
            logging.info("Reference statistics of %d images written to %s and %s.", n,
                         stats_path, adm_path)  # fmt: skip
    record = {
        "choice": ev.fid_reference,
        "dataset": data_cfg.name,
        "split": split,
        "count": n,
        "file": str(stats_path),
        "sha256": files.sha256_file(stats_path) if is_main else None,
        "features_file": str(adm_path),
    }
    return Reference(
        record, mu, sigma, adm.get("mu_s"), adm.get("sigma_s"), adm.get("pool"), adm.get("radii")
    )


def _file_reference(ref, features_fn, mesh, fingerprint, cache_dir, batch) -> Reference:
    is_main = jax.process_index() == 0
    record = {
        "choice": "file",
        "split": None,
        "count": ref.num_images,
        "file": str(ref.path),
        "sha256": ref.sha256,
        "keys": list(ref.keys),
        "statistics": "file" if ref.mu is not None else "computed from arr_0",
        "spatial_statistics": "file" if ref.mu_s is not None else "computed from arr_0",
    }
    out = Reference(record, ref.mu, ref.sigma, ref.mu_s, ref.sigma_s)
    if ref.num_images is None:
        why = f"{ref.path} holds statistics but no images (arr_0)"
        out.skipped["precision_recall"] = why
        if ref.mu_s is None:
            out.skipped["sfid"] = why + " nor spatial statistics (mu_s, sigma_s)"
            record["spatial_statistics"] = None
        return out if is_main else Reference(record, skipped=out.skipped)
    height = ref.image_shape[0]
    stats_path = fid.reference_stats_path(
        cache_dir, f"file_{ref.sha256[:16]}", "arr_0", height, fingerprint
    )
    adm_path = _adm_path(stats_path)
    if _cached(stats_path) and _cached(adm_path):
        logging.info("Features of %s from %s.", ref.path, adm_path)
        mu, sigma = fid.load_stats(stats_path) if is_main else (None, None)
        adm = _load_adm(adm_path) if is_main else {}
    else:
        kept = feats.FeatureSet(ref.num_images, ("pool", "spatial"), ("pool",))
        uint8_features = feats.make_uint8_features(features_fn, mesh)
        bar = Progress(ref.num_images, desc=f"features of {os.path.basename(ref.path)}",
                       unit="images")  # fmt: skip
        for images in fid.iter_reference_images(ref.path, batch):
            kept.add(uint8_features(images))
            bar.update(images.shape[0])
        bar.close()
        mu, sigma = kept.statistics("pool")
        adm = {}
        if is_main:
            fid.save_stats(stats_path, mu, sigma, ref.num_images)
            adm = _save_adm(adm_path, kept)
    if not is_main:
        return Reference(record, skipped=out.skipped)
    record["features_file"] = str(adm_path)
    if ref.mu is None:
        out.mu, out.sigma = mu, sigma
    if ref.mu_s is None:
        out.mu_s, out.sigma_s = adm["mu_s"], adm["sigma_s"]
    out.pool, out.radii = adm["pool"], adm["radii"]
    return out
