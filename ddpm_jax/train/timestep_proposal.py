"""The proposal of the training timesteps (`config.diffusion.timestep_proposal`): uniform, or
by importance ("loss_aware").

"loss_aware" is Nichol & Dhariwal's loss-second-moment resampler: t is drawn with
p_t ∝ sqrt(E[L_t²]) over the last `HISTORY` losses seen at t, mixed with a uniform floor
(`UNIFORM_PROB`), and the loss at t is multiplied by 1/(T p_t), so that its expectation stays
the uniform one, E_{t~p}[L_t / (T p_t)] = (1/T) Σ_t L_t. Until every t has `HISTORY` losses the
draw is uniform. The state (`ResamplerState`) is part of the train state: updated inside the
jitted step from the global batch, sharded (replicated) and checkpointed with it, so a resumed
run draws exactly the timesteps an uninterrupted one draws.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

HISTORY = 10
UNIFORM_PROB = 0.001


class ResamplerState(NamedTuple):
    """The loss history of the "loss_aware" proposal.

    Attributes:
      losses: float32 [T, HISTORY], the last losses seen at each t, oldest first once full.
      counts: int32 [T], how many losses each t has seen (capped at HISTORY).
    """

    losses: jax.Array
    counts: jax.Array


def init_state(num_timesteps: int) -> ResamplerState:
    """An empty history."""
    return ResamplerState(
        jnp.zeros((num_timesteps, HISTORY), jnp.float32), jnp.zeros((num_timesteps,), jnp.int32)
    )


def probabilities(state: ResamplerState) -> jax.Array:
    """p_t, float32 [T]: uniform until every t has a full history, then ∝ sqrt(E[L_t²])."""
    T = state.counts.shape[0]
    second = jnp.sqrt(jnp.mean(jnp.square(state.losses), axis=-1))
    weights = second / jnp.sum(second)
    weights = weights * (1.0 - UNIFORM_PROB) + UNIFORM_PROB / T
    warm = jnp.all(state.counts >= HISTORY)
    return jnp.where(warm, weights, jnp.full((T,), 1.0 / T))


def draw(state: ResamplerState, key: jax.Array, batch: int) -> tuple[jax.Array, jax.Array]:
    """(t int32 [batch] ~ p, the loss weights 1/(T p_t) float32 [batch])."""
    p = probabilities(state)
    t = jax.random.choice(key, p.shape[0], (batch,), p=p).astype(jnp.int32)
    return t, 1.0 / (p.shape[0] * p[t])


def update(state: ResamplerState, t: jax.Array, losses: jax.Array) -> ResamplerState:
    """The history after the batch's (t, loss) pairs, pushed in order (as improved-diffusion).

    A full history drops its oldest loss. Loss values are taken as they are (before the
    importance weights) and without gradient.
    """

    def push(state, tl):
        ti, li = tl
        row, n = state.losses[ti], state.counts[ti]
        shifted = jnp.concatenate([row[1:], li[None]])
        filled = row.at[jnp.minimum(n, HISTORY - 1)].set(li)
        row = jnp.where(n >= HISTORY, shifted, filled)
        return ResamplerState(
            state.losses.at[ti].set(row), state.counts.at[ti].set(jnp.minimum(n + 1, HISTORY))
        ), None

    losses = jax.lax.stop_gradient(losses).astype(jnp.float32)
    state, _ = jax.lax.scan(push, state, (t.astype(jnp.int32), losses))
    return state
