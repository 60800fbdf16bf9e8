"""Sinusoidal timestep embedding and the MLP that lifts it to the ResNet blocks' width."""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.models.layers import default_init


def timestep_embedding(
    t: jax.typing.ArrayLike, dim: int, max_period: float = 10_000.0
) -> jax.Array:
    """Sinusoidal embedding of timesteps, as in Ho et al.'s (and the Transformer's) code.

    With half = dim // 2 and frequencies f_i = exp(-log(max_period) * i / (half - 1)),
    i = 0..half-1, the embedding is [sin(t f_0), …, sin(t f_{half-1}), cos(t f_0), …];
    an odd `dim` is padded with one zero column.

    Args:
      t: timesteps, shape [B], integer or float.
      dim: embedding width (≥ 4 so that half - 1 > 0).
      max_period: the longest period, 10000 in Ho et al.

    Returns:
      float32 array [B, dim].
    """
    if dim < 4:
        raise ValueError(f"timestep embedding dim must be ≥ 4, got {dim}.")
    t = jnp.asarray(t)
    if t.ndim != 1:
        raise ValueError(f"timesteps t must have shape [B], got {t.shape}.")
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) / (half - 1) * jnp.arange(half, dtype=jnp.float32))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbed(nn.Module):
    """t -> sinusoidal(ch) -> Dense(4ch) -> SiLU -> Dense(4ch).

    Attributes:
      ch: width of the sinusoidal embedding; the output has 4 * ch features.
      dtype: computation dtype of the two Dense layers.
    """

    ch: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        """Maps timesteps [B] to embeddings [B, 4 * ch] in `dtype`."""
        emb = timestep_embedding(t, self.ch)
        emb = nn.Dense(4 * self.ch, kernel_init=default_init(), dtype=self.dtype, name="dense0")(
            emb
        )
        emb = nn.silu(emb)
        return nn.Dense(4 * self.ch, kernel_init=default_init(), dtype=self.dtype, name="dense1")(
            emb
        )
