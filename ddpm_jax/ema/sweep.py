"""The σ_rel sweep: one metric for many post-hoc EMAs of one run, and the curve.

    ddpm-jax ema --workdir=W --sigma_rel=0.02,0.05,0.1,0.15,0.2 --sweep=bpd_estimate

Each σ_rel is reconstructed in memory (nothing is written to `emas/`) and evaluated with the
same random draws, so that the differences along the curve are not noise of the estimate:

- "bpd_estimate": `likelihood.bits_per_dim_stratified` (1 + 8 network calls per image, the
  estimate the training log shows) on the first `eval.num_examples` images of `eval.split`,
  example i with key `fold_in(key, i)`;
- "bpd": the full bound (`evaluation.bpd`, T calls per image) on the same images;
- "fid": FID of `eval.fid_num_samples` samples (`evaluation.fid_score`).

The checkpoint's exponential EMA at the same step, if that checkpoint is kept, is evaluated
too and marked, at the σ_rel of its own weights (`exponential_sigma_rel`). The curve is
printed and written to `<workdir>/eval/ema_sweep_step<N>_<metric>.json` and `.png`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax import files, likelihood
from ddpm_jax.data import pipeline, sources
from ddpm_jax.ema import plot
from ddpm_jax.ema import reconstruct as rc
from ddpm_jax.evaluation import bpd as bpd_lib
from ddpm_jax.evaluation import fid_score as fid_lib
from ddpm_jax.experiment import Experiment, Stream, changes, stream_key
from ddpm_jax.experiment.config import OptimConfig
from ddpm_jax.inference.trained_model import TrainedModel
from ddpm_jax.runtime import checkpointing
from ddpm_jax.runtime import sharding as shd
from ddpm_jax.runtime import workdir as wd
from ddpm_jax.runtime.checkpointing import named_emas

METRICS = ("bpd_estimate", "bpd", "fid")
# Strata of the bound estimate: those of the estimate logged in training.
ESTIMATE_STRATA = 8


def exponential_sigma_rel(optim: OptimConfig, step: int) -> float:
    """σ_rel of the checkpoint's exponential EMA after `step` updates: the std of i/t under
    the weights it puts on the parameters θ_0 (initial) .. θ_t.

    The update after step s (0-based) uses decay d_s = ema_decay, or min(ema_decay,
    (1+s)/(10+s)) with `ema_warmup`; θ_i then weighs (1 - d_{i-1}) Π_{j>=i} d_j.
    """
    s = np.arange(step, dtype=np.float64)
    d = np.full(step, float(optim.ema_decay))
    if optim.ema_warmup:
        d = np.minimum(d, (1.0 + s) / (10.0 + s))
    # Π_{j>=i} d_j for i = 0..t (1 for i = t), from the end, in logs.
    tail = np.exp(np.concatenate([np.cumsum(np.log(d)[::-1])[::-1], [0.0]]))
    w = tail * np.concatenate([[1.0], 1.0 - d])
    x = np.arange(step + 1) / step
    mean = w @ x / w.sum()
    return float(math.sqrt(w @ (x - mean) ** 2 / w.sum()))


def make_estimate_fn(experiment: Experiment, key: jax.Array):
    """`(params, images, labels, index, mask) -> (sum of estimates, count)` over a batch."""
    num_classes, sched = experiment.num_classes, experiment.schedule

    def one(params, image, label, example_key):
        model_fn = experiment.model_fn(params, label[None] if num_classes else None)
        return likelihood.bits_per_dim_stratified(
            model_fn, sched, image[None], example_key, num_strata=ESTIMATE_STRATA,
            **experiment.reverse.kwargs(),
        )[0]  # fmt: skip

    def batch_fn(params, images, labels, index, mask):
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(index)
        est = jax.vmap(one, in_axes=(None, 0, 0, 0))(params, images, labels, keys)
        w = mask.astype(jnp.float32)
        return jnp.sum(w * est), jnp.sum(w)

    return batch_fn


def estimate_bits_per_dim(model: TrainedModel, batch_fn) -> float:
    """The mean bound estimate over the first `eval.num_examples` images of `eval.split`."""
    cfg, mesh = model.config, model.mesh
    info = sources.get_dataset_info(cfg.data, cfg.eval.split, num_classes=model.num_classes)
    n = info.num_examples if cfg.eval.num_examples <= 0 else cfg.eval.num_examples
    # Fewer examples than a batch: a smaller batch, not one mostly of padding (as `bpd`).
    multiple = int(np.lcm(mesh.devices.size, jax.process_count()))
    batch_size = min(cfg.eval.batch_size, -(-min(n, info.num_examples) // multiple) * multiple)
    data = pipeline.make_eval_data(
        cfg.data,
        num_classes=model.num_classes,
        global_batch_size=batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        split=cfg.eval.split,
        num_examples=cfg.eval.num_examples,
    )
    total, count = 0.0, 0.0
    local, p = data.local_batch_size, jax.process_index()
    for k, batch in enumerate(data):
        index = (k * batch_size + p * local + np.arange(local)).astype(np.int32)
        host = shd.host_to_global((batch["image"], batch["label"], index, batch["mask"]), mesh)
        s, n = jax.device_get(batch_fn(model.params, *host))
        total, count = total + float(s), count + float(n)
    return total / count


def sweep(
    config: ml_collections.ConfigDict | None,
    workdir: str,
    sigma_rels: Sequence[float],
    *,
    metric: str = "bpd_estimate",
    step: int | None = None,
    from_profiles: Sequence[float] | None = None,
    config_overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluates the post-hoc EMAs of `sigma_rels` with `metric`; writes the curve.

    Args:
      config: the command-line config (its eval/sampling/mesh groups), or None.
      workdir: a training run's workdir with EMA snapshots.
      sigma_rels: the σ_rel's to evaluate, each in (0, 1/√12].
      metric: one of `METRICS`.
      step: the target step, a snapshot step; None: the last.
      from_profiles: reconstruct from the snapshots of these profiles only; None: all.
      config_overrides: dotted-path changes, as for `ddpm-jax eval`.

    Returns:
      {"metric", "step", "points": [{"sigma_rel", "value", "weight_error",
      "sum_abs_coefficients"}], "exponential": {"sigma_rel", "value", "ema_decay"} or None,
      "json", "png"}.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}.")
    workdir = files.resolve_path(workdir)
    cfg_dict = changes.run_config(config, workdir, config_overrides)
    experiment = Experiment.from_config(cfg_dict)
    cfg, mesh = experiment.config, shd.make_mesh()
    if metric != "fid":
        cfg.check_devices(mesh.devices.size, jax.process_count(), mode="eval")
    plans = [rc.plan(workdir, s, step, from_profiles=from_profiles) for s in sigma_rels]
    target = plans[0].step
    abstract = experiment.abstract_params(mesh)
    evaluate = _metric_fn(metric, experiment, mesh, cfg, abstract)
    points = []
    for p in plans:
        params = jax.device_put(rc.reconstruct(workdir, p), shd.shardings_of(abstract))
        value = evaluate(TrainedModel(cfg, params, p.step, mesh, experiment, p.name))
        points.append({"sigma_rel": p.sigma_rel, "value": value, "weight_error": p.weight_error,
                       "sum_abs_coefficients": p.sum_abs})  # fmt: skip
        logging.info("sigma_rel %g at step %d: %s %.5g (weight error %.1e).",
                     p.sigma_rel, target, metric, value, p.weight_error)  # fmt: skip
    exponential = None
    if target in checkpointing.complete_steps(workdir):
        model = TrainedModel.from_config(cfg, workdir, step=target, ema=named_emas.DEFAULT_EMA)
        exponential = {"sigma_rel": exponential_sigma_rel(cfg.optim, target),
                       "value": evaluate(model), "ema_decay": cfg.optim.ema_decay,
                       "ema_warmup": cfg.optim.ema_warmup}  # fmt: skip
    stem = os.path.join(workdir, wd.EVAL_SUBDIR, f"ema_sweep_step{target}_{metric}")
    result = {"metric": metric, "step": target, "points": points, "exponential": exponential,
              "json": stem + ".json", "png": stem + ".png"}  # fmt: skip
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(stem), exist_ok=True)
        files.write_json(stem + ".json", result)
        marks = []
        if exponential is not None:
            label = f"exponential EMA (decay {exponential['ema_decay']:g})"
            marks.append((exponential["sigma_rel"], exponential["value"], label))
        plot.line_plot(
            stem + ".png", [q["sigma_rel"] for q in points], [q["value"] for q in points],
            xlabel="sigma_rel of the post-hoc EMA", ylabel=_LABELS[metric],
            title=f"{os.path.basename(workdir)} at step {target}", marks=marks,
        )  # fmt: skip
    return result


_LABELS = {
    "bpd_estimate": "bits/dim (stratified estimate)",
    "bpd": "bits/dim (bound)",
    "fid": "FID",
}


def _metric_fn(metric: str, experiment: Experiment, mesh, cfg, abstract):
    """`model -> float` for `metric`, compiled once for every model of the sweep."""
    if metric == "bpd":
        return lambda model: bpd_lib.split_bits_per_dim(model).total
    if metric == "fid":
        weights = fid_lib.load_weights(cfg)

        def fid(model):
            out = fid_lib.fid_score(model, weights)
            if "fid" not in out:
                raise ValueError(f"FID cannot be computed: {out.get('fid_skipped')}.")
            return float(out["fid"])

        return fid
    batch_sh = shd.batch_sharding(mesh)
    batch_fn = jax.jit(
        make_estimate_fn(experiment, stream_key(cfg.training.seed, Stream.EVAL_BPD)),
        in_shardings=(shd.shardings_of(abstract), *[batch_sh] * 4),
        out_shardings=shd.replicated(mesh),
    )
    return lambda model: estimate_bits_per_dim(model, batch_fn)


def format_table(result: Mapping[str, Any]) -> str:
    """The curve as printed lines: σ_rel, value, weight error, Σ|c|; the exponential EMA last."""
    lines = [f"sigma_rel  {result['metric']:>12}  weight_error  sum|c|   (step {result['step']})"]
    for q in result["points"]:
        lines.append(f"{q['sigma_rel']:<9g}  {q['value']:>12.5g}  {q['weight_error']:>12.1e}  "
                     f"{q['sum_abs_coefficients']:>6.3g}")  # fmt: skip
    e = result["exponential"]
    if e is not None:
        lines.append(f"{e['sigma_rel']:<9.3g}  {e['value']:>12.5g}  exponential EMA of the "
                     f"checkpoint (ema_decay {e['ema_decay']:g})")  # fmt: skip
    return "\n".join(lines)
