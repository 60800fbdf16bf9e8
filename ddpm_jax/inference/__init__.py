"""Inference: sampling from a workdir's model.

- `trained_model`: `TrainedModel` and `load_sampler(workdir)`, for users' code: EMA weights
  only, no optimizer; chunked, sharded, jitted chains of any sampler; the network itself as
  `TrainedModel.model_fn`.
- `write_samples`: `ddpm-jax sample`, resumable chunks of samples written to the workdir.

Nothing here imports `ddpm_jax.train`.
"""

from ddpm_jax.inference.trained_model import TrainedModel, load_sampler

__all__ = ["TrainedModel", "load_sampler"]
