"""Training: the train state, a pure jit-compiled sharded train step, and the training loop.

- `state`: `TrainState` (and its variants with the loss history and the power EMAs of
  post-hoc EMA), the optimizer (Adam, warm-up, clipping), the EMA, `build`.
- `step`: the train step `(state, batch) -> (state, metrics)` and the logged bound estimate
  (an EDM model: its loss and denoising error in σ bands).
- `timestep_proposal`: uniform or loss-aware (importance-sampled) training timesteps.
- `loop`: `loop.train(config, workdir)`, the resumable training run with its periodic actions
  (the input pipeline and TFDS are imported with it, so that the step alone, e.g. for the
  benchmark, needs neither).

    state, metrics = train_step(state, batch)     # jax.jit over a Mesh, state donated

Sampling and evaluation never import this package: they build the network from
`ddpm_jax.experiment` and restore only its EMA parameters.
"""

from ddpm_jax.train.state import (
    LossAwarePowerEMATrainState,
    LossAwareTrainState,
    PowerEMATrainState,
    TrainSetup,
    TrainState,
    build,
    make_ema_beta_fn,
    make_ema_decay_fn,
    make_optimizer,
)
from ddpm_jax.train.step import make_bpd_estimate_fn, make_edm_monitor_fn, make_train_step

__all__ = [
    "LossAwarePowerEMATrainState",
    "LossAwareTrainState",
    "PowerEMATrainState",
    "TrainSetup",
    "TrainState",
    "build",
    "make_bpd_estimate_fn",
    "make_edm_monitor_fn",
    "make_ema_beta_fn",
    "make_ema_decay_fn",
    "make_optimizer",
    "make_train_step",
]
