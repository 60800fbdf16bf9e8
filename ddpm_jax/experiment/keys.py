"""The named random streams of a run: every key is `fold_in(PRNGKey(seed), stream)`.

Training, its monitoring and the evaluation each draw from their own stream of
`config.training.seed`, so that one never shifts another: a run resumed at step s draws
exactly the keys an uninterrupted run draws there, and the evaluation of a workdir does not
depend on how long it was trained. Sampling (`--mode=sample`, FID) draws from
`config.sampling.seed` instead; see `ddpm_jax.inference.trained_model` for its per-image keys.
"""

from __future__ import annotations

import enum

import jax


class Stream(enum.IntEnum):
    """The streams of `config.training.seed` (the values are part of the checkpoints' meaning:
    changing one changes every run resumed across the change)."""

    INIT = 0  # parameter initialisation.
    TRAIN_STEP = 1  # fold_in(., step): the t, noise, dropout and label drops of each update.
    BPD_ESTIMATE = 2  # fold_in(., step): the bound estimate logged while training.
    SAMPLE_GRID = 3  # fold_in(., step): the sample grids written while training.
    EVAL_BPD = 4  # fold_in(., example index): the full bound of --mode=eval.
    EVAL_ODE = 5  # fold_in(., example index): the ODE likelihood of --mode=eval.


def stream_key(seed: int, stream: Stream) -> jax.Array:
    """The base key of `stream`: `fold_in(PRNGKey(seed), stream)` (a raw uint32 [2] key)."""
    return jax.random.fold_in(jax.random.PRNGKey(int(seed)), int(stream))
