"""`--mode=eval`: the likelihood bound in bits/dim over a split, and FID, of a workdir.

    ddpm-jax eval --workdir=workdirs/digits \
        [--config.eval.inception_weights=/path/fid_inception_v3.npz]

Both use the EMA parameters of the newest checkpoint. Results go to
`<workdir>/eval/bpd_step<step>.json` (written after the bits/dim pass, then again with FID;
the per-t mean curve of the bound in `..._terms.npz`) and to the eval metrics
(`<workdir>/eval/metrics.jsonl`, TensorBoard). The Inception weights are checked before the
bits/dim pass, so that bad weights fail in seconds.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

from ddpm_jax import files
from ddpm_jax.evaluation import bpd as bpd_lib
from ddpm_jax.evaluation import fid_score as fid_lib
from ddpm_jax.experiment import changes
from ddpm_jax.inference.trained_model import TrainedModel
from ddpm_jax.runtime import metrics
from ddpm_jax.runtime import workdir as wd
from ddpm_jax.runtime.checkpointing import named_emas


def evaluate(
    config: ml_collections.ConfigDict | None,
    workdir: str,
    *,
    config_overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """`--mode=eval`: bits/dim over `config.eval.split` and FID of the newest checkpoint.

    Args:
      config: the command-line config; the model, data and schedule come from
        `<workdir>/config.json` (see `experiment.changes.resolve_config`); None: all of config.json.
      workdir: the training run's workdir.
      config_overrides: dotted-path changes applied after that resolution (see
        `experiment.changes.run_config`), e.g. `{"diffusion.variance": "fixedsmall"}`.

    Returns:
      {"step", "split", "num_examples", "bpd", "bpd_decoder_L0", "bpd_diffusion_sum_Lt",
      "bpd_prior_LT", "conditional", "variance", "clip_denoised", "ema"} plus {"fid",
      "fid_num_samples", "fid_reference"} or {"fid_skipped"}; also written to
      `<workdir>/eval/bpd_step<step>.json` (`bpd_step<step>_<name>.json` for the post-hoc
      EMA of `config.eval.ema`) by process 0.
    """
    workdir = files.resolve_path(workdir)
    model = TrainedModel.from_config(changes.run_config(config, workdir, config_overrides), workdir)
    cfg, step = model.config, model.step
    cfg.check_devices(model.mesh.devices.size, jax.process_count(), mode="eval")
    weights = fid_lib.load_weights(cfg)  # bad weights fail now, not after the bound.
    if model.experiment.is_edm:
        return _evaluate_edm(model, workdir, weights)
    start = time.perf_counter()
    bpd = bpd_lib.split_bits_per_dim(model)
    results: dict[str, Any] = {
        "step": step,
        "split": cfg.eval.split,
        "num_examples": bpd.num_examples,
        **bpd.scalars(),
        "conditional": model.num_classes > 0,
        "variance": model.reverse.variance,
        "clip_denoised": model.reverse.clip_denoised,
        "ema": model.ema,  # "ema_params", or the post-hoc EMA of config.eval.ema.
    }
    logging.info(
        "Step %d: %.4f bits/dim on %s (%d examples; L_0 %.4f, sum L_t %.4f, L_T %.4g; %.0f s).",
        step, bpd.total, cfg.eval.split, bpd.num_examples, bpd.decoder, bpd.diffusion,
        bpd.prior, time.perf_counter() - start,
    )  # fmt: skip
    named = "" if model.ema == named_emas.DEFAULT_EMA else f"_{model.ema}"
    stem = os.path.join(workdir, wd.EVAL_SUBDIR, f"bpd_step{step}{named}")
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(stem), exist_ok=True)
        files.save_npz(stem + "_terms.npz", terms=bpd.terms)
        files.write_json(stem + ".json", results)  # kept even if FID fails.
    results.update(fid_lib.fid_score(model, weights))
    if jax.process_index() == 0:
        files.write_json(stem + ".json", results)
        writer = metrics.MetricWriter(os.path.dirname(stem))
        writer.write_scalars(step, {k: v for k, v in results.items() if isinstance(v, float)})
        writer.close()
        logging.info("Evaluation of step %d written to %s.json.", step, stem)
    return results


# Why an EDM model's evaluation reports no bits/dim (it has no discrete chain to bound).
EDM_BPD_SKIPPED = (
    "bits/dim of an EDM model needs the probability-flow likelihood "
    "(likelihood.ode_log_likelihood), which this evaluation does not run yet; FID only."
)


def _evaluate_edm(model: TrainedModel, workdir: str, weights) -> dict[str, Any]:
    """An EDM model's `evaluate`: FID, and one line saying why there is no bits/dim."""
    step = model.step
    logging.warning("Bits/dim skipped: %s", EDM_BPD_SKIPPED)
    results: dict[str, Any] = {
        "step": step,
        "formulation": "edm",
        "bpd_skipped": EDM_BPD_SKIPPED,
        "conditional": model.num_classes > 0,
    }
    results.update(fid_lib.fid_score(model, weights))
    stem = os.path.join(workdir, wd.EVAL_SUBDIR, f"bpd_step{step}")
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(stem), exist_ok=True)
        files.write_json(stem + ".json", results)
        writer = metrics.MetricWriter(os.path.dirname(stem))
        writer.write_scalars(step, {k: v for k, v in results.items() if isinstance(v, float)})
        writer.close()
        logging.info("Evaluation of step %d written to %s.json.", step, stem)
    return results
