"""`python -m ddpm_jax.ema --workdir=W --sigma_rel=...`: the same command as `ddpm-jax ema`."""

import sys

from ddpm_jax import cli, main


def run() -> None:
    """`ddpm-jax ema` under its module name."""
    cli.run(main.main, argv=[sys.argv[0], "--mode=ema", *sys.argv[1:]])


if __name__ == "__main__":
    run()
