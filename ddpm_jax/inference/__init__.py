"""Inference: sampling from a workdir's model.

- `sampler`: `Sampler` and `load_sampler(workdir)`, for users' code: EMA weights only, no
  optimizer; chunked, sharded, jitted chains; the network itself as `Sampler.model_fn`.
- `write_samples`: `--mode=sample`, resumable chunks of samples written to the workdir.

Nothing here imports `ddpm_jax.train`.
"""

from ddpm_jax.inference.sampler import Sampler, load_sampler

__all__ = ["Sampler", "load_sampler"]
