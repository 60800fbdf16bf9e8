"""Training: the train state, a pure jit-compiled sharded train step, and the training loop.

    state, metrics = train_step(state, batch)     # jax.jit over a Mesh, state donated

The loss is the weighted ELBO of `ddpm_jax.diffusion.training_losses`. Randomness is
`fold_in(key, step)`: the step is a pure function of (state, batch), and batch s is a pure
function of (seed, s), so a run resumed from a checkpoint continues bit-identically.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ddpm_jax import checkpointing, diffusion, input_pipeline, metrics, models, sampling, schedules
from ddpm_jax import sharding as shd
from ddpm_jax.config_checks import DiffusionConfig, validate_config

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


def make_schedule(config: ml_collections.ConfigDict) -> schedules.Schedule:
    """The `Schedule` of `config.diffusion`."""
    d = DiffusionConfig.from_config(config)
    return schedules.make_schedule(
        schedules.get_beta_schedule(
            d.schedule, d.num_timesteps, beta_start=d.beta_start, beta_end=d.beta_end
        )
    )


def learning_rate_fn(optim: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up from 0 to `learning_rate` over `warmup_steps`, then constant (Ho et al.)."""
    peak, warmup = float(optim.learning_rate), int(optim.warmup_steps)
    if warmup <= 0:
        return optax.constant_schedule(peak)
    return lambda step: peak * jnp.minimum(1.0, step / warmup)


def make_ema_decay_fn(optim: ml_collections.ConfigDict) -> Callable[[jax.Array], jax.Array]:
    """EMA decay for the update at step s: `ema_decay`, or min(ema_decay, (1+s)/(10+s)).

    The warm-up form (`optim.ema_warmup`) keeps a short run's average from holding on to the
    initial parameters: with a constant 0.999, 37% of the EMA after 1,000 steps is still the
    initialisation, whose zero output layer predicts x̂_0 = 0 (grey images).
    """
    decay = float(optim.ema_decay)
    if not optim.get("ema_warmup", False):
        return lambda step: jnp.asarray(decay, jnp.float32)
    return lambda step: jnp.minimum(decay, (1.0 + step) / (10.0 + step)).astype(jnp.float32)


def make_optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Global-norm clipping then Adam with the warm-up schedule."""
    return optax.chain(
        optax.clip_by_global_norm(float(optim.grad_clip_norm)),
        optax.adam(learning_rate_fn(optim), b1=optim.b1, b2=optim.b2, eps=optim.eps),
    )


def init_state(
    model: flax.linen.Module, optimizer: optax.GradientTransformation, example: jax.Array, key
) -> TrainState:
    """Initial `TrainState` for images shaped like `example` [B, H, W, C]."""
    t = jnp.zeros((example.shape[0],), jnp.int32)
    params = model.init(key, example, t)["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=optimizer.init(params),
    )


def make_model_fn(model: flax.linen.Module, params: PyTree, **apply_kwargs) -> Callable:
    """`model_fn(x_t, t)` for `ddpm_jax.diffusion` and `ddpm_jax.sampling` from a U-Net."""
    return lambda x_t, t: model.apply({"params": params}, x_t, t, **apply_kwargs)


def make_train_step(
    model: flax.linen.Module,
    sched: schedules.Schedule,
    optimizer: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure train step `(state, batch) -> (state, metrics)`, not yet compiled.

    With `training.grad_accum_steps = k > 1` the batch is split into k micro-batches whose
    gradients are averaged under `lax.scan` before one update: the same update as one batch
    of the full size, in 1/k of the activation memory.
    """
    d = DiffusionConfig.from_config(config)
    accum = int(config.training.grad_accum_steps)
    ema_decay_fn = make_ema_decay_fn(config.optim)
    lr_fn = learning_rate_fn(config.optim)
    num_classes = int(config.model.num_classes)
    base_key = jax.random.fold_in(jax.random.PRNGKey(config.training.seed), 1)

    def loss_fn(params, images, labels, key):
        dropout_key, loss_key, label_key = jax.random.split(key, 3)
        kwargs = {}
        if num_classes > 0:  # drop 10% of labels to the null class for guidance.
            drop = jax.random.bernoulli(label_key, 0.1, labels.shape)
            kwargs["y"] = jnp.where(drop, num_classes, labels)
        model_fn = make_model_fn(model, params, train=True, rngs={"dropout": dropout_key}, **kwargs)
        losses = diffusion.training_losses(
            model_fn,
            sched,
            images,
            loss_key,
            parameterization=d.parameterization,
            weighting=d.weighting,
            min_snr_gamma=d.min_snr_gamma,
        )
        return jnp.mean(losses.loss)

    grad_fn = jax.value_and_grad(loss_fn)

    def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
        key = jax.random.fold_in(base_key, state.step)
        images, labels = batch["image"], batch["label"]
        if accum == 1:
            loss, grads = grad_fn(state.params, images, labels, key)
        else:
            # Micro-batch j takes rows j, j+k, j+2k, …: a reshape that keeps each device's
            # rows on that device under batch sharding.
            def split(x):
                return jnp.swapaxes(x.reshape((x.shape[0] // accum, accum, *x.shape[1:])), 0, 1)

            def accumulate(carry, xs):
                j, imgs, labs = xs
                loss_j, grads_j = grad_fn(state.params, imgs, labs, jax.random.fold_in(key, j))
                return jax.tree.map(jnp.add, carry, (loss_j, grads_j)), None

            zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
            (loss, grads), _ = jax.lax.scan(
                accumulate, zeros, (jnp.arange(accum), split(images), split(labels))
            )
            loss, grads = jax.tree.map(lambda g: g / accum, (loss, grads))
        grad_norm = optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay_fn(state.step)
        ema_params = jax.tree.map(
            lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params
        )
        new_state = TrainState(
            step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state
        )
        step_metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": lr_fn(state.step),
            "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm),
        }
        return new_state, step_metrics

    return train_step


def make_bpd_estimate_fn(model, sched, config) -> Callable:
    """`(params, images, key) -> mean bits/dim`, the cheap unbiased bound estimate."""
    d = DiffusionConfig.from_config(config)

    def bpd_estimate(params, images, key):
        est = diffusion.bits_per_dim_estimate(
            make_model_fn(model, params),
            sched,
            images,
            key,
            parameterization=d.parameterization,
            variance=d.variance,
            clip_denoised=d.clip_denoised,
        )
        return jnp.mean(est)

    return bpd_estimate


def make_sample_fn(model, sched, config, num_images: int) -> Callable:
    """`(params, key) -> images float32 [num_images, H, W, C] in [-1, 1]` with config.sampling."""
    d = DiffusionConfig.from_config(config)
    s = config.sampling
    shape = (num_images, config.data.image_size, config.data.image_size, config.data.channels)

    def sample(params, key):
        return sampling.sample(
            make_model_fn(model, params),
            sched,
            shape,
            key,
            parameterization=d.parameterization,
            variance=d.variance,
            clip_denoised=d.clip_denoised,
            sampler=s.sampler,
            num_steps=int(s.num_steps) or None,
            **({"eta": float(s.eta)} if s.sampler == "ddim" else {}),
        )

    return sample


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm became NaN/Inf; the run stopped without saving that state."""


def _check_finite(step_metrics: Mapping[str, Any], step: int) -> None:
    if not bool(step_metrics["finite"]):
        raise NonFiniteLossError(
            f"Non-finite loss or gradient at step {step} (loss={float(step_metrics['loss'])}, "
            f"grad_norm={float(step_metrics['grad_norm'])}); stopping without saving this "
            "state. The last checkpoint is intact: lower optim.learning_rate or check the data, "
            "then run again to resume from it."
        )


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes the resolved config to `<workdir>/config.json` (read back by sampling/eval)."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    with open(path + ".tmp", "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(path + ".tmp", path)


@dataclasses.dataclass
class _Throughput:
    """Steps/s and images/s between two log points (host wall clock, after a device sync)."""

    batch_size: int
    last_step: int
    last_time: float = dataclasses.field(default_factory=time.perf_counter)

    def rates(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        steps_per_s = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        return {"steps_per_sec": steps_per_s, "images_per_sec": steps_per_s * self.batch_size}


def build(config: ml_collections.ConfigDict, mesh):
    """Validates `config` and builds what a run needs, compiling nothing.

    Returns:
      (model, sched, optimizer, abstract_state, init_fn) where `abstract_state` carries the
      target shardings of every state leaf and `init_fn(key)` builds the initial state.
    """
    model = models.create_model(config)
    sched = make_schedule(config)
    optimizer = make_optimizer(config.optim)
    c = config.data.channels
    example = jnp.zeros((1, config.data.image_size, config.data.image_size, c), jnp.float32)
    init_fn = functools.partial(init_state, model, optimizer, example)
    abstract = shd.sharded_abstract(
        init_fn,
        mesh,
        jax.random.PRNGKey(0),
        fsdp=bool(config.mesh.fsdp),
        min_size=int(config.mesh.fsdp_min_size),
    )
    return model, sched, optimizer, abstract, init_fn


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains from `config`, resuming from the newest checkpoint in `workdir` if there is one.

    Writes `<workdir>/config.json`, checkpoints under `<workdir>/checkpoints`, metrics to
    `<workdir>/metrics.jsonl` and TensorBoard, and sample grids `<workdir>/samples_<step>.png`.
    Stops cleanly (final checkpoint, exit) on SIGTERM or a multi-host preemption notice.

    Returns:
      The final `TrainState`.
    """
    mesh = shd.make_mesh(config.mesh)
    validate_config(config, num_devices=mesh.devices.size, process_count=jax.process_count())
    info = input_pipeline.get_dataset_info(config)  # fails fast on unavailable/bad data.
    tc = config.training
    model, sched, optimizer, abstract, init_fn = build(config, mesh)
    is_main = jax.process_index() == 0
    if is_main:
        write_config(config, workdir)
    writer = metrics.MetricWriter(workdir, enabled=is_main)
    ckpt = checkpointing.Checkpointer.from_config(workdir, tc)
    init_key = jax.random.fold_in(jax.random.PRNGKey(tc.seed), 0)
    if ckpt.latest_step() is not None:
        state, extra = ckpt.restore(abstract)
        logging.info("Resumed from step %d of %s.", int(state.step), workdir)
        if int(extra.get("data_step", int(state.step))) != int(state.step):
            raise ValueError(f"Checkpoint data position {extra} does not match its state step.")
    else:
        state = shd.init_sharded(init_fn, abstract, init_key)
    start_step = int(state.step)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    logging.info("Model: %s parameters; dataset %s with %d examples.", f"{num_params:,}",
                 info.name, info.num_examples)  # fmt: skip

    state_sh = shd.shardings_of(abstract)
    batch_sh = shd.batch_sharding(mesh)
    replicated = shd.replicated(mesh)
    train_step = jax.jit(
        make_train_step(model, sched, optimizer, config),
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, replicated),
        donate_argnums=(0,),
    )
    bpd_fn = jax.jit(
        make_bpd_estimate_fn(model, sched, config),
        in_shardings=(state_sh.ema_params, batch_sh, replicated),
        out_shardings=replicated,
    )
    n_img = int(tc.num_sample_images)
    sample_fn = jax.jit(
        make_sample_fn(model, sched, config, n_img),
        in_shardings=(state_sh.ema_params, replicated),
        out_shardings=batch_sh if n_img % mesh.devices.size == 0 else replicated,
    )
    data = input_pipeline.make_train_data(
        config,
        global_batch_size=int(tc.batch_size),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        seed=int(tc.seed),
    )
    eval_key = jax.random.fold_in(jax.random.PRNGKey(tc.seed), 2)
    sample_key = jax.random.fold_in(jax.random.PRNGKey(tc.seed), 3)
    num_steps = int(tc.num_train_steps)
    throughput = _Throughput(int(tc.batch_size), start_step)
    progress = _progress_bar(is_main, start_step, num_steps)
    batches = data.iterator(start_step)
    pending: tuple[int, dict] | None = None  # the previous step's metrics, checked one late.
    step = start_step
    try:
        with checkpointing.catch_termination() as terminate:
            while step < num_steps:
                batch = shd.host_to_global(next(batches), mesh)
                state, step_metrics = train_step(state, batch)
                step += 1
                # Checking the previous step's flag lets this step run while the host waits.
                if pending is not None:
                    _check_finite(jax.device_get(pending[1]), pending[0])
                pending = (step, step_metrics)
                progress.update(1)
                preempted = ckpt.preempted(step, terminate)
                log = step % tc.log_every_steps == 0 or step == num_steps or preempted
                save = ckpt.should_save(step) or preempted or step == num_steps
                if log or save:  # this step's state is logged or saved: check it now.
                    host = jax.device_get(step_metrics)
                    _check_finite(host, step)
                    pending = None
                if log:
                    scalars = {k: float(v) for k, v in host.items() if k != "finite"}
                    scalars["bpd_estimate"] = float(
                        bpd_fn(state.ema_params, batch["image"], jax.random.fold_in(eval_key, step))
                    )
                    scalars.update(throughput.rates(step))
                    writer.write_scalars(step, scalars)
                    progress.set_postfix(loss=f"{scalars['loss']:.4g}", refresh=False)
                if save:
                    ckpt.save(step, state, {"data_step": step}, force=True)
                if tc.sample_every_steps and (
                    step % tc.sample_every_steps == 0 or step == num_steps
                ):
                    images = shd.global_to_host(
                        sample_fn(state.ema_params, jax.random.fold_in(sample_key, step))
                    )
                    path = writer.write_images(step, "samples", metrics.to_uint8(images))
                    if path:
                        logging.info("Step %d: samples written to %s", step, path)
                    throughput.rates(step)  # sampling time is not training throughput.
                if preempted:
                    logging.warning("Termination requested: saved step %d and stopping.", step)
                    break
    finally:
        ckpt.wait_until_finished()
        ckpt.close()
        batches.close()
        progress.close()
        writer.close()
    return state


def _progress_bar(enabled: bool, start: int, total: int):
    import tqdm

    return tqdm.tqdm(
        total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True,
        desc="train", smoothing=0.1,
    )  # fmt: skip


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """Reads the resolved config a training run wrote to `<workdir>/config.json`."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: {workdir} is not a ddpm_jax workdir (train there first)."
        )
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))
