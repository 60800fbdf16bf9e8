r"""Imports Ho et al.'s released DDPMs (diffusers format) into a ddpm_jax workdir.

    ddpm-jax-import --source=google/ddpm-cifar10-32 --workdir=workdirs/cifar10_ho
    ddpm-jax-import --source=google/ddpm-church-256@<commit> --workdir=W
    ddpm-jax-import --source=DIR --workdir=W [--data_name=cifar10]
    ddpm-jax-import convert-bin DIR      # a pickled .bin -> safetensors (torch)

--source is a local directory (config.json, diffusion_pytorch_model.safetensors and
scheduler_config.json at the root, or unet/ + scheduler/) or a hub id with an optional
@revision (a branch is pinned to its commit; each file is checked against the hub's
checksum). --data_name names the dataset the model was trained on (a TFDS name, or
"digits") where the source's name does not say it. Then:

    ddpm-jax sample --workdir=workdirs/cifar10_ho
    ddpm-jax eval --workdir=workdirs/cifar10_ho

A source or config that cannot be imported is reported as one line, `error: ...`, with exit
status 2, and nothing is written.
"""

from __future__ import annotations

import sys

from absl import flags

from ddpm_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("source", None, "Local diffusers repository directory, or a hub id[@rev].")
flags.DEFINE_string("workdir", None, "The new workdir to write (config.json + a checkpoint).")
flags.DEFINE_string(
    "data_name", None, "config.data.name of the model's dataset (default: from its name)."
)


def main(argv: list[str]) -> None:
    from ddpm_jax import files

    args = argv[1:]
    if args[:1] == ["convert-bin"]:
        if len(args) != 2:
            cli.fail("usage: ddpm-jax-import convert-bin DIR")
        from ddpm_jax.pretrained import repo

        for path in repo.convert_bin(files.resolve_path(args[1])):
            print(f"wrote {path}")
        return
    if args:
        cli.fail(
            f"unexpected arguments {args}; usage: --source=SOURCE --workdir=W, or convert-bin DIR."
        )
    if not FLAGS.source or not FLAGS.workdir:
        cli.fail("--source and --workdir are required, e.g. --source=google/ddpm-cifar10-32 "
                 "--workdir=workdirs/cifar10_ho.")  # fmt: skip
    cli.prepare_jax()
    from ddpm_jax.pretrained import importer

    result = importer.import_diffusers(FLAGS.source, FLAGS.workdir, data_name=FLAGS.data_name)
    print(f"wrote {result.workdir} (step {result.step}, {result.num_params} parameters)")


def run() -> None:
    """The `ddpm-jax-import` console script (also `python -m ddpm_jax.pretrained`)."""
    cli.run(main, argv=sys.argv)


if __name__ == "__main__":
    run()
