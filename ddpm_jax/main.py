r"""Command-line entry point: train, evaluate or sample from an ml_collections config.

    python -m ddpm_jax.main --config=configs/digits.py --workdir=workdirs/digits
    python -m ddpm_jax.main --config=configs/cifar10.py --workdir=DIR --mode=eval
    python -m ddpm_jax.main --config=configs/cifar10.py --workdir=DIR --mode=sample \
        --config.sampling.num_samples=1000

Every other setting is `--config.group.field=value`. Training resumes from the newest
checkpoint in `--workdir`; running the same command again continues an interrupted run.
In a multi-process run (TPU pod, SLURM, Open MPI, or JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/
JAX_PROCESS_ID) every process runs this same command.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"], "What to run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from ddpm_jax import xla_flags  # before JAX starts its backend, which reads XLA_FLAGS once.

    os.environ["XLA_FLAGS"] = xla_flags.with_cpu_defaults(os.environ.get("XLA_FLAGS", ""))
    from ddpm_jax import distributed  # imports JAX: after flag parsing, before any use.

    distributed.initialize_if_needed()
    import jax

    logging.info(
        "JAX %s: process %d of %d, %d local / %d global devices (%s).",
        jax.__version__,
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices()[0].platform,
    )
    config = FLAGS.config
    if FLAGS.mode == "train":
        from ddpm_jax import train

        train.train_and_evaluate(config, FLAGS.workdir)
    elif FLAGS.mode == "eval":
        from ddpm_jax import evaluate

        evaluate.evaluate(config, FLAGS.workdir)
    else:
        from ddpm_jax import generate

        generate.generate(config, FLAGS.workdir)


def run() -> None:
    """Console entry point (also `python -m ddpm_jax.main`)."""
    logging.getLogger().setLevel(logging.INFO)
    app.run(main, argv=sys.argv)


if __name__ == "__main__":
    run()
