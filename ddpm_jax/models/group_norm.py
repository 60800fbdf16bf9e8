"""Group normalization (Wu & He, 2018) over NHWC activations, with an optional fused SiLU.

    y = act((x - μ_bg) / sqrt(σ²_bg + ε) · γ_c + β_c),   μ_bg, σ²_bg over (H, W, channels of g)

Two formulations of the statistics give the same numbers to float32 rounding; they differ
only in the order of the sums, which decides their speed on each backend:

- "per_group": the group's moments in one reduction of x reshaped to [B, H·W, G, C/G] over
  axes (1, 3). XLA's GPU and TPU reductions handle this layout well.
- "per_channel": the moments of each channel over (H, W) first (a reduction that keeps the
  contiguous channel axis, [B, C]), then those [B, C] moments averaged over each group's
  channels. XLA's CPU reductions are several times faster on this layout.

Both shift the data by the group's first element s (held constant for the gradient) before
taking moments: mean = s + E[d], var = E[d²] - E[d]² with d = x - s. The shift keeps the
one-pass variance accurate when |mean| >> std, where plain E[x²] - E[x]² cancels
catastrophically (activations far from zero in float32 or bfloat16), at the cost of one pass.

"auto" picks "per_channel" where the program runs on a CPU and "per_group" elsewhere, with
`jax.lax.platform_dependent`: the choice is made when the program is lowered for its
platform, not from the default backend at trace time, so a program lowered for a GPU (or
exported for several platforms) gets the GPU formulation even on a host whose default is CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

STATS = ("auto", "per_channel", "per_group")
ACTIVATIONS = (None, "silu")


def _check(x: jax.Array, groups: int, stats: str) -> None:
    if stats not in STATS:
        raise ValueError(f"group_norm: stats must be one of {STATS}, got {stats!r}.")
    if x.ndim < 2 or x.shape[-1] % groups:
        raise ValueError(
            f"group_norm: {x.shape[-1]} channels (shape {x.shape}) are not divisible by "
            f"{groups} groups."
        )


def _moments_per_group(x: jax.Array, groups: int) -> tuple[jax.Array, jax.Array]:
    b, c = x.shape[0], x.shape[-1]
    xg = x.reshape(b, -1, groups, c // groups)
    # Shift by a sample of each group; any constant gives the same exact statistics.
    shift = jax.lax.stop_gradient(xg[:, :1, :, :1])  # [B, 1, G, 1]
    d = xg - shift
    m1 = jnp.mean(d, axis=(1, 3))  # [B, G]
    var = jnp.maximum(jnp.mean(jnp.square(d), axis=(1, 3)) - jnp.square(m1), 0.0)
    return m1 + shift[:, 0, :, 0], var


def _channel_of_group(channels: int, groups: int) -> jax.Array:
    """The one-hot [C, G] map of channels to their groups, float32."""
    k = channels // groups
    return (jnp.arange(channels)[:, None] // k == jnp.arange(groups)[None, :]).astype(jnp.float32)


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def _moments_per_channel(x: jax.Array, groups: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(mean, var) [B, G] and the one-hot [C, G] map, summing per channel first.

    Group <-> channel conversions are products with the one-hot map (exact: one non-zero
    term), not reshapes to [.., G, C/G]: XLA's CPU backend materialises a matrix product,
    where it would fuse the reshape's per-element index arithmetic (c // (C/G), scalar
    code for small C/G) into every elementwise pass over the activations.
    """
    b, c = x.shape[0], x.shape[-1]
    k = c // groups
    onehot = _channel_of_group(c, groups)  # [C, G]
    xs = x.reshape(b, -1, c)
    # The same shift as "per_group" (the group's first element), repeated over its channels.
    shift = jax.lax.stop_gradient(xs[:, 0, ::k])  # [B, G]
    d = xs - _matmul(shift, onehot.T)[:, None, :]
    # Per channel over H·W (a reduction that keeps C contiguous), then over each group.
    m1 = _matmul(jnp.mean(d, axis=1), onehot) / k  # [B, G]
    m2 = _matmul(jnp.mean(jnp.square(d), axis=1), onehot) / k
    return m1 + shift, jnp.maximum(m2 - jnp.square(m1), 0.0), onehot


def _affine_per_group(x, scale, bias, groups, epsilon):
    mean, var = _moments_per_group(x, groups)
    k = x.shape[-1] // groups
    a = scale * jnp.repeat(jax.lax.rsqrt(var + epsilon), k, axis=-1)  # [B, C]
    return a, bias - jnp.repeat(mean, k, axis=-1) * a


def _affine_per_channel(x, scale, bias, groups, epsilon):
    mean, var, onehot = _moments_per_channel(x, groups)
    a = scale * _matmul(jax.lax.rsqrt(var + epsilon), onehot.T)  # [B, C]
    return a, bias - _matmul(mean, onehot.T) * a


def group_moments(x: jax.Array, groups: int, stats: str = "auto") -> tuple[jax.Array, jax.Array]:
    """Mean and (biased) variance of each group of channels of x, in float32.

    Args:
      x: activations [B, ..., C], C divisible by `groups`; any float dtype (upcast to float32).
      groups: number of groups G.
      stats: "per_channel", "per_group" or "auto" (see the module docstring).

    Returns:
      (mean, var), float32 [B, G] each.
    """
    _check(x, groups, stats)
    x = x.astype(jnp.float32)

    def per_channel(x):
        return _moments_per_channel(x, groups)[:2]

    def per_group(x):
        return _moments_per_group(x, groups)

    if stats == "auto":
        return jax.lax.platform_dependent(x, cpu=per_channel, default=per_group)
    return per_channel(x) if stats == "per_channel" else per_group(x)


def group_norm(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    *,
    groups: int,
    epsilon: float = 1e-6,
    activation: str | None = None,
    stats: str = "auto",
) -> jax.Array:
    """Group normalization of x [B, ..., C], then `activation`, computed in float32.

    The normalization is one per-(batch, channel) affine map x · a + b built from the
    group statistics, which XLA fuses with the activation and the surrounding elementwise ops.

    Args:
      x: activations [B, ..., C], C divisible by `groups`; any float dtype.
      scale: γ, float32 [C].
      bias: β, float32 [C].
      groups: number of groups G.
      epsilon: added to the variance.
      activation: None or "silu" (x · sigmoid(x)), applied to the normalized output.
      stats: how the statistics are summed, see `group_moments`.

    Returns:
      float32 [B, ..., C].
    """
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"group_norm: activation must be one of {ACTIVATIONS}, got {activation!r}."
        )
    _check(x, groups, stats)
    x = x.astype(jnp.float32)
    args = (x, scale, bias)

    def per_channel(x, scale, bias):
        return _affine_per_channel(x, scale, bias, groups, epsilon)

    def per_group(x, scale, bias):
        return _affine_per_group(x, scale, bias, groups, epsilon)

    if stats == "auto":
        a, b = jax.lax.platform_dependent(*args, cpu=per_channel, default=per_group)
    else:
        a, b = per_channel(*args) if stats == "per_channel" else per_group(*args)
    bshape = (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)
    y = x * a.reshape(bshape) + b.reshape(bshape)
    return jax.nn.silu(y) if activation == "silu" else y
