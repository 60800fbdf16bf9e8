"""`--mode=eval`: the likelihood(s) over a split and ADM's sample metrics of a workdir's model.

    ddpm-jax eval --workdir=workdirs/digits \
        [--config.eval.inception_weights=/path/fid_inception_v3.npz] \
        [--config.eval.likelihood=both] [--config.eval.fid_seeds="(0, 1, 2)"]

The likelihood of `config.eval.likelihood` ("bound": the full T-step bound, `bpd`; "ode": the
probability-flow ODE, `likelihood`; "both"; None: "bound" for DDPM models, "ode" for EDM
ones), then, when Inception weights are configured, FID, sFID, IS, precision and recall of
`config.eval.fid_num_samples` samples per seed (`fid_score`). All use the EMA parameters of
the newest checkpoint. Results go to `<workdir>/eval/bpd_step<step>.json` (written after each
likelihood pass, then again with the sample metrics; the per-t mean curve of the bound in
`..._terms.npz`, each example's ODE bits/dim and solver steps in `..._ode.npz`) and to the
eval metrics (`<workdir>/eval/metrics.jsonl`, TensorBoard); the JSON's "protocol" says how
every number was made. The Inception weights and the reference file are checked before the
likelihood pass, so that bad ones fail in seconds.
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
from ddpm_jax.evaluation import likelihood as ode_lib
from ddpm_jax.evaluation import references
from ddpm_jax.experiment import changes, eval_protocol
from ddpm_jax.inference.trained_model import TrainedModel
from ddpm_jax.runtime import metrics
from ddpm_jax.runtime import workdir as wd
from ddpm_jax.runtime.checkpointing import named_emas


def _bound(model: TrainedModel) -> tuple[dict[str, Any], Any]:
    start = time.perf_counter()
    bpd = bpd_lib.split_bits_per_dim(model)
    seconds = time.perf_counter() - start
    T = model.sched.num_timesteps
    logging.info(
        "Step %d: %.4f bits/dim (bound) on %s (%d examples; L_0 %.4f, sum L_t %.4f, L_T %.4g; "
        "%.0f s).", model.step, bpd.total, model.config.eval.split, bpd.num_examples,
        bpd.decoder, bpd.diffusion, bpd.prior, seconds,
    )  # fmt: skip
    cost = {"bpd_network_evaluations": T * bpd.num_examples, "bpd_seconds": seconds}
    return {"num_examples": bpd.num_examples, **bpd.scalars(), **cost}, bpd


def _ode(model: TrainedModel) -> tuple[dict[str, Any], dict[str, Any], Any]:
    ode = ode_lib.split_ode_bits_per_dim(model)
    logging.info(
        "Step %d: %.4f ± %.4f bits/dim (ODE, %s dequantization, sigma_min %.4g) on %s (%d "
        "examples; %d network evaluations, %.0f s).", model.step, ode.bpd, ode.bpd_sem,
        ode.options["bins"], ode.options["sigma_min"], model.config.eval.split,
        ode.num_examples, ode.network_evaluations, ode.seconds,
    )  # fmt: skip
    return ode.scalars(), ode.record(model.image_shape), ode


def evaluate(
    config: ml_collections.ConfigDict | None,
    workdir: str,
    *,
    config_overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """`--mode=eval`: the likelihood(s) over `config.eval.split` and the sample metrics.

    Args:
      config: the command-line config; the model, data and schedule come from
        `<workdir>/config.json` (see `experiment.changes.resolve_config`); None: all of config.json.
      workdir: the training run's workdir.
      config_overrides: dotted-path changes applied after that resolution (see
        `experiment.changes.run_config`), e.g. `{"diffusion.variance": "fixedsmall"}`.

    Returns:
      {"step", "split", "num_examples", "conditional", "variance", "clip_denoised",
      "likelihood", "ema"}; with the bound "bpd", "bpd_decoder_L0", "bpd_diffusion_sum_Lt",
      "bpd_prior_LT", "bpd_network_evaluations", "bpd_seconds"; with the ODE "ode_bpd",
      "ode_bpd_sem", "ode_num_examples", "ode_network_evaluations", "ode_solver_steps_mean",
      "ode_seconds"; the sample metrics of `fid_score.fid_score` (or {"fid_skipped"}); and
      "protocol": the checkpoint step, the EMA, the likelihoods' settings (the ODE's
      dequantization, σ_min, σ_max, trace, solver) and the samples' (number, seeds, sampler
      and its steps, reference with its file and SHA-256, Inception file). Also written to
      `<workdir>/eval/bpd_step<step>.json` (`bpd_step<step>_<name>.json` for a named EMA)
      by process 0.
    """
    workdir = files.resolve_path(workdir)
    model = TrainedModel.from_config(changes.run_config(config, workdir, config_overrides), workdir)
    cfg, step = model.config, model.step
    cfg.check_devices(model.mesh.devices.size, jax.process_count(), mode="eval")
    formulation = eval_protocol.formulation(cfg)
    kinds = eval_protocol.likelihoods(cfg.eval, formulation)
    weights = fid_lib.load_weights(cfg)  # bad weights fail now, not after the likelihood.
    ref_file = references.open_reference_file(cfg) if weights[0] is not None else None
    results: dict[str, Any] = {
        "step": step,
        "split": cfg.eval.split,
        "conditional": model.num_classes > 0,
        "variance": model.reverse.variance,
        "clip_denoised": model.reverse.clip_denoised,
        "likelihood": list(kinds),
        "ema": model.ema,
    }
    protocol: dict[str, Any] = {
        "checkpoint_step": step,
        "ema": model.ema,
        "formulation": formulation,
        "likelihood": {"kinds": list(kinds), "split": cfg.eval.split},
    }
    results["protocol"] = protocol
    named = "" if model.ema == named_emas.DEFAULT_EMA else f"_{model.ema}"
    stem = os.path.join(workdir, wd.EVAL_SUBDIR, f"bpd_step{step}{named}")
    is_main = jax.process_index() == 0
    if is_main:
        os.makedirs(os.path.dirname(stem), exist_ok=True)
    if "bound" in kinds:
        scalars, bpd = _bound(model)
        results.update(scalars)
        protocol["likelihood"]["bound"] = {
            "timesteps": model.sched.num_timesteps,
            "key": "fold_in(stream_key(training.seed, EVAL_BPD), example index)",
        }
        if is_main:
            files.save_npz(stem + "_terms.npz", terms=bpd.terms)
            files.write_json(stem + ".json", results)  # kept if what follows fails.
    if "ode" in kinds:
        scalars, record, ode = _ode(model)
        results.setdefault("num_examples", scalars["ode_num_examples"])
        results.update(scalars)
        protocol["likelihood"]["ode"] = record
        if is_main:
            files.save_npz(stem + "_ode.npz", bpd=ode.per_example, steps=ode.steps)
            files.write_json(stem + ".json", results)
    samples = fid_lib.fid_score(model, weights, ref_file)
    protocol["samples"] = samples.pop("sample_protocol", None)
    results.update(samples)
    if is_main:
        files.write_json(stem + ".json", results)
        writer = metrics.MetricWriter(os.path.dirname(stem))
        writer.write_scalars(step, {k: v for k, v in results.items() if isinstance(v, float)})
        writer.close()
        logging.info("Evaluation of step %d written to %s.json.", step, stem)
    return results
