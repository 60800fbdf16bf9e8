r"""Benchmark: training and sampling throughput, compile time, memory, FLOPs and MFU.

    python -m ddpm_jax.benchmark --config=configs/cifar10.py --batch_size=8
    python -m ddpm_jax.benchmark --config=configs/cifar10.py --batch_size=8 --reference=torch \
        --json=bench.json
    python -m ddpm_jax.benchmark --config=configs/cifar10.py --config.model.dtype=bfloat16 \
        --batch_size=128 --steps=20 --peak_tflops=989

Measures, after compilation and warm-up, with device synchronisation, the median over
`--repeats` of: the sharded train step of `train.loop.train` (steps/s, images/s), the
forward pass with the EMA parameters, and the compiled ancestral sampler on a short
respaced chain (per reverse step, against one forward pass, projected to the full T-step
chain); compile times (the sampler's at two chain lengths, compiled but not run); FLOPs per
image from XLA's cost analysis, achieved FLOP/s and MFU; peak memory. `--reference=torch`
runs the same U-Net in PyTorch (diffusers' `UNet2DModel`, `pip install ddpm_jax[bench]`) in
the same process with the same batch, dtype and steps, and prints ddpm_jax / reference.
Any `--config.group.field=value` overrides the config (e.g. the compute dtype). The parts
that measure no model (`--parts=sampler_accuracy,input`) need no `--config`;
`--parts=formulations` times the config's train step as a DDPM and as an EDM model.

Like `ddpm_jax.main`, this sets the project's XLA CPU defaults before JAX starts its backend;
`--noxla_cpu_defaults` measures without them. It runs as `python -m ddpm_jax.bench` or
`python -m ddpm_jax.benchmark`.
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from ddpm_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_integer("batch_size", None, "Images per step (default: config.training.batch_size).")
flags.DEFINE_integer("steps", 3, "Timed steps per repeat (train and forward).")
flags.DEFINE_integer("repeats", 3, "Timed repeats; figures are medians over repeats.")
flags.DEFINE_integer("warmup", 1, "Untimed steps after compilation.")
flags.DEFINE_integer("sample_steps", 10, "Length of the timed (respaced) sampling chain.")
flags.DEFINE_string("sampler", "ancestral", "Sampler of the timed chain (sampling.SAMPLERS).")
flags.DEFINE_string("sample_spacing", "endpoints", "Its timestep spacing (timesteps.SPACINGS).")
flags.DEFINE_list(
    "compile_sample_steps", [], "Chain lengths whose sampler is compiled, not run "
    "(default: --sample_steps and T)."
)  # fmt: skip
flags.DEFINE_enum("reference", None, ["torch"], "Also measure this reference implementation.")
flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s per device for MFU (default: known table).")
flags.DEFINE_string("json", None, "Write the results to this JSON file.")
flags.DEFINE_list("parts", ["train", "forward", "sampling"], "What to measure.")
flags.DEFINE_bool(
    "xla_cpu_defaults", True, "Add runtime.xla_flags' CPU defaults to XLA_FLAGS (as main.py)."
)


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}.")
    cli.prepare_jax(xla_cpu_defaults=FLAGS.xla_cpu_defaults)
    from ddpm_jax import bench, files
    from ddpm_jax.bench import common

    config, config_name = FLAGS.config, ""
    if config is None:  # the oracle and input parts measure no model of a config.
        model_parts = [p for p in FLAGS.parts if p in common.CONFIG_PARTS]
        if model_parts:
            cli.fail(f"--parts={','.join(model_parts)} measures a model: give its config, "
                     "e.g. --config=configs/cifar10.py.")  # fmt: skip
        from ddpm_jax.experiment import defaults

        config = defaults.get_config()
    else:
        config_name = config_flags.get_config_filename(FLAGS["config"])
    settings = bench.BenchSettings(
        batch_size=FLAGS.batch_size or int(config.training.batch_size),
        steps=FLAGS.steps,
        repeats=FLAGS.repeats,
        warmup=FLAGS.warmup,
        sample_steps=FLAGS.sample_steps,
        sampler=FLAGS.sampler,
        sample_spacing=FLAGS.sample_spacing,
        compile_sample_steps=tuple(int(k) for k in FLAGS.compile_sample_steps),
        peak_tflops=FLAGS.peak_tflops,
        parts=tuple(FLAGS.parts),
    )
    results = bench.run(
        config,
        settings,
        reference=FLAGS.reference,
        config_name=config_name,
    )
    results["meta"]["xla_cpu_defaults"] = FLAGS.xla_cpu_defaults
    results["meta"]["command"] = " ".join(sys.argv)
    print(bench.format_table(results), flush=True)
    if FLAGS.json:
        path = files.resolve_path(FLAGS.json)
        bench.write_json(results, path)
        print(f"Wrote {path}", flush=True)


def run() -> None:
    """The `ddpm-jax-benchmark` console script (also `python -m ddpm_jax.benchmark`)."""
    cli.run(main, argv=sys.argv)


if __name__ == "__main__":
    run()
