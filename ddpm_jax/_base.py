"""What the maths modules share: the model type, argument checks and per-example reductions.

Private to the mathematics (`schedules`, `diffusion`, `likelihood`, `losses`, `timesteps`,
`solvers`, `sampling`); it imports nothing from the package.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

# `model_fn(x_t, t) -> prediction`: x_t float32 [B, ...], t int32 [B]; the prediction has
# x_t's shape (2C channels with a learned variance).
ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def check_choice(value: str, allowed: tuple[str, ...], name: str) -> None:
    """Raises ValueError unless `value` is one of `allowed`, naming the argument."""
    if value not in allowed:
        raise ValueError(f"Unknown {name} {value!r}; expected one of {allowed}.")


def mean_flat(x: jax.Array) -> jax.Array:
    """Mean over every axis but the first: [B, ...] -> [B]."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def sum_flat(x: jax.Array) -> jax.Array:
    """Sum over every axis but the first: [B, ...] -> [B]."""
    return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def timestep_vector(t: jax.typing.ArrayLike, batch: int) -> jax.Array:
    """One timestep for a whole batch: int32 [batch] filled with `t` (may be traced)."""
    return jnp.full((batch,), t, dtype=jnp.int32)
