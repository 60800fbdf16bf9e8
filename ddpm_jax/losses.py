"""The training objectives of DDPM: the weighted ELBO E_t w_t ||x̂_0 - x_0||², per example.

The bound's KL term of step t is C_t ||x̂_0 - x_0||² under the x_0-parameterization, so every
objective is a weighting w_t of that squared error (`loss_weight`): w_t = T·C_t is the true
bound, the others (Ho et al.'s ε-MSE as SNR-weighting, truncated SNR, min-SNR-γ, ...) are
choices in the same code path. With a learned variance the bound's own term
(`likelihood.vb_term_bpd`) trains the variance (L_vlb, L_hybrid).

Conventions: those of `ddpm_jax.diffusion` (integer timesteps t in [0, T), index t the
paper's step t+1; data float [B, ...] in [-1, 1]).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ddpm_jax import diffusion, likelihood
from ddpm_jax._base import ModelFn, check_choice, mean_flat, sum_flat
from ddpm_jax.schedules import Schedule

WEIGHTINGS = ("elbo", "x0_mse", "eps_mse", "v_mse", "snr_trunc", "min_snr")


def loss_weight(
    sched: Schedule, t: jax.Array, weighting: str, *, min_snr_gamma: float = 5.0
) -> jax.Array:
    """w_t, the weight on ||x̂_0 - x_0||² in the weighted ELBO; float32 [B].

    "elbo": T · C_t with C_t = coef1_t²/(2 σ_q²) = (SNR_{t-1} - SNR_t)/2 for t >= 1, so that
      w_t ||x̂_0 - x_0||² summed over dimensions is T times the KL term L_{t-1} of the bound;
      at t = 0 (the decoder) C_0 = 1/(2 σ_0²) with Ho et al.'s decoder variance, the
      Gaussian approximation of -log p(x_0|x_1) up to a constant.
    "x0_mse": 1. "eps_mse": SNR_t (Ho et al.'s L_simple: ||ε̂ - ε||² = SNR_t ||x̂_0 - x_0||²).
    "v_mse": SNR_t + 1 (||v̂ - v||²). "snr_trunc": max(SNR_t, 1). "min_snr": min(SNR_t, γ).
    """
    check_choice(weighting, WEIGHTINGS, "weighting")
    snr = sched.snr[t]
    if weighting == "elbo":
        decoder_var = jnp.exp(sched.posterior_log_variance_clipped[0])
        safe_var = jnp.where(t == 0, 1.0, sched.posterior_variance[t])  # σ_q² = 0 at t = 0.
        c = jnp.where(
            t == 0, 0.5 / decoder_var, sched.posterior_mean_coef1[t] ** 2 / (2.0 * safe_var)
        )
        return sched.num_timesteps * c
    if weighting == "x0_mse":
        return jnp.ones_like(snr)
    if weighting == "eps_mse":
        return snr
    if weighting == "v_mse":
        return snr + 1.0
    if weighting == "snr_trunc":
        return jnp.maximum(snr, 1.0)
    return jnp.minimum(snr, min_snr_gamma)


def _native_scale(sched: Schedule, t: jax.Array, parameterization: str) -> jax.Array:
    """λ_t with ||pred - target||² = λ_t ||x̂_0 - x_0||² in the given parameterization, [B]."""
    snr = sched.snr[t]
    return {"x0": jnp.ones_like(snr), "eps": snr, "v": snr + 1.0}[parameterization]


class Losses(NamedTuple):
    """Per-example training losses and the timesteps they were drawn at."""

    loss: jax.Array  # float32 [B]
    t: jax.Array  # int32 [B]


def training_losses(
    model_fn: ModelFn,
    sched: Schedule,
    x0: jax.Array,
    key: jax.Array,
    *,
    parameterization: str = "x0",
    weighting: str = "elbo",
    min_snr_gamma: float = 5.0,
    variance: str = "fixedlarge",
    vlb_weight: float = 0.0,
    t: jax.Array | None = None,
    noise: jax.Array | None = None,
) -> Losses:
    """One-sample estimate of the weighted ELBO E_t w_t ||x̂_θ(x_t, t) - x_0||², per example.

    Draws t ~ U{0, …, T-1} and ε ~ N(0, I), forms x_t = q_sample(x_0, t, ε) and compares the
    model's prediction with its target. The error is measured in the model's own
    parameterization and rescaled exactly (||ε̂ - ε||² = SNR_t ||x̂_0 - x_0||², ||v̂ - v||² =
    (SNR_t + 1) ||x̂_0 - x_0||²), so every parameterization gives the same loss for the same x̂_0
    without dividing by a vanishing sqrt(ᾱ_t).

    With weighting="elbo" the loss is summed over dimensions and is, in nats, an unbiased
    estimate of the bound's diffusion terms Σ_{t>=1} L_{t-1} (plus the Gaussian approximation of
    the decoder term at t = 0). Every other weighting is a mean over dimensions (a mean squared
    error, Ho et al.'s convention for L_simple).

    With a learned variance ("learned", "learned_range"; the model outputs 2C channels):
    - weighting="elbo": the loss is T·L_t, the exact bound's term at t with the learned
      variance (the KL, or the discretised decoder NLL at t = 0), in nats summed over
      dimensions, so mean and variance are both trained on the true bound;
    - any other weighting: the weighted MSE of the prediction plus `vlb_weight`·T·L_t in bits
      per dimension (mean over dimensions), with a stop-gradient on the mean, so that the
      mean is trained by the MSE alone and the variance by the bound. `vlb_weight` = 0.001 is
      Nichol & Dhariwal's L_hybrid, at the scale of improved-diffusion's "rescaled MSE"
      (L_t · T/1000 there).

    Randomness: `t_key, noise_key = jax.random.split(key)`; t = randint(t_key, [B], 0, T) and
    ε = normal(noise_key, x0.shape), unless given.

    Args:
      model_fn: `model_fn(x_t, t) -> prediction`, x_t's shape (2C channels when learned).
      sched: the schedule.
      x0: clean data, float [B, ...].
      key: PRNG key for t and ε.
      parameterization: what the model predicts: "x0", "eps" or "v".
      weighting: one of `WEIGHTINGS` (see `loss_weight`).
      min_snr_gamma: γ of "min_snr".
      variance: the reverse-process variance, one of `diffusion.VARIANCES`: a fixed one
        (either) leaves the loss unchanged, a learned one adds the bound's term (above).
      vlb_weight: λ >= 0 of the bound's term next to a weighted MSE (learned variances).
      t: optional int [B] timesteps to use instead of drawing them.
      noise: optional ε, x0's shape, to use instead of drawing it.

    Returns:
      `Losses(loss=float32 [B], t=int32 [B])`.
    """
    check_choice(parameterization, diffusion.PARAMETERIZATIONS, "parameterization")
    check_choice(weighting, WEIGHTINGS, "weighting")
    learned = diffusion.is_learned(variance)
    if not vlb_weight >= 0.0 or (vlb_weight and (not learned or weighting == "elbo")):
        raise ValueError(
            f"vlb_weight={vlb_weight} must be >= 0, and 0 unless the variance is learned and "
            f"the weighting is not 'elbo' (variance={variance!r}, weighting={weighting!r})."
        )
    t_key, noise_key = jax.random.split(key)
    if t is None:
        t = jax.random.randint(t_key, (x0.shape[0],), 0, sched.num_timesteps, dtype=jnp.int32)
    t = diffusion.check_batch_timesteps(sched, t, x0)
    if noise is None:
        noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
    x_t = diffusion.q_sample(sched, x0, t, noise)
    output = model_fn(x_t, t)
    prediction, v = diffusion.split_output(output, x0, variance)
    if prediction.shape != x0.shape:
        raise ValueError(
            f"model_fn must return x_t's shape {x0.shape}, got {prediction.shape}; a model with "
            "a learned variance returns 2C channels: pass variance='learned' or "
            "'learned_range'."
        )
    if learned:
        kw = dict(parameterization=parameterization, variance=variance, clip_denoised=False)
        T = sched.num_timesteps
        if weighting == "elbo":  # the true bound for mean and variance together.
            bits = likelihood.vb_term_bpd(sched, x0, x_t, t, output, **kw)
            return Losses(loss=T * bits * math.prod(x0.shape[1:]) * math.log(2.0), t=t)
        frozen = jnp.concatenate([jax.lax.stop_gradient(prediction), v], axis=-1)
        vlb = T * likelihood.vb_term_bpd(sched, x0, x_t, t, frozen, **kw)
    target = diffusion.x0_to_prediction(sched, x_t, t, x0, parameterization)
    sq = jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
    err = sum_flat(sq) if weighting == "elbo" else mean_flat(sq)
    w = loss_weight(sched, t, weighting, min_snr_gamma=min_snr_gamma)
    loss = w / _native_scale(sched, t, parameterization) * err
    return Losses(loss=loss + vlb_weight * vlb if learned else loss, t=t)
