"""Spatial self-attention block of Ho et al.'s U-Net (single- or multi-head)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.models.layers import GroupNorm, dense


class AttnBlock(nn.Module):
    """x + proj_out(softmax(q kᵀ / sqrt(d)) v) over the H·W positions, per head.

    q, k and v are 1×1 projections of GN(x); proj_out is zero-initialised so the block is
    the identity at initialisation. Logits and softmax are computed in float32.

    Attributes:
      num_heads: heads; each has C / num_heads channels (1 = Ho et al.).
      dtype: computation dtype.
      norm_groups: groups of the GroupNorm; None: `num_groups(C)`.
    """

    num_heads: int = 1
    dtype: Any = jnp.float32
    norm_groups: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, H, W, C] -> [B, H, W, C] in `dtype`."""
        b, hgt, wid, c = x.shape
        if c % self.num_heads:
            raise ValueError(
                f"AttnBlock: {c} channels not divisible by num_heads={self.num_heads}."
            )
        d = c // self.num_heads
        h = GroupNorm(dtype=self.dtype, groups=self.norm_groups, name="norm")(x)
        q, k, v = (
            dense(c, dtype=self.dtype, name=n)(h).reshape(b, hgt * wid, self.num_heads, d)
            for n in ("q", "k", "v")
        )
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits * (d**-0.5), axis=-1).astype(self.dtype)
        h = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, hgt, wid, c)
        h = dense(c, dtype=self.dtype, scale=0.0, name="proj_out")(h)
        return x.astype(self.dtype) + h
