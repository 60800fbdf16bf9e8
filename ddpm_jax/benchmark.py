"""`python -m ddpm_jax.benchmark`: the same command as `python -m ddpm_jax.bench`."""

from ddpm_jax.bench.__main__ import run

if __name__ == "__main__":
    run()
