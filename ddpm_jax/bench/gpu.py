r"""The one-shot accelerator measurement: every figure the GPU targets ask for, in one process.

    python -m ddpm_jax.bench.gpu --json=gpu.json            # on the GPU (launch/gpu_benchmark.sh)
    python -m ddpm_jax.bench.gpu --json=smoke.json --smoke  # anywhere: tiny sizes, 1 step

Measures, each with `bench.run` (the real sharded train step, the forward pass, the compiled
chains) and, where asked, the PyTorch reference (diffusers' UNet2DModel) on the same device:

- `c10_bf16`: the CIFAR-10 model's train step and forward pass at batch 128 in bfloat16
  (steps/s, MFU against 989 TFLOP/s dense bf16, peak memory, compile times), with torch;
- `c10_f32`: the same in float32, with torch;
- `celeba256_bf16`: the 256×256 model's train step at batch 64 in bfloat16 with remat;
- `ancestral_1000`: a 1000-step ancestral chain for 256 CIFAR-10 images (bf16);
- `dpm_solver_20`: DPM-Solver++(2M), 20 steps (log-SNR spacing), for 256 images (bf16).

The record is rewritten after every measurement, so a run cut short keeps what it measured;
a measurement that fails is recorded with its error and the others still run. Targets (an
H100/H200, bf16): >= 40% MFU and >= 60 steps/s at batch 128, 256 samples × 1000 steps <= 6 s.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import time
import traceback
from typing import Any

from absl import flags

from ddpm_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("json", "gpu_benchmark.json", "Where to write the record.")
flags.DEFINE_bool("smoke", False, "Tiny sizes and one step each: checks the script, not speed.")
flags.DEFINE_bool("reference", True, "Also measure the PyTorch reference where listed.")
flags.DEFINE_list("only", [], "Run only these measurements (names as in the docstring).")

_CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One `bench.run` call: a config, overrides, settings, and whether torch runs too."""

    name: str
    config: str  # a module of configs/, e.g. "cifar10"
    overrides: dict[str, Any]
    settings: dict[str, Any]
    reference: bool = False


PLAN = (
    Measurement(
        "c10_bf16",
        "cifar10",
        {"model.dtype": "bfloat16"},
        dict(batch_size=128, steps=20, repeats=5, warmup=3, parts=("train", "forward")),
        reference=True,
    ),
    Measurement(
        "c10_f32",
        "cifar10",
        {},
        dict(batch_size=128, steps=10, repeats=3, warmup=2, parts=("train", "forward")),
        reference=True,
    ),
    Measurement(
        "celeba256_bf16",
        "celeba_hq256",
        {"model.dtype": "bfloat16", "model.remat": True},
        dict(batch_size=64, steps=5, repeats=3, warmup=2, parts=("train",)),
    ),
    Measurement(
        "ancestral_1000",
        "cifar10",
        {"model.dtype": "bfloat16"},
        dict(
            batch_size=256,
            sample_steps=1000,
            repeats=2,
            warmup=1,
            compile_sample_steps=(1000,),
            parts=("sampling",),
        ),
    ),
    Measurement(
        "dpm_solver_20",
        "cifar10",
        {"model.dtype": "bfloat16"},
        dict(
            batch_size=256,
            sample_steps=20,
            repeats=5,
            warmup=1,
            compile_sample_steps=(20,),
            parts=("sampling",),
            sampler="dpm_solver++",
            sample_spacing="logsnr",
        ),
    ),
)

SMOKE = dict(batch_size=8, steps=1, repeats=1, warmup=0)


def load_config(name: str, overrides: dict[str, Any], smoke: bool):
    """configs/<name>.py with `overrides`; in smoke mode cut to the tiny offline model."""
    import importlib

    if os.path.abspath(_CONFIGS) not in map(os.path.abspath, sys.path):
        sys.path.insert(0, os.path.dirname(os.path.abspath(_CONFIGS)))
    config = importlib.import_module(f"configs.{name if not smoke else 'tiny'}").get_config()
    for path, value in overrides.items():
        group, field = path.split(".")
        config[group][field] = value
    return config


def smoke_settings(settings: dict[str, Any]) -> dict[str, Any]:
    out = {**settings, **SMOKE}
    if "sample_steps" in out:
        out["sample_steps"] = min(out["sample_steps"], 5)
        out["compile_sample_steps"] = (out["sample_steps"],)
    return out


def measure(m: Measurement, smoke: bool, reference: bool) -> dict[str, Any]:
    from ddpm_jax import bench

    settings = bench.BenchSettings(**(smoke_settings(m.settings) if smoke else m.settings))
    config = load_config(m.config, m.overrides, smoke)
    start = time.perf_counter()
    results = bench.run(
        config,
        settings,
        reference="torch" if (reference and m.reference) else None,
        config_name=f"configs/{'tiny' if smoke else m.config}.py",
    )
    results["wall_s"] = time.perf_counter() - start
    print(bench.format_table(results), flush=True)
    return results


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}.")
    unknown = sorted(set(FLAGS.only) - {m.name for m in PLAN})
    if unknown:
        cli.fail(f"--only names unknown measurement(s) {unknown}; known: {[m.name for m in PLAN]}.")
    cli.prepare_jax()
    import jax

    from ddpm_jax import files
    from ddpm_jax.bench import report

    path = files.resolve_path(FLAGS.json)
    record: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "smoke": FLAGS.smoke,
        "measurements": {},
        "summary": {},
    }
    for m in PLAN:
        if FLAGS.only and m.name not in FLAGS.only:
            continue
        try:
            record["measurements"][m.name] = measure(m, FLAGS.smoke, FLAGS.reference)
        except Exception as e:  # one failed measurement must not lose the others.
            record["measurements"][m.name] = {
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(),
            }
            print(f"{m.name} failed: {type(e).__name__}: {e}", flush=True)
        record["summary"] = summary(record["measurements"])
        report.write_json(record, path)
    print(format_summary(record["summary"]), flush=True)
    print(f"Wrote {path}", flush=True)


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def summary(measurements: dict[str, Any]) -> dict[str, Any]:
    """The figures the targets name, pulled out of the measurements (None where absent)."""
    c10, f32 = measurements.get("c10_bf16"), measurements.get("c10_f32")
    return {
        "c10_bf16_train_steps_per_s": _get(c10, "jax", "train", "steps_per_s"),
        "c10_bf16_train_mfu": _get(c10, "jax", "train", "mfu"),
        "c10_bf16_train_vs_torch": _get(c10, "ratios", "train_images_per_s"),
        "c10_bf16_peak_memory_bytes": _get(c10, "jax", "memory", "bytes"),
        "c10_bf16_train_compile_s": _get(c10, "jax", "train", "compile_s"),
        "c10_f32_train_steps_per_s": _get(f32, "jax", "train", "steps_per_s"),
        "c10_f32_train_vs_torch": _get(f32, "ratios", "train_images_per_s"),
        "celeba256_bf16_steps_per_s": _get(
            measurements, "celeba256_bf16", "jax", "train", "steps_per_s"
        ),
        "ancestral_1000_chain_s_256_images": _get(
            measurements, "ancestral_1000", "jax", "sampling", "chain_s", "median_s"
        ),
        "dpm_solver_20_chain_s_256_images": _get(
            measurements, "dpm_solver_20", "jax", "sampling", "chain_s", "median_s"
        ),
    }


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        "summary (targets on an H100/H200 in bf16: >= 40% MFU, >= 60 steps/s at batch 128,"
        " 256 x 1000 steps <= 6 s):"
    ]
    lines += [f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}" for k, v in s.items()]
    return "\n".join(lines)


def run() -> None:
    cli.run(main, argv=sys.argv)


if __name__ == "__main__":
    run()
