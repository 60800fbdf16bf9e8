"""The EDM train step against the DDPM one: the same U-Net and batch, timed in one process.

    ddpm-jax-benchmark --config=configs/digits.py --parts=formulations --batch_size=64

The config's sharded train step (`train.make_train_step`, jitted as the training loop jits it)
is compiled with `config.diffusion.formulation = "ddpm"` and with `"edm"` (its DDPM-only fields
reset to their defaults), and the two are timed in alternating repeats, so that a change of
the host's load during the run hits both alike. EDM's preconditioning and loss weight are
elementwise, so its step should cost what DDPM's costs: the ratio is the figure.
"""

from __future__ import annotations

import logging
import statistics
from typing import Any

import jax
import ml_collections
import numpy as np

from ddpm_jax import train
from ddpm_jax.bench.common import BenchSettings, rates, time_steps
from ddpm_jax.bench.jax_bench import bench_config, compile_timed, cost_flops
from ddpm_jax.experiment import ExperimentConfig, defaults
from ddpm_jax.experiment.edm_config import DDPM_ONLY_FIELDS
from ddpm_jax.runtime import sharding as shd

FORMULATIONS = ("ddpm", "edm")


def formulation_config(
    config: ml_collections.ConfigDict, formulation: str, batch_size: int
) -> ml_collections.ConfigDict:
    """`config` (batch `batch_size`) as a model of `formulation`; EDM keeps its U-Net."""
    cfg = bench_config(config, batch_size)
    cfg.diffusion.formulation = formulation
    if formulation == "edm":
        base = defaults.get_config()
        for name in (*DDPM_ONLY_FIELDS, "variance"):
            cfg.diffusion[name] = base.diffusion[name]
        cfg.sampling.update(sampler="heun", num_steps=0, timestep_spacing="endpoints", order=2,
                            eta=0.0)  # fmt: skip
    return cfg


def measure(config: ml_collections.ConfigDict, settings: BenchSettings) -> dict[str, Any]:
    """Train-step time of both formulations, alternating `settings.repeats` times.

    Returns:
      {"ddpm": {...}, "edm": {...}, "edm_over_ddpm_step_s": ratio of median step times},
      each formulation with its compile times, "step_s" (median/min/max over repeats of
      `settings.steps` steps), steps/s, images/s and XLA's FLOPs per image.
    """
    B = settings.batch_size
    mesh = shd.make_mesh()
    n_dev = int(mesh.devices.size)
    key = jax.random.PRNGKey(settings.seed)
    size, ch = int(config.data.image_size), int(config.data.channels)
    rng = np.random.default_rng(settings.seed)
    host_batch = {
        "image": rng.uniform(-1, 1, (B, size, size, ch)).astype(np.float32),
        "label": rng.integers(0, max(1, config.model.num_classes), B).astype(np.int32),
    }
    runs = {}
    for formulation in FORMULATIONS:
        cfg = ExperimentConfig.from_config(formulation_config(config, formulation, B))
        cfg.check_devices(n_dev, jax.process_count())
        setup = train.build(cfg, mesh)
        state = shd.init_sharded(setup.init_fn, setup.abstract, key)
        state_sh = shd.shardings_of(setup.abstract)
        batch_sh = shd.batch_sharding(mesh)
        batch = jax.device_put(host_batch, batch_sh)
        logging.info("ddpm_jax: compiling the %s train step.", formulation)
        step_fn = jax.jit(
            train.make_train_step(setup.experiment, setup.optimizer),
            in_shardings=(state_sh, batch_sh),
            out_shardings=(state_sh, shd.replicated(mesh)),
            donate_argnums=(0,),
        )
        compiled, times = compile_timed(step_fn, state, batch)
        holder = {"state": state}

        def run(compiled=compiled, holder=holder, batch=batch):
            holder["state"], metrics = compiled(holder["state"], batch)
            return metrics

        for _ in range(settings.warmup):
            jax.block_until_ready(run())
        flops = cost_flops(compiled)
        runs[formulation] = {
            "run": run,
            "times": times,
            "per_repeat": [],
            "flops_per_image": flops * n_dev / B if flops is not None else None,
        }
    for _ in range(settings.repeats):  # alternate, so that load drifts hit both.
        for formulation in FORMULATIONS:
            timing = time_steps(runs[formulation]["run"], jax.block_until_ready,
                                steps=settings.steps, repeats=1)  # fmt: skip
            runs[formulation]["per_repeat"].append(timing["per_repeat_s"][0])
    out: dict[str, Any] = {}
    for formulation, r in runs.items():
        per = r["per_repeat"]
        step_s = {"median_s": statistics.median(per), "min_s": min(per), "max_s": max(per),
                  "per_repeat_s": per}  # fmt: skip
        out[formulation] = {**r["times"], "step_s": step_s, **rates(step_s["median_s"], B),
                            "flops_per_image": r["flops_per_image"]}  # fmt: skip
    out["edm_over_ddpm_step_s"] = (
        out["edm"]["step_s"]["median_s"] / out["ddpm"]["step_s"]["median_s"]
    )
    out["batch_size"] = B
    return out


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table of `measure`'s results."""
    lines = [f"train step, DDPM against EDM formulation (batch {results['batch_size']}; "
             "median [min-max] over alternating repeats)"]  # fmt: skip
    for formulation in FORMULATIONS:
        r = results[formulation]
        s = r["step_s"]
        gflops = r["flops_per_image"]
        lines.append(
            f"  {formulation:<4}  {s['median_s'] * 1e3:8.1f} ms [{s['min_s'] * 1e3:.1f}-"
            f"{s['max_s'] * 1e3:.1f}]  {r['images_per_s']:9.1f} images/s  "
            f"{'n/a' if gflops is None else f'{gflops * 1e-9:.3f}'} GFLOPs/image  "
            f"compile {r['compile_s']:.1f} s"
        )
    lines.append(f"  EDM / DDPM step time: {results['edm_over_ddpm_step_s']:.3f}")
    return "\n".join(lines)
