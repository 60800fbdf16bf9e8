"""`--mode=eval`: the likelihood bound in bits/dim over a split, and FID, of a trained workdir.

    python -m ddpm_jax.main --config=configs/cifar10.py --workdir=DIR --mode=eval \
        --config.eval.inception_weights=/path/fid_inception_v3.npz

Both use the EMA parameters of the newest checkpoint. Results go to
`<workdir>/eval/bpd_step<step>.json` (the per-t mean curve of the bound to `..._terms.npz`)
and to the eval metrics (`<workdir>/eval/metrics.jsonl`, TensorBoard).

Bits/dim: the full bound of `diffusion.bits_per_dim` (all T steps) for every example of
`config.eval.split`; example i of the split is evaluated alone with key
`fold_in(bpd_key(config), i)`, so the result does not depend on the batch size, on the
padding of the last batch (masked out) or on the number of devices.

FID: reference statistics of the training split (cached under `config.eval.fid_cache_dir`)
against `config.eval.fid_num_samples` samples drawn as `--mode=sample` draws them (same seed:
the same images), quantised to uint8 before the network as saved images would be.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax import diffusion, fid, generate, input_pipeline, metrics, train
from ddpm_jax import sharding as shd
from ddpm_jax.config_checks import DiffusionConfig
from ddpm_jax.sampler import Sampler, from_process_0, global_replicated, raw_key, show_progress

EVAL_SUBDIR = "eval"
_BPD_KEY_TAG = 4  # train.py folds 0-3 into the training seed for its own keys.


def bpd_key(config: ml_collections.ConfigDict) -> jax.Array:
    """Base key of the bits/dim evaluation: `fold_in(PRNGKey(config.training.seed), 4)`."""
    return jax.random.fold_in(jax.random.PRNGKey(int(config.training.seed)), _BPD_KEY_TAG)


@dataclasses.dataclass(frozen=True)
class BitsPerDimResult:
    """The bound averaged over a split, in bits per dimension.

    Attributes:
      num_examples: examples averaged over.
      total: mean -ELBO = decoder + diffusion + prior.
      decoder: mean L_0 = -log p(x_0 | x_1).
      diffusion: mean Σ_{t>=1} L_t.
      prior: mean L_T = KL(q(x_T | x_0) || N(0, I)).
      terms: float64 [T], mean L_t for each t (terms[0] = decoder).
    """

    num_examples: int
    total: float
    decoder: float
    diffusion: float
    prior: float
    terms: np.ndarray

    def scalars(self) -> dict[str, float]:
        return {
            "bpd": self.total,
            "bpd_decoder_L0": self.decoder,
            "bpd_diffusion_sum_Lt": self.diffusion,
            "bpd_prior_LT": self.prior,
        }


def make_bpd_sums_fn(
    model: Any, sched: Any, config: ml_collections.ConfigDict, key: jax.Array
) -> Callable:
    """`(params, images, labels, index, mask) -> sums`, per-example bound summed over a batch.

    Args of the returned function: images float32 [B, H, W, C] in [-1, 1], labels int32 [B]
    (used by class-conditional models: the bound of p(x | y)), index int32 [B] (the
    examples' positions in the split, for their keys), mask bool [B] (False on padding).
    It returns float32 sums over the unmasked rows: `total`, `decoder`, `diffusion`,
    `prior` (scalars), `terms` [T] and `count`.
    """
    d = DiffusionConfig.from_config(config)
    chunk = int(config.eval.bpd_timestep_chunk)
    num_classes = int(config.model.num_classes)

    def one_example(params, image, label, example_key):
        kwargs = {"y": label[None]} if num_classes else {}
        result = diffusion.bits_per_dim(
            train.make_model_fn(model, params, **kwargs),
            sched,
            image[None],
            example_key,
            parameterization=d.parameterization,
            variance=d.variance,
            clip_denoised=d.clip_denoised,
            timestep_chunk=chunk,
        )
        return jax.tree.map(lambda a: a[0], result)

    def sums(params, images, labels, index, mask):
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(index)
        r = jax.vmap(one_example, in_axes=(None, 0, 0, 0))(params, images, labels, keys)
        w = mask.astype(jnp.float32)
        out = {k: jnp.sum(w * getattr(r, k)) for k in ("total", "decoder", "diffusion", "prior")}
        return {**out, "terms": w @ r.terms, "count": jnp.sum(w)}

    return sums


def split_bits_per_dim(sampler: Sampler, config: ml_collections.ConfigDict) -> BitsPerDimResult:
    """The bound over `config.eval.split` (first `config.eval.num_examples`; 0: all).

    Batches of `config.eval.batch_size` (a multiple of the device count) are sharded over
    the mesh; the last one is padded and its padding masked out.
    """
    mesh = sampler.mesh
    batch_size = config.eval.batch_size
    shd.validate_batch_size(batch_size, mesh, field="config.eval.batch_size")
    if int(config.eval.bpd_timestep_chunk) < 1:
        raise ValueError(
            f"config.eval.bpd_timestep_chunk must be >= 1, got {config.eval.bpd_timestep_chunk}."
        )
    p, num_p = jax.process_index(), jax.process_count()
    data = input_pipeline.make_eval_data(
        config,
        global_batch_size=batch_size,
        process_index=p,
        process_count=num_p,
        split=config.eval.split,
        num_examples=int(config.eval.num_examples),
    )
    batch_sh, replicated = shd.batch_sharding(mesh), shd.replicated(mesh)
    sums_fn = jax.jit(
        make_bpd_sums_fn(sampler.model, sampler.sched, config, bpd_key(config)),
        in_shardings=(shd.shardings_of(sampler.params), *[batch_sh] * 4),
        out_shardings=replicated,
    )
    local = data.local_batch_size
    total = None
    bar = show_progress(True, len(data), 0, "bits/dim")
    for k, batch in enumerate(data):
        index = (k * batch_size + p * local + np.arange(local)).astype(np.int32)
        host = (batch["image"], batch["label"], index, batch["mask"])
        sums = jax.device_get(sums_fn(sampler.params, *shd.host_to_global(host, mesh)))
        sums = {name: np.asarray(v, np.float64) for name, v in sums.items()}
        total = sums if total is None else {n: total[n] + sums[n] for n in total}
        bar.update(1)
    bar.close()
    count = total.pop("count")
    if round(float(count)) != data.num_examples:  # the mask is what makes the mean exact.
        raise RuntimeError(f"evaluated {count} examples, expected {data.num_examples}.")
    means = {name: v / count for name, v in total.items()}
    return BitsPerDimResult(
        num_examples=data.num_examples,
        total=float(means["total"]),
        decoder=float(means["decoder"]),
        diffusion=float(means["diffusion"]),
        prior=float(means["prior"]),
        terms=means["terms"],
    )


# --------------------------------------------------------------------------- FID


def inception_input(images: jax.Array) -> jax.Array:
    """Float [B, H, W, C] in [-1, 1], C in {1, 3} -> the uint8 grid, back in [-1, 1], 3 channels."""
    quantised = jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
    x = fid.images_from_uint8(quantised)
    return jnp.tile(x, (1, 1, 1, 3)) if x.shape[-1] == 1 else x


def make_fid_features_fn(variables: Any, mesh: jax.sharding.Mesh) -> Callable:
    """`features(images sharded [B, H, W, C] in [-1, 1]) -> host float [B, D]`."""
    features_fn = fid.make_feature_fn(global_replicated(variables, mesh))
    prepare = jax.jit(inception_input, out_shardings=shd.batch_sharding(mesh))
    return lambda images: shd.global_to_host(features_fn(prepare(images)))


def _update(stats: fid.FeatureStats | None, features: np.ndarray) -> fid.FeatureStats:
    if stats is None:
        stats = fid.init_feature_stats(features.shape[1])
    return fid.update_feature_stats(stats, features)


def reference_statistics(
    config: ml_collections.ConfigDict,
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
    info = input_pipeline.get_dataset_info(config, config.data.split)
    wanted = int(config.eval.get("fid_reference_examples", 0) or 0)
    n = info.num_examples if wanted <= 0 else min(wanted, info.num_examples)
    data_cfg = config.data
    path = fid.reference_stats_path(
        cache_dir,
        data_cfg.name,
        data_cfg.split,
        int(data_cfg.image_size),
        fingerprint,
        0 if n == info.num_examples else n,
    )
    is_main = jax.process_index() == 0
    if bool(from_process_0(np.asarray(is_main and path.exists()))):
        logging.info("FID reference statistics from %s.", path)
        return path, fid.load_stats(path) if is_main else None
    shd.validate_batch_size(config.eval.batch_size, mesh, field="config.eval.batch_size")
    data = input_pipeline.make_eval_data(
        config,
        global_batch_size=int(config.eval.batch_size),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        split=data_cfg.split,
        num_examples=n,
    )
    stats = None
    bar = show_progress(True, len(data), 0, "FID reference")
    for batch in data:
        images, mask = shd.host_to_global((batch["image"], batch["mask"]), mesh)
        stats = _update(stats, features_fn(images)[shd.global_to_host(mask)])
        bar.update(1)
    bar.close()
    mu, sigma = fid.mean_and_covariance(stats)
    if is_main:
        fid.save_stats(path, mu, sigma, n)
        logging.info("FID reference statistics of %d images written to %s.", n, path)
    return path, (mu, sigma)


def sample_statistics(
    sampler: Sampler, features_fn: Callable, num_samples: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the features of `num_samples` samples drawn with key PRNGKey(seed)."""
    stats = None
    for chunk in sampler.iter_chunks(num_samples, raw_key(seed, seed), progress=True):
        stats = _update(stats, features_fn(chunk.images)[: chunk.num_valid])
    return fid.mean_and_covariance(stats)


def fid_score(sampler: Sampler, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """FID of `config.eval.fid_num_samples` samples against the training split.

    Returns:
      {"fid", "fid_num_samples", "fid_reference"}, or {"fid_skipped": reason} (logged as
      one "FID skipped: <reason>" line) when it cannot run.
    """
    ev = config.eval
    num = int(ev.fid_num_samples)
    reason = None
    if num == 0:
        reason = "config.eval.fid_num_samples = 0"
    elif num < 2:
        raise ValueError(f"config.eval.fid_num_samples must be 0 (off) or >= 2, got {num}.")
    elif sampler.image_shape[-1] not in (1, 3):
        reason = f"Inception needs 1 or 3 image channels, the data has {sampler.image_shape[-1]}"
    cache_dir = ev.get("fid_cache_dir") or str(fid.weights.default_cache_dir())
    weights = None
    if reason is None:
        weights, reason = fid.try_load_inception_weights(
            ev.inception_weights, ev.inception_sha256, cache_dir
        )
    if weights is None:
        logging.warning("FID skipped: %s", reason)
        return {"fid_skipped": reason}
    start = time.perf_counter()
    features_fn = make_fid_features_fn(weights.variables, sampler.mesh)
    ref_path, ref = reference_statistics(
        config, features_fn, sampler.mesh, weights.fingerprint, cache_dir
    )
    mu, sigma = sample_statistics(sampler, features_fn, num, int(config.sampling.seed))
    score = fid.frechet_distance(mu, sigma, *ref) if ref is not None else 0.0
    score = float(from_process_0(np.asarray(score, np.float64)))
    logging.info(
        "FID %.4g of %d samples at step %d (%.0f s).",
        score, num, sampler.step, time.perf_counter() - start,
    )  # fmt: skip
    return {"fid": score, "fid_num_samples": num, "fid_reference": str(ref_path)}


# --------------------------------------------------------------------------- entry point


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """`--mode=eval`: bits/dim over `config.eval.split` and FID of the newest checkpoint.

    Args:
      config: the command-line config; the model, data and schedule come from
        `<workdir>/config.json` (see `generate.resolve_config`).
      workdir: the training run's workdir.

    Returns:
      {"step", "split", "num_examples", "bpd", "bpd_decoder_L0", "bpd_diffusion_sum_Lt",
      "bpd_prior_LT", "conditional"} plus {"fid", "fid_num_samples", "fid_reference"} or
      {"fid_skipped"}; also written to `<workdir>/eval/bpd_step<step>.json` by process 0.
    """
    config = generate.resolve_config(config, workdir)
    sampler = Sampler.from_config(config, workdir)
    step = sampler.step
    start = time.perf_counter()
    bpd = split_bits_per_dim(sampler, config)
    results: dict[str, Any] = {
        "step": step,
        "split": config.eval.split,
        "num_examples": bpd.num_examples,
        **bpd.scalars(),
        "conditional": sampler.num_classes > 0,
    }
    logging.info(
        "Step %d: %.4f bits/dim on %s (%d examples; L_0 %.4f, sum L_t %.4f, L_T %.4g; %.0f s).",
        step, bpd.total, config.eval.split, bpd.num_examples, bpd.decoder, bpd.diffusion,
        bpd.prior, time.perf_counter() - start,
    )  # fmt: skip
    results.update(fid_score(sampler, config))
    if jax.process_index() == 0:
        out_dir = os.path.join(workdir, EVAL_SUBDIR)
        os.makedirs(out_dir, exist_ok=True)
        stem = os.path.join(out_dir, f"bpd_step{step}")
        generate.save_npz(stem + "_terms.npz", terms=bpd.terms)
        with open(stem + ".json.tmp", "w") as f:
            json.dump(results, f, indent=2, sort_keys=True)
        os.replace(stem + ".json.tmp", stem + ".json")
        writer = metrics.MetricWriter(out_dir)
        scalars = {k: v for k, v in results.items() if isinstance(v, float)}
        writer.write_scalars(step, scalars)
        writer.close()
        logging.info("Evaluation of step %d written to %s.json.", step, stem)
    return results
