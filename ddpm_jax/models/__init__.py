"""Ho et al.'s U-Net x̂_θ(x_t, t) in flax.linen, with its typed config and size/cost tools.

model = create_model(config)              # config: experiment ConfigDict or ModelConfig
variables = model.init(key, x, t)         # x [B, H, W, C] float, t [B] int
x0_hat = model.apply(variables, x, t, train=True, rngs={"dropout": key})
"""

from ddpm_jax.models.analysis import abstract_variables, count_params, forward_flops
from ddpm_jax.models.config import ModelConfig
from ddpm_jax.models.embedding import timestep_embedding
from ddpm_jax.models.unet import UNet, create_model

__all__ = [
    "ModelConfig",
    "UNet",
    "abstract_variables",
    "count_params",
    "create_model",
    "forward_flops",
    "timestep_embedding",
]
