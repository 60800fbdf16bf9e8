"""Training: the train state, a pure jit-compiled sharded train step, and the training loop.

- `state`: `TrainState`, the optimizer (Adam, warm-up, clipping), the EMA, `build`.
- `step`: the train step `(state, batch) -> (state, metrics)` and the logged bound estimate.
- `timestep_sampler`: uniform or loss-aware (importance-sampled) training timesteps.
- `loop`: `train_and_evaluate(config, workdir)` with its periodic actions.

    state, metrics = train_step(state, batch)     # jax.jit over a Mesh, state donated

Sampling and evaluation never import this package: they build the network from
`ddpm_jax.experiment` and restore only its EMA parameters. The loop (and with it the input
pipeline and TFDS) is imported on first use of `train_and_evaluate`, so that the step alone
(e.g. for the benchmark) needs neither.
"""

from ddpm_jax.train.state import (
    LossAwareTrainState,
    TrainSetup,
    TrainState,
    build,
    make_ema_decay_fn,
    make_optimizer,
)
from ddpm_jax.train.step import NonFiniteLossError, make_bpd_estimate_fn, make_train_step

__all__ = [
    "LossAwareTrainState",
    "NonFiniteLossError",
    "TrainSetup",
    "TrainState",
    "build",
    "make_bpd_estimate_fn",
    "make_ema_decay_fn",
    "make_optimizer",
    "make_train_step",
    "train_and_evaluate",
]


def __getattr__(name: str):
    if name == "train_and_evaluate":
        from ddpm_jax.train.loop import train_and_evaluate

        return train_and_evaluate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
