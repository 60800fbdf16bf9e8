"""The pure train step `(state, batch) -> (state, metrics)` and the bound estimate it logs.

The loss is the weighted ELBO of `ddpm_jax.losses.training_losses`, or for an EDM model
(`config.diffusion.formulation = "edm"`) the batch mean of `ddpm_jax.edm.denoiser_loss`,
which logs `make_edm_monitor_fn`'s figures in place of the bound estimate. Randomness is
`fold_in(stream_key(seed, TRAIN_STEP), step)`: the step is a pure function of (state, batch),
and batch s is a pure function of (seed, s), so a resumed run continues bit-identically.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ddpm_jax import edm, likelihood, posthoc_ema
from ddpm_jax import losses as losses_lib
from ddpm_jax.errors import NonFiniteError
from ddpm_jax.experiment import Experiment, Stream, stream_key
from ddpm_jax.train import timestep_proposal
from ddpm_jax.train.state import TrainState, learning_rate_fn, make_ema_beta_fn

# Strata of the timesteps 1..T-1 in the logged bound estimate (see `make_bpd_estimate_fn`).
BPD_ESTIMATE_STRATA = 8
# The σ bands of an EDM model's logged denoising error (`make_edm_monitor_fn`): EDM's
# sampling range 0.002..80, cut at 0.05, 0.5 and 5 (σ_d = 0.5 of images in [-1, 1]).
EDM_MONITOR_BANDS = ((0.002, 0.05), (0.05, 0.5), (0.5, 5.0), (5.0, 80.0))


def make_train_step(
    experiment: Experiment, optimizer: optax.GradientTransformation
) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure train step `(state, batch) -> (state, metrics)`, not yet compiled.

    With `training.grad_accum_steps = k > 1` the batch is split into k micro-batches whose
    gradients are averaged under `lax.scan` before one update: the same update as one batch
    of the full size, in 1/k of the activation memory.
    """
    cfg = experiment.config
    d = cfg.diffusion
    accum = cfg.training.grad_accum_steps
    ema_decay_fn = make_ema_beta_fn(cfg.optim, cfg.training.batch_size)
    lr_fn = learning_rate_fn(cfg.optim)
    num_classes = experiment.num_classes
    base_key = stream_key(cfg.training.seed, Stream.TRAIN_STEP)
    sched = experiment.schedule
    loss_aware = d.timestep_proposal == "loss_aware"
    gammas = tuple(posthoc_ema.sigma_rel_to_gamma(s) for s in cfg.optim.ema_profiles)
    label_dropout, e = float(cfg.training.label_dropout), cfg.edm

    def loss_fn(params, images, labels, key, history):
        """The batch's mean loss, and (per-example losses, t) for the loss-aware proposal."""
        dropout_key, loss_key, label_key = jax.random.split(key, 3)
        y = None
        if num_classes > 0:  # drop labels to the null class: the guidance's unconditional.
            drop = jax.random.bernoulli(label_key, label_dropout, labels.shape)
            y = jnp.where(drop, num_classes, labels)
        if experiment.is_edm:
            denoise_fn = experiment.denoiser(params, y, train=True, rngs={"dropout": dropout_key})
            losses = edm.denoiser_loss(denoise_fn, images, loss_key, sigma_data=e.sigma_data,
                                       p_mean=e.p_mean, p_std=e.p_std)  # fmt: skip
            return jnp.mean(losses), (losses, jnp.zeros(losses.shape, jnp.int32))
        t, weights = None, 1.0
        if loss_aware:  # importance-sampled t, reweighted by 1/(T p_t): still unbiased.
            t, weights = timestep_proposal.draw(
                history, jax.random.fold_in(loss_key, 1), images.shape[0]
            )
        model_fn = experiment.model_fn(params, y, train=True, rngs={"dropout": dropout_key})
        losses = losses_lib.training_losses(
            model_fn,
            sched,
            images,
            loss_key,
            parameterization=d.parameterization,
            weighting=d.weighting,
            min_snr_gamma=d.min_snr_gamma,
            variance=d.variance,
            vlb_weight=d.vlb_weight,
            t=t,
        )
        return jnp.mean(weights * losses.loss), (losses.loss, losses.t)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
        key = jax.random.fold_in(base_key, state.step)
        images, labels = batch["image"], batch["label"]
        history = state.timestep_sampler if loss_aware else None
        if accum == 1:
            (loss, (per_example, ts)), grads = grad_fn(state.params, images, labels, key, history)
        else:
            # Micro-batch j takes rows j, j+k, j+2k, …: a reshape that keeps each device's
            # rows on that device under batch sharding.
            def split(x):
                return jnp.swapaxes(x.reshape((x.shape[0] // accum, accum, *x.shape[1:])), 0, 1)

            def accumulate(carry, xs):
                j, imgs, labs = xs
                (loss_j, aux_j), grads_j = grad_fn(
                    state.params, imgs, labs, jax.random.fold_in(key, j), history
                )
                return jax.tree.map(jnp.add, carry, (loss_j, grads_j)), aux_j

            zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
            (loss, grads), (per_example, ts) = jax.lax.scan(
                accumulate, zeros, (jnp.arange(accum), split(images), split(labels))
            )
            per_example, ts = per_example.reshape(-1), ts.reshape(-1)
            loss, grads = jax.tree.map(lambda g: g / accum, (loss, grads))
        grad_norm = optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay_fn(state.step)
        ema_params = jax.tree.map(
            lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params
        )
        new_state = state.replace(
            step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state
        )
        if loss_aware:
            new_state = new_state.replace(
                timestep_sampler=timestep_proposal.update(history, ts, per_example)
            )
        if gammas:  # post-hoc EMA: t counts the updates including this one (β(1) = 0).
            new_state = new_state.replace(
                power_emas=posthoc_ema.update_profiles(
                    state.power_emas, params, state.step + 1, gammas
                )
            )
        step_metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": lr_fn(state.step),
            "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm),
        }
        return new_state, step_metrics

    return train_step


def make_bpd_estimate_fn(experiment: Experiment) -> Callable:
    """`(params, images, labels, key) -> mean bits/dim`: the bound estimate logged in training.

    `likelihood.bits_per_dim_stratified` with `BPD_ESTIMATE_STRATA` geometric strata: the
    prior and the decoder term exactly, the sum of the KL terms from one timestep per
    stratum, so one call costs 1 + strata forward passes per image and its spread is about
    1% of the bound where a one-timestep estimate's is ten times the bound.
    Class-conditional models are evaluated on their labels: the bound of p(x | y).
    """
    reverse, sched = experiment.reverse, experiment.schedule
    num_classes = experiment.num_classes

    def bpd_estimate(params, images, labels, key):
        est = likelihood.bits_per_dim_stratified(
            experiment.model_fn(params, labels if num_classes else None),
            sched,
            images,
            key,
            num_strata=BPD_ESTIMATE_STRATA,
            **reverse.kwargs(),
        )
        return jnp.mean(est)

    return bpd_estimate


def make_edm_monitor_fn(experiment: Experiment) -> Callable:
    """`(params, images, labels, key) -> {name: float32 scalar}`: what an EDM model logs in
    place of the bound estimate (which it has not), of the EMA model on the current batch.

    - "ema_loss": the batch mean of `edm.denoiser_loss` (the training loss, of the EMA
      parameters and without dropout), from `fold_in(key, 0)`;
    - "mse_sigma_<lo>_<hi>": the denoising error mean((D(x_0 + σn; σ) − x_0)²) over pixels
      and the batch, σ log-uniform in each band of `EDM_MONITOR_BANDS`, from
      `fold_in(key, b + 1)` for band b (1 + 4 forward passes per image in all).

    Class-conditional models are evaluated on their labels.
    """
    e, num_classes = experiment.config.edm, experiment.num_classes

    def monitor(params, images, labels, key):
        denoise_fn = experiment.denoiser(params, labels if num_classes else None)
        losses = edm.denoiser_loss(
            denoise_fn, images, jax.random.fold_in(key, 0), sigma_data=e.sigma_data,
            p_mean=e.p_mean, p_std=e.p_std,
        )  # fmt: skip
        out = {"ema_loss": jnp.mean(losses)}
        for b, (lo, hi) in enumerate(EDM_MONITOR_BANDS):
            sigma_key, noise_key = jax.random.split(jax.random.fold_in(key, b + 1))
            u = jax.random.uniform(sigma_key, (images.shape[0],), jnp.float32)
            sigma = jnp.exp(jnp.log(lo) + u * (jnp.log(hi) - jnp.log(lo)))
            noise = jax.random.normal(noise_key, images.shape, jnp.float32)
            x = images + sigma[:, None, None, None] * noise
            out[f"mse_sigma_{lo:g}_{hi:g}"] = jnp.mean(jnp.square(denoise_fn(x, sigma) - images))
        return out

    return monitor


def check_finite(step_metrics: Mapping[str, Any], step: int, kept_steps: list[int]) -> None:
    """Raises `errors.NonFiniteError` if the step's `finite` flag (or any metric) is not finite.

    Args:
      step_metrics: host values of the step's metrics (`finite` and the logged scalars).
      step: the step they belong to.
      kept_steps: the complete checkpoints, for the advice the message gives.
    """
    bad = [
        k
        for k, v in step_metrics.items()
        if k != "finite" and not bool(jnp.isfinite(jnp.asarray(v, jnp.float32)))
    ]
    finite = bool(step_metrics.get("finite", True))
    if finite and not bad:
        return
    what = ", ".join(bad) if finite else "loss or gradient"
    values = ", ".join(f"{k}={float(step_metrics[k])}" for k in step_metrics if k != "finite")
    earlier = (
        f"; if the newest checkpoint has itself diverged, resume from an earlier one with "
        f"--config.training.resume_step=N (kept: {kept_steps})"
        if kept_steps
        else ""
    )
    raise NonFiniteError(
        f"Non-finite {what} at step {step} ({values}); stopping "
        "without saving this state. The last checkpoint is intact: lower "
        f"config.optim.learning_rate or check the data, then run again to resume{earlier}."
    )
