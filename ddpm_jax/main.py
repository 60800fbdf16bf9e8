r"""The `ddpm-jax` command: train, sample from or evaluate a model, from an ml_collections config.

    ddpm-jax train --config=configs/digits.py --workdir=workdirs/digits
    ddpm-jax sample --workdir=workdirs/digits \
        --config.sampling.num_samples=1000 [--config.sampling.sampler=ddim ...]
    ddpm-jax eval --workdir=workdirs/digits
    ddpm-jax ema --workdir=workdirs/digits --sigma_rel=0.05,0.10 [--step=N] [--sweep=METRIC]

`python -m ddpm_jax.main --mode=train|sample|eval|ema ...` is the same command (`--mode` in
place of the first word; without either, it trains). `ema` writes post-hoc EMAs of a run
trained with `optim.ema_profiles` and `optim.ema_snapshot_every` (`ddpm_jax.ema`), which
`--config.eval.ema=NAME` then samples or evaluates. Every other setting is
`--config.group.field=value` (every field is documented in `ddpm_jax/experiment/defaults.py`).
Training resumes from the newest checkpoint in `--workdir`; running the same command again
continues an interrupted run. Sampling and evaluation take the model from the workdir's
config.json, so `--config` is optional there (given, only its sampling, eval and mesh groups
are used). Of the trained fields only `--config.diffusion.variance` and
`--config.diffusion.clip_denoised` may change there. In a multi-process run (TPU pod, SLURM,
Open MPI, or JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID) every process runs this
same command.

Bad input (a config value, a path, a workdir in use) is reported as one line, `error: ...`,
with exit status 2; `--verbose` shows the traceback.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import flags
from ml_collections import config_flags

from ddpm_jax import cli

MODES = ("train", "sample", "eval", "ema")
# The metrics of `ddpm-jax ema --sweep` (`ddpm_jax.ema.sweep.METRICS`).
SWEEP_METRICS = ("bpd_estimate", "bpd", "fid")

FLAGS = flags.FLAGS
# The package's defaults stand in when --config is not given, so that --config.group.field=v
# overrides parse for sampling and evaluation too (they then apply to the workdir's config).
_DEFAULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "experiment", "defaults.py")
config_flags.DEFINE_config_file(
    "config", _DEFAULTS, "Experiment config file (required to train).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
flags.DEFINE_enum("mode", "train", list(MODES), "What to run (or give it as the first word).")
flags.mark_flags_as_required(["workdir"])
# `ddpm-jax ema` only.
flags.DEFINE_list("sigma_rel", None, "ema: the σ_rel of each post-hoc EMA, in (0, 0.2887].")
flags.DEFINE_integer("step", None, "ema: the step to average up to, a snapshot step (default: "
                     "the last).")  # fmt: skip
flags.DEFINE_list("from_profiles", None, "ema: use only the snapshots of these tracked σ_rel.")
flags.DEFINE_enum("sweep", None, list(SWEEP_METRICS), "ema: evaluate each σ_rel with this "
                  "metric and write the curve, instead of writing the EMAs.")  # fmt: skip
EMA_FLAGS = ("sigma_rel", "step", "from_profiles", "sweep")
flags.DEFINE_string(
    "startup_json", None, "Write the phases of the start (imports, restore, compilation, ...; "
    "wall and CPU seconds) to this JSON file, once the first step is logged or the samples "
    "are written (`ddpm-jax-restart` reads it)."
)  # fmt: skip


def command_line_overrides() -> dict[str, object]:
    """{"group.field": value} of the `--config.group.field=value` flags given."""
    prefix = "config."
    return {
        n[len(prefix) :]: FLAGS[n].value for n in FLAGS if n.startswith(prefix) and FLAGS[n].present
    }


def sampling_overrides(config) -> dict[str, object]:
    """The `--config.*` flags that a sampling or evaluation run applies to the workdir's config.

    Without `--config`, all of them (`changes.apply_overrides` refuses trained fields). With
    it, its sampling/eval/mesh groups already carry theirs (`changes.resolve_config`); of the
    trained fields only those a sampler may change, and only when given on the command line
    (a config file's own `diffusion.variance` must not replace a trained, learned one).
    """
    given = command_line_overrides()
    if config is None:
        return given
    from ddpm_jax.experiment.changes import SAMPLING_DIFFUSION_FIELDS

    return {k: v for k, v in given.items() if k in SAMPLING_DIFFUSION_FIELDS}


def main(argv: list[str]) -> None:
    from ddpm_jax.runtime.startup import StartupTimer

    timer = StartupTimer(FLAGS.startup_json)
    with timer.phase("config"):
        workdir, config, overrides, ema_args = _check(argv)
    with timer.phase("jax_init"):
        cli.prepare_jax()
        import jax

        logging.info(
            "JAX %s: process %d of %d, %d local / %d global devices (%s); workdir %s.",
            jax.__version__, jax.process_index(), jax.process_count(), jax.local_device_count(),
            jax.device_count(), jax.devices()[0].platform, workdir,
        )  # fmt: skip
    if FLAGS.mode == "train":
        with timer.phase("imports_mode"):
            from ddpm_jax.train import loop

        loop.train(config, workdir, timer=timer)
    elif FLAGS.mode == "eval":
        with timer.phase("imports_mode"):
            from ddpm_jax.evaluation import evaluate

        evaluate.evaluate(config, workdir, config_overrides=overrides)
    elif FLAGS.mode == "ema":
        from ddpm_jax.ema import command

        command.run(config, workdir, **ema_args, config_overrides=overrides)
    else:
        with timer.phase("imports_mode"):
            from ddpm_jax.inference import write_samples

        write_samples.write_samples(config, workdir, config_overrides=overrides, timer=timer)
    timer.event("done")
    timer.write()


def _check(argv: list[str]):
    """The workdir, config, sampling overrides and ema arguments, checked before JAX starts."""
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; settings go in --config.group.field=value.")
    config = cli.loaded_config("config")
    if config is None and FLAGS.mode == "train":
        cli.fail("--config is required to train, e.g. --config=configs/digits.py.")
    ema_args = _ema_arguments()
    from ddpm_jax import files
    from ddpm_jax.experiment import ExperimentConfig, changes
    from ddpm_jax.runtime import workdir as wd

    workdir = files.resolve_path(FLAGS.workdir)
    if config is not None:
        config = changes.resolve_config_paths(config)
    overrides = sampling_overrides(config)
    # Every field checked, before JAX even starts; sampling and evaluation check the config
    # they will run: the workdir's model and data, how to run from the command line.
    ExperimentConfig.from_config(
        config if FLAGS.mode == "train" else changes.run_config(config, workdir, overrides)
    )
    if FLAGS.mode == "train":
        wd.check_workdir(workdir)  # a path that cannot be a workdir fails before JAX starts.
    return workdir, config, overrides, ema_args


def _ema_arguments() -> dict[str, object]:
    """The `ddpm-jax ema` flags, parsed (or one `error:` line); refused in the other modes."""
    given = [f"--{n}" for n in EMA_FLAGS if FLAGS[n].present]
    if FLAGS.mode != "ema":
        if given:
            cli.fail(f"{', '.join(given)} belong(s) to `ddpm-jax ema`, not {FLAGS.mode}.")
        return {}
    if not FLAGS.sigma_rel:
        cli.fail("ddpm-jax ema needs --sigma_rel, e.g. --sigma_rel=0.05,0.10.")

    def floats(name: str) -> list[float] | None:
        values = FLAGS[name].value
        if values is None:
            return None
        try:
            return [float(v) for v in values]
        except ValueError:
            cli.fail(f"--{name}={','.join(values)}: expected numbers such as 0.05,0.10.")

    return {"sigma_rels": floats("sigma_rel"), "step": FLAGS.step,
            "from_profiles": floats("from_profiles"), "sweep": FLAGS.sweep}  # fmt: skip


def run() -> None:
    """The `ddpm-jax` console script: `ddpm-jax train|sample|eval|ema ...` (also `python -m
    ddpm_jax.main [--mode=...]`)."""
    cli.run(main, argv=cli.subcommand_as_flag(sys.argv, "mode", MODES))


if __name__ == "__main__":
    run()
