"""U-Net building blocks: initialisers, GroupNorm, resampling layers and the ResNet block.

All layers take NHWC activations. Parameters are float32; `dtype` is the computation dtype.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.models.config import num_groups
from ddpm_jax.models.group_norm import group_norm


def default_init(scale: float = 1.0) -> nn.initializers.Initializer:
    """Ho et al.'s initialiser: variance scaling, fan_avg, uniform; scale 0 gives zeros.

    Ho et al. use scale 1e-10 for "zero" layers; exact zeros make the network's output
    exactly zero at initialisation, which is the same function and easier to test.
    """
    if scale == 0.0:
        return nn.initializers.zeros_init()
    return nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


def conv3x3(
    features: int, *, dtype: Any, stride: int = 1, scale: float = 1.0, name: str
) -> nn.Conv:
    """A 3×3 'SAME' convolution (stride 2 pads only the high side, like TensorFlow)."""
    return nn.Conv(
        features,
        (3, 3),
        strides=(stride, stride),
        padding="SAME",
        kernel_init=default_init(scale),
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def dense(features: int, *, dtype: Any, scale: float = 1.0, name: str) -> nn.Dense:
    """A Dense layer on the last axis (a 1×1 convolution on NHWC activations)."""
    return nn.Dense(
        features, kernel_init=default_init(scale), dtype=dtype, param_dtype=jnp.float32, name=name
    )


class GroupNorm(nn.Module):
    """Group normalization over NHWC activations, `groups` or `num_groups(C)` groups, in float32.

    Statistics come from one pass over d = x - s, where s is the group's first element
    (held constant for the gradient): mean = s + E[d] and var = E[d²] - E[d]². The shift
    keeps the one-pass variance accurate when |mean| >> std, where plain E[x²] - E[x]²
    cancels catastrophically (activations far from zero in float32 or bfloat16), at the
    speed of one pass. The result is a single per-(batch, channel) affine map x * a + b,
    which XLA fuses with the activation and the surrounding elementwise ops. See
    `models.group_norm` for the two summation orders of the statistics (`stats`).

    Attributes:
      dtype: dtype of the output.
      epsilon: added to the variance (1e-6, TensorFlow's group_norm default used by Ho et al.).
      groups: number of groups; None: `num_groups(C)` (`ModelConfig.norm_groups`).
      activation: None, or "silu" applied to the normalized output (in float32).
      stats: "auto" (per channel first on CPUs, per group elsewhere), or "per_channel" /
        "per_group" to force one formulation on any backend (e.g. to compare them). Both
        give the same statistics to float32 rounding; parameters do not depend on it.
    """

    dtype: Any = jnp.float32
    epsilon: float = 1e-6
    groups: int | None = None
    activation: str | None = None
    stats: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalises x [B, ..., C]; returns the same shape in `dtype`."""
        c = x.shape[-1]
        g = num_groups(c) if self.groups is None else self.groups
        if c % g:
            raise ValueError(f"GroupNorm: {c} channels are not divisible by {g} groups.")
        scale = self.param("scale", nn.initializers.ones_init(), (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (c,), jnp.float32)
        y = group_norm(
            x,
            scale,
            bias,
            groups=g,
            epsilon=self.epsilon,
            activation=self.activation,
            stats=self.stats,
        )
        return y.astype(self.dtype)


def upsample_nearest(x: jax.Array) -> jax.Array:
    """Nearest-neighbour 2× upsampling: [B, H, W, C] -> [B, 2H, 2W, C]."""
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return x.reshape(b, 2 * h, 2 * w, c)


def downsample_avg(x: jax.Array) -> jax.Array:
    """2×2 average pooling with stride 2: [B, H, W, C] -> [B, H/2, W/2, C]."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4)).astype(x.dtype)


class Downsample(nn.Module):
    """Halves the resolution: 3×3 stride-2 conv (`with_conv`) or 2×2 average pooling."""

    with_conv: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, H/2, W/2, C]."""
        if self.with_conv:
            return conv3x3(x.shape[-1], stride=2, dtype=self.dtype, name="conv")(x)
        return downsample_avg(x)


class Upsample(nn.Module):
    """Doubles the resolution: nearest neighbour, then a 3×3 conv if `with_conv`."""

    with_conv: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, 2H, 2W, C]."""
        x = upsample_nearest(x)
        if self.with_conv:
            x = conv3x3(x.shape[-1], dtype=self.dtype, name="conv")(x)
        return x


class ResnetBlock(nn.Module):
    """Ho et al.'s ResNet block with timestep conditioning.

    h = conv0(SiLU(GN(x))) + Dense(SiLU(temb)); h = conv1(dropout(SiLU(GN(h)))) with conv1
    zero-initialised; the skip is a 1×1 projection when the width changes. With `resample`
    ("up" | "down") the block also changes resolution (BigGAN style, as in the DDPM++ /
    improved-DDPM U-Nets): both branches are resampled after the first normalisation.

    Attributes:
      out_ch: output channels.
      dropout: dropout rate before the second convolution.
      resample: None, "up" (nearest 2×) or "down" (2×2 average pooling).
      dtype: computation dtype.
      norm_groups: groups of both GroupNorms; None: `num_groups(C)`.
    """

    out_ch: int
    dropout: float = 0.0
    resample: str | None = None
    dtype: Any = jnp.float32
    norm_groups: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, train: bool = False) -> jax.Array:
        """x [B, H, W, C_in], temb [B, D] -> [B, H', W', out_ch] in `dtype`.

        `train` enables dropout (then an rng stream named 'dropout' is needed).
        """
        h = GroupNorm(self.dtype, groups=self.norm_groups, activation="silu", name="norm0")(x)
        if self.resample == "up":
            h, x = upsample_nearest(h), upsample_nearest(x)
        elif self.resample == "down":
            h, x = downsample_avg(h), downsample_avg(x)
        elif self.resample is not None:
            raise ValueError(
                f"ResnetBlock.resample must be None, 'up' or 'down', got {self.resample!r}."
            )
        h = conv3x3(self.out_ch, dtype=self.dtype, name="conv0")(h)
        h = h + dense(self.out_ch, dtype=self.dtype, name="temb_proj")(nn.silu(temb))[:, None, None]
        h = GroupNorm(self.dtype, groups=self.norm_groups, activation="silu", name="norm1")(h)
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = conv3x3(self.out_ch, dtype=self.dtype, scale=0.0, name="conv1")(h)
        x = x.astype(self.dtype)
        if x.shape[-1] != self.out_ch:
            x = dense(self.out_ch, dtype=self.dtype, name="skip")(x)
        return x + h
