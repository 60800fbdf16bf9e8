"""FID and the rest of ADM's sample metrics (sFID, IS, precision, recall) of a workdir's model.

`config.eval.fid_num_samples` samples per seed of `config.eval.fid_seeds`, drawn as
`--mode=sample` draws them and quantized to uint8 before the Inception as saved images would
be, against the reference of `config.eval.fid_reference` (`references`); per-seed metrics in
`sample_metrics`. Memory: the sample set's pool3 features and logits (611 MB at 50,000), the
reference's pool3 features (410 MB at 50,000 images) and precision/recall's blocks of 5,000 ×
5,000 distances (100 MB each); everything else is streamed.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax
import numpy as np

from ddpm_jax import fid
from ddpm_jax.errors import ConfigError
from ddpm_jax.evaluation import features as feats
from ddpm_jax.evaluation import references
from ddpm_jax.evaluation import sample_metrics as sm
from ddpm_jax.evaluation.references import reference_key
from ddpm_jax.experiment import ExperimentConfig, eval_protocol
from ddpm_jax.inference.trained_model import TrainedModel
from ddpm_jax.runtime import sharding as shd

__all__ = ["cache_dir", "fid_score", "load_weights", "reference_key"]


def load_weights(config: ExperimentConfig) -> tuple[fid.InceptionWeights | None, str | None]:
    """The FID Inception weights of `config.eval`, checked now: (weights, None) or (None, why).

    Called before the likelihood pass, so that weights that are wrong (a SHA-256 mismatch, a
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


def _logits_skipped(weights: fid.InceptionWeights) -> str | None:
    try:
        fid.require_logits_kernel(weights)
    except ValueError as e:
        return str(e)
    return None


def fid_score(
    model: TrainedModel,
    weights: tuple[fid.InceptionWeights | None, str | None] | None = None,
    ref_file: fid.ReferenceFile | None = None,
) -> dict[str, Any]:
    """FID, sFID, IS, precision and recall of the samples of every seed against the reference.

    Args:
      model: the workdir's model (its config's `eval` and `sampling` groups are used).
      weights: `load_weights(model.config)`'s result, if already loaded.
      ref_file: `references.open_reference_file(model.config)`, if already read.

    Returns:
      The mean over seeds of each metric ("fid", "sfid", "inception_score",
      "inception_score_split_std", "precision", "recall") with "<metric>_std", "_min", "_max",
      "per_seed", "fid_num_samples", "fid_seeds", "fid_reference" (the statistics' file) and
      "sample_protocol" (reference, sampler, seeds, splits, Inception file, warnings);
      "<part>_skipped": why for a metric the weights or the reference cannot give; or only
      {"fid_skipped": reason} (logged as one "FID skipped: <reason>" line) when none can run.
    """
    config = model.config
    weights, reason = load_weights(config) if weights is None else weights
    if weights is None:
        logging.warning("FID skipped: %s", reason)
        return {"fid_skipped": reason}
    num, mesh = config.eval.fid_num_samples, model.mesh
    seeds = eval_protocol.seeds(config.eval, config.sampling.seed)
    warning = sm.fid_warning(num)
    if warning:
        logging.warning("%s.", warning)
    start = time.perf_counter()
    ref = references.reference(
        config,
        feats.make_features(weights, mesh, ("pool", "spatial")),
        mesh,
        weights,
        cache_dir(config),
        ref_file,
    )
    skipped = dict(ref.skipped)
    logits_reason = _logits_skipped(weights)
    if logits_reason:
        skipped["inception_score"] = logits_reason
    for part, why in skipped.items():
        logging.warning("%s skipped: %s", part, why)
    outputs = ("pool", "spatial") + (() if logits_reason else ("logits",))
    features_fn = feats.make_features(weights, mesh, outputs)
    kept = sm.kept_outputs(skipped)
    is_main = jax.process_index() == 0
    reference_seconds = time.perf_counter() - start
    per_seed, cost = [], []
    for seed in seeds:
        seed_start = time.perf_counter()
        samples = sm.sample_features(model, features_fn, num, seed, kept)
        logging.info("Kept features of %d samples: %s.", num, feats.describe_bytes(samples.nbytes))
        row = sm.seed_metrics(samples, ref, skipped) if is_main else dict.fromkeys(sm.METRICS, 0.0)
        values = shd.from_process_0(np.asarray([row[m] for m in sm.METRICS], np.float64))
        row = dict(zip(sm.METRICS, map(float, values), strict=True))
        sm.log_seed(seed, num, row, time.perf_counter() - seed_start)
        per_seed.append(row)
        cost.append({"seed": seed, "kept_feature_bytes": samples.nbytes, **samples.seconds})
    results = sm.summarize(seeds, per_seed, skipped)
    logging.info(
        "FID %.4g (%d seed(s), %d samples each) at step %d (%.0f s).",
        results["fid"], len(seeds), num, model.step, time.perf_counter() - start,
    )  # fmt: skip
    protocol = {
        "num_samples": num,
        "seeds": list(seeds),
        "sampler": sm.sampler_record(model),
        "quantization": "uint8, as saved images",
        "reference": ref.record,
        "inception": {
            "file": str(weights.path),
            "fingerprint": weights.fingerprint,
            "logits_layer": logits_reason is None,
        },
        "inception_score_splits": sm.inception_score_splits(num),
        "inception_score_split_size": sm.IS_SPLIT_SIZE,
        "precision_recall_k": references.PR_K,
        "sfid_features": f"{fid.SPATIAL_BLOCK}.branch1x1, first 7 channels ({fid.SPATIAL_DIM})",
        "warnings": [warning] if warning else [],
        "seconds": {"reference": reference_seconds, "per_seed": cost},
    }
    return {
        **results,
        **{f"{part}_skipped": why for part, why in skipped.items()},
        "fid_num_samples": num,
        "fid_seeds": list(seeds),
        "fid_reference": ref.record["file"],
        "sample_protocol": protocol,
    }
