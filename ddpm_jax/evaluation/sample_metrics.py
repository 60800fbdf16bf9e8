"""The sample metrics of guided-diffusion's evaluator (ADM) for one set of samples per seed.

For each seed of `config.eval.fid_seeds`, `config.eval.fid_num_samples` samples are drawn with
key PRNGKey(seed) as `--mode=sample` draws them (the same images), quantized to uint8 and put
through the Inception once (`features.FeatureSet`); against the reference
(`references.Reference`) they give

- FID: `fid.frechet_distance` of the pool3 statistics;
- sFID: the same of ADM's spatial features (Mixed_6d.branch1x1, 7 channels, 2,023 values);
- IS: `fid.inception_score` of the logits, in ADM's splits of 5,000 samples
  (N // 5000 splits, at least 1);
- precision and recall: `fid.precision_recall` of the pool3 features, k = 3.

`summarize` reports each metric per seed and its mean, std (ddof 1 over the seeds; 0 for one
seed), minimum and maximum: EDM reports the minimum FID of three seeds.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

import jax
import numpy as np

from ddpm_jax import fid
from ddpm_jax.evaluation import features as feats
from ddpm_jax.evaluation.references import PR_K, Reference
from ddpm_jax.experiment.chain_program import raw_key
from ddpm_jax.inference.trained_model import TrainedModel

IS_SPLIT_SIZE = 5000  # ADM's evaluator: 50,000 samples in 10 splits.
# Below this many samples FID is biased upwards by several points: not comparable with papers.
COMPARABLE_FID_SAMPLES = 10_000
# The per-seed metrics, in the order they are broadcast from process 0.
METRICS = ("fid", "sfid", "inception_score", "inception_score_split_std", "precision", "recall")
# Which metrics each skippable part gives.
PARTS = {
    "sfid": ("sfid",),
    "inception_score": ("inception_score", "inception_score_split_std"),
    "precision_recall": ("precision", "recall"),
}


def inception_score_splits(num_samples: int) -> int:
    """ADM's split count: one split per 5,000 samples, at least 1."""
    return max(1, num_samples // IS_SPLIT_SIZE)


def fid_warning(num_samples: int) -> str | None:
    """The warning for FID on fewer than 10,000 samples, or None."""
    if num_samples >= COMPARABLE_FID_SAMPLES:
        return None
    return (
        f"FID of {num_samples} samples (fewer than {COMPARABLE_FID_SAMPLES:,}) is biased upwards "
        "and not comparable with published figures (50,000 samples)"
    )


def sampler_record(model: TrainedModel) -> dict[str, Any]:
    """The chain the samples are drawn with: `config.sampling`'s options, its steps, variance."""
    options = model.options()
    return {
        **dataclasses.asdict(options),
        "steps": model.steps_per_chunk(options),
        "variance": model.reverse.variance,
        "clip_denoised": model.reverse.clip_denoised,
        "batch_size": model.config.sampling.batch_size,
    }


def kept_outputs(skipped: dict[str, str]) -> tuple[str, ...]:
    """The sample outputs kept row by row: pool3 for precision/recall, logits for IS."""
    kept = () if "precision_recall" in skipped else ("pool",)
    return kept + (() if "inception_score" in skipped else ("logits",))


def sample_features(
    model: TrainedModel,
    features_fn: feats.FeaturesFn,
    num_samples: int,
    seed: int,
    kept: tuple[str, ...],
) -> feats.FeatureSet:
    """The features of `num_samples` samples drawn with key PRNGKey(seed).

    Chunks of `config.sampling.batch_size` are sampled, quantized and put through the
    Inception as they come; pool3 and spatial features are streamed into statistics, the
    `kept` outputs stored for every sample (float32). The set's `seconds` holds the wall time
    of the sampling and of the Inception passes.
    """
    features = feats.FeatureSet(num_samples, ("pool", "spatial"), kept)
    chunks = model.iter_chunks(num_samples, raw_key(seed, seed), progress=True)
    sampling = inception = 0.0
    while True:
        start = time.perf_counter()
        chunk = next(chunks, None)
        if chunk is None:
            break
        jax.block_until_ready(chunk.images)
        middle = time.perf_counter()
        out = features_fn(chunk.images)
        features.add({k: v[: chunk.num_valid] for k, v in out.items()})
        sampling, inception = sampling + middle - start, inception + time.perf_counter() - middle
    features.seconds = {"sampling": sampling, "inception": inception}
    return features


def seed_metrics(
    samples: feats.FeatureSet, ref: Reference, skipped: dict[str, str]
) -> dict[str, float]:
    """Every metric of one sample set against the reference (on process 0), NaN if skipped.

    The wall time of each part goes into `samples.seconds` ("fid", "sfid", ...).
    """
    out = dict.fromkeys(METRICS, math.nan)
    clock = time.perf_counter()

    def timed(part):
        nonlocal clock
        now = time.perf_counter()
        samples.seconds[part], clock = now - clock, now

    out["fid"] = fid.frechet_distance(*samples.statistics("pool"), ref.mu, ref.sigma)
    timed("fid")
    if "sfid" not in skipped:
        out["sfid"] = fid.frechet_distance(*samples.statistics("spatial"), ref.mu_s, ref.sigma_s)
        timed("sfid")
    if "inception_score" not in skipped:
        logits = samples.kept_rows("logits")
        mean, std = fid.inception_score(logits, inception_score_splits(logits.shape[0]))
        out["inception_score"], out["inception_score_split_std"] = mean, std
        timed("inception_score")
    if "precision_recall" not in skipped:
        out["precision"], out["recall"] = fid.precision_recall(
            ref.pool, samples.kept_rows("pool"), k=PR_K, real_radii=ref.radii
        )
        timed("precision_recall")
    return out


def summarize(
    seeds: tuple[int, ...], per_seed: list[dict[str, float]], skipped: dict[str, str]
) -> dict[str, Any]:
    """The flat results over seeds: `<metric>` (the mean), `<metric>_std`, `_min`, `_max`,
    and "per_seed" [{"seed", metric: value}]; skipped metrics are left out."""
    absent = {m for part, names in PARTS.items() if part in skipped for m in names}
    names = [m for m in METRICS if m not in absent]
    out: dict[str, Any] = {}
    for m in names:
        values = np.asarray([row[m] for row in per_seed], np.float64)
        out[m] = float(values.mean())
        if m == "inception_score_split_std":
            continue  # a spread over splits: its spread over seeds would say nothing more.
        out[f"{m}_std"] = float(values.std(ddof=1)) if values.size > 1 else 0.0
        out[f"{m}_min"], out[f"{m}_max"] = float(values.min()), float(values.max())
    out["per_seed"] = [
        {"seed": int(s), **{m: float(row[m]) for m in names}}
        for s, row in zip(seeds, per_seed, strict=True)
    ]
    return out


def log_seed(seed: int, num_samples: int, row: dict[str, float], seconds: float) -> None:
    """One line per seed with every metric computed."""
    shown = ", ".join(f"{m} {v:.4g}" for m, v in row.items() if not math.isnan(v))
    logging.info("Seed %d, %d samples: %s (%.0f s).", seed, num_samples, shown, seconds)
