"""The train state and what updates it: Adam with warm-up and clipping, the EMA of the weights.

setup = build(config, mesh)              # Experiment + optimizer + sharded abstract state
state = sharding.init_sharded(setup.init_fn, setup.abstract, key)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from ddpm_jax import posthoc_ema
from ddpm_jax.experiment import Experiment
from ddpm_jax.experiment.config import OptimConfig
from ddpm_jax.runtime import sharding as shd
from ddpm_jax.train import timestep_proposal

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue: step, parameters, their EMA, optimizer state.

    Attributes:
      step: int32 scalar, the number of updates applied.
      params: the U-Net's parameters (float32 pytree).
      ema_params: exponential moving average of `params`, used for sampling and evaluation.
      opt_state: optax state of `make_optimizer`.
    """

    step: jax.Array
    params: PyTree
    ema_params: PyTree
    opt_state: PyTree


@flax.struct.dataclass
class LossAwareTrainState(TrainState):
    """A `TrainState` with the loss history of `config.diffusion.timestep_proposal =
    "loss_aware"` (`train.timestep_proposal`), saved and restored with the rest.

    A separate class rather than an empty field of `TrainState`, so that the checkpoints of
    uniform runs keep their layout. The field keeps the name it has in the checkpoints
    written since the proposal was added (the key of that subtree), so they all resume.
    """

    timestep_sampler: timestep_proposal.ResamplerState


@flax.struct.dataclass
class PowerEMATrainState(TrainState):
    """A `TrainState` with the power-function EMAs of `config.optim.ema_profiles` (post-hoc
    EMA, `ddpm_jax.posthoc_ema`), saved and restored with the rest.

    A separate class, as `LossAwareTrainState`, so that runs without profiles keep their
    checkpoint layout exactly.

    Attributes:
      power_emas: one float32 pytree like `params` per profile, in the order of
        `ema_profiles`, laid out like the parameters.
    """

    power_emas: tuple[PyTree, ...]


@flax.struct.dataclass
class LossAwarePowerEMATrainState(LossAwareTrainState):
    """Both: the loss history of `LossAwareTrainState` and the power EMAs of
    `PowerEMATrainState` (a subclass of the former, so that code testing for either field's
    class by `isinstance(state, LossAwareTrainState)` keeps working)."""

    power_emas: tuple[PyTree, ...]


def has_power_emas(state: TrainState) -> bool:
    """True if `state` carries power EMAs (`PowerEMATrainState` or the loss-aware one)."""
    return isinstance(state, PowerEMATrainState | LossAwarePowerEMATrainState)


def learning_rate_fn(optim: OptimConfig) -> optax.Schedule:
    """Linear warm-up from 0 to `learning_rate` over `warmup_steps`, then constant (Ho et al.)."""
    peak, warmup = float(optim.learning_rate), int(optim.warmup_steps)
    if warmup <= 0:
        return optax.constant_schedule(peak)
    return lambda step: peak * jnp.minimum(1.0, step / warmup)


def make_ema_decay_fn(optim: OptimConfig) -> Callable[[jax.Array], jax.Array]:
    """EMA decay for the update at step s: `ema_decay`, or min(ema_decay, (1+s)/(10+s)).

    The warm-up form (`optim.ema_warmup`) keeps a short run's average from holding on to the
    initial parameters: with a constant 0.999, 37% of the EMA after 1,000 steps is still the
    initialisation, whose zero output layer predicts x̂_0 = 0 (grey images).
    """
    decay = float(optim.ema_decay)
    if not optim.ema_warmup:
        return lambda step: jnp.asarray(decay, jnp.float32)
    return lambda step: jnp.minimum(decay, (1.0 + step) / (10.0 + step)).astype(jnp.float32)


def make_ema_beta_fn(optim: OptimConfig, batch_size: int) -> Callable[[jax.Array], jax.Array]:
    """EMA decay β for the update at step s (s updates done before it), float32.

    With `optim.ema_halflife_kimg` None: `make_ema_decay_fn`. Otherwise EDM's half-life form
    (Karras et al. 2022, App. F; NVlabs/edm's training loop): the average forgets half of
    itself every h images, β = 0.5^(B / max(h, 1e-8)) for a batch of B, with h = 1000 ·
    ema_halflife_kimg, or h = min(h, ema_rampup_ratio · s · B) with a ramp-up ratio (so that
    β = 0 at s = 0: the first update copies the parameters).
    """
    if optim.ema_halflife_kimg is None:
        return make_ema_decay_fn(optim)
    halflife, ratio = 1000.0 * float(optim.ema_halflife_kimg), optim.ema_rampup_ratio
    batch = float(batch_size)

    def beta(step):
        h = jnp.asarray(halflife, jnp.float32)
        if ratio is not None:
            h = jnp.minimum(h, step.astype(jnp.float32) * batch * float(ratio))
        return jnp.power(0.5, batch / jnp.maximum(h, 1e-8)).astype(jnp.float32)

    return beta


def make_optimizer(optim: OptimConfig) -> optax.GradientTransformation:
    """Global-norm clipping (none if `grad_clip_norm` is None) then Adam with the warm-up."""
    clip = (
        optax.identity()  # the same (empty) state as the clipping: resumes either way.
        if optim.grad_clip_norm is None
        else optax.clip_by_global_norm(float(optim.grad_clip_norm))
    )
    return optax.chain(
        clip, optax.adam(learning_rate_fn(optim), b1=optim.b1, b2=optim.b2, eps=optim.eps)
    )


def init_state(
    experiment: Experiment, optimizer: optax.GradientTransformation, key: jax.Array
) -> TrainState:
    """The initial `TrainState`: fresh parameters, their copy as the EMA (and as each power
    EMA of `optim.ema_profiles`), fresh Adam moments."""
    params = experiment.init_params(key)
    fields = dict(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=optimizer.init(params),
    )
    loss_aware = experiment.config.diffusion.timestep_proposal == "loss_aware"
    profiles = experiment.config.optim.ema_profiles
    if loss_aware:
        T = experiment.schedule.num_timesteps
        fields["timestep_sampler"] = timestep_proposal.init_state(T)
    if profiles:
        fields["power_emas"] = tuple(posthoc_ema.init(params) for _ in profiles)
        cls = LossAwarePowerEMATrainState if loss_aware else PowerEMATrainState
        return cls(**fields)
    return LossAwareTrainState(**fields) if loss_aware else TrainState(**fields)


@dataclasses.dataclass(frozen=True, eq=False)
class TrainSetup:
    """What a run needs before its first step, compiling nothing.

    Attributes:
      experiment: the model, schedule and reverse process of the config.
      optimizer: the optax transformation of `config.optim`.
      abstract: the `TrainState` as `ShapeDtypeStruct`s carrying every leaf's target sharding.
      init_fn: `init_fn(key) -> TrainState`, for `sharding.init_sharded`.
    """

    experiment: Experiment
    optimizer: optax.GradientTransformation
    abstract: TrainState
    init_fn: Callable[[jax.Array], TrainState]


def build(
    config: Any, mesh: jax.sharding.Mesh, *, eval_shape: Callable[..., Any] = jax.eval_shape
) -> TrainSetup:
    """The `TrainSetup` of a config (a ConfigDict, or an already parsed `ExperimentConfig`);
    `eval_shape` gives the state's shapes (`runtime.executables.cached_eval_shape`)."""
    experiment = Experiment.from_config(config)
    optimizer = make_optimizer(experiment.config.optim)
    init_fn = functools.partial(init_state, experiment, optimizer)
    m = experiment.config.mesh
    abstract = shd.sharded_abstract(
        init_fn, mesh, jax.random.PRNGKey(0), fsdp=m.fsdp, min_size=m.fsdp_min_size,
        eval_shape=eval_shape,
    )  # fmt: skip
    return TrainSetup(experiment, optimizer, abstract, init_fn)
