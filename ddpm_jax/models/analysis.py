"""Model size and cost: parameter counts and XLA's FLOP estimate of one forward pass."""

import math
from typing import Any

import jax
import jax.numpy as jnp

from ddpm_jax.models.config import ModelConfig
from ddpm_jax.models.unet import UNet, create_model


def count_params(tree: Any) -> int:
    """Total number of entries in a pytree of arrays (or of `jax.ShapeDtypeStruct`s).

    Accepts `params` or the whole `variables` dict of `model.init`.
    """
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def abstract_variables(model: UNet, batch_size: int = 1) -> Any:
    """Shapes and dtypes of `model.init`'s variables, without allocating or compiling.

    Returns:
      A pytree of `jax.ShapeDtypeStruct` (e.g. for `count_params`, or sharded init).
    """
    x, t = example_inputs(model.config, batch_size)
    return jax.eval_shape(model.init, jax.random.key(0), x, t)


def example_inputs(
    config: ModelConfig, batch_size: int = 1
) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    """Abstract (x [B, H, W, C] float32, t [B] int32) inputs of the model."""
    x = jax.ShapeDtypeStruct(
        (batch_size, config.image_size, config.image_size, config.in_channels), jnp.float32
    )
    return x, jax.ShapeDtypeStruct((batch_size,), jnp.int32)


def forward_flops(config: Any, batch_size: int = 1) -> float:
    """FLOPs of one jitted inference forward pass, from XLA's cost analysis.

    Multiplies and adds count separately (a K-deep dot product is 2K FLOPs). XLA counts a
    convolution's multiply-adds on real pixels only, not on SAME padding, so on CPU the
    CIFAR-10 model gives 11.66 GFLOPs per image where the dense count of its convolutions
    and Dense layers is 12.11 GFLOPs (plus 0.34 for the attention matmuls). Compiles the
    model once for the current backend (about 10-20 s on a CPU for the CIFAR-10 model).

    Args:
      config: an experiment ConfigDict or a `ModelConfig`.
      batch_size: images per forward pass.

    Returns:
      Total FLOPs for `batch_size` images (divide by batch_size for per-image).
    """
    model = create_model(config)
    variables = abstract_variables(model, batch_size)
    x, t = example_inputs(model.config, batch_size)
    compiled = jax.jit(lambda v, x, t: model.apply(v, x, t)).lower(variables, x, t).compile()
    cost = compiled.cost_analysis()
    # Older jax versions return a list with one dict per computation; 0.10 returns the dict.
    if isinstance(cost, list | tuple):
        cost = cost[0]
    if not cost or "flops" not in cost:
        raise NotImplementedError("this backend's cost analysis does not report 'flops'.")
    return float(cost["flops"])
