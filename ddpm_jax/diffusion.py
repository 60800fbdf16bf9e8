"""The mathematics of DDPM as pure functions of arrays: no Flax, no config.

Forward process q(x_t|x_0), true posterior q(x_{t-1}|x_t,x_0), conversions among the x_0, ε and
v parameterizations, and the reverse step p_θ(x_{t-1}|x_t) from a model output. The bound in
bits per dimension builds on this module in `ddpm_jax.likelihood`, the training objectives in
`ddpm_jax.losses`.

Conventions: `sched` is a `schedules.Schedule` of length T; timesteps `t` are int arrays of
shape [B] with values in [0, T), index t being the paper's step t+1 (`alphas_cumprod[t]` is
ᾱ_{t+1}); images `x` are float arrays [B, ...] (NHWC for images) in [-1, 1]. A model is any
callable `model_fn(x_t, t) -> prediction` with the prediction shaped like `x_t`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax._base import check_choice
from ddpm_jax.schedules import Schedule

PARAMETERIZATIONS = ("x0", "eps", "v")
FIXED_VARIANCES = ("fixedsmall", "fixedlarge")
# A learned variance doubles the model's channels: the prediction, then v per dimension.
LEARNED_VARIANCES = ("learned", "learned_range")
VARIANCES = FIXED_VARIANCES + LEARNED_VARIANCES


# --------------------------------------------------------------------------- validation


def check_batch_timesteps(
    sched: Schedule, t: jax.Array, x: jax.Array, name: str = "t"
) -> jax.Array:
    """Checks per-example timesteps at trace time: shape [B], integer dtype, values in [0, T).

    The values are checked only when concrete (not traced). Returns `t` as an array.
    """
    t = jnp.asarray(t) if not isinstance(t, jax.Array) else t
    batch = x.shape[0] if x.ndim else None
    if t.ndim != 1 or t.shape[0] != batch:
        raise ValueError(
            f"{name} must have shape [batch] = [{batch}] (one timestep per example of x with "
            f"shape {tuple(x.shape)}), got shape {tuple(t.shape)}; no broadcasting is done."
        )
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {t.dtype}.")
    if not isinstance(t, jax.core.Tracer):
        tv = np.asarray(t)
        if tv.size and (tv.min() < 0 or tv.max() >= sched.num_timesteps):
            raise ValueError(
                f"{name} values must lie in [0, T) = [0, {sched.num_timesteps}), "
                f"got min {tv.min()} and max {tv.max()}."
            )
    return t


def check_x0_defined(sched: Schedule, ts: np.ndarray, parameterization: str) -> None:
    """Refuses an ε-prediction model at a timestep with ᾱ = 0 (zero terminal SNR, t = T - 1).

    There x_t = ε exactly, so ε̂ says nothing of x_0 (x̂_0 = (x_t - ε̂)/0). `ts`: the timesteps
    a chain or an evaluation visits (increasing: the last is checked). A traced schedule is
    not checked.
    """
    if parameterization != "eps" or isinstance(sched.alphas_cumprod, jax.core.Tracer):
        return
    t = int(np.asarray(ts)[-1])
    if np.asarray(sched.alphas_cumprod)[t] == 0.0:  # numpy: no tracer inside a jit
        raise ValueError(
            f"parameterization='eps' cannot predict x_0 at timestep t = {t} (the paper's step "
            f"{t + 1} = T), where ᾱ = 0 (zero terminal SNR): x_t is pure noise there. Use an "
            "'x0' or 'v' model, or timesteps that stop below T - 1."
        )


def _extract(coef: jax.Array, t: jax.Array, x: jax.Array) -> jax.Array:
    """coef[t] reshaped to [B, 1, ..., 1] so that it broadcasts against x of shape [B, ...]."""
    return coef[t].reshape((x.shape[0],) + (1,) * (x.ndim - 1)).astype(x.dtype)


# --------------------------------------------------------------------------- forward process


def q_mean_variance(
    sched: Schedule, x0: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean, variance and log-variance of q(x_t|x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I).

    Args:
      sched: the schedule.
      x0: clean data, float [B, ...].
      t: int [B] in [0, T).

    Returns:
      (mean, variance, log_variance), each float of x0's shape.
    """
    t = check_batch_timesteps(sched, t, x0)
    mean = _extract(sched.sqrt_alphas_cumprod, t, x0) * x0
    # From coefficients computed in float64: 1 - ᾱ_t in float32 loses digits at small t.
    std = _extract(sched.sqrt_one_minus_alphas_cumprod, t, x0)
    variance = jnp.broadcast_to(jnp.square(std), x0.shape)
    log_variance = jnp.broadcast_to(_extract(sched.log_one_minus_alphas_cumprod, t, x0), x0.shape)
    return mean, variance, log_variance


def q_sample(sched: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Draws x_t ~ q(x_t|x_0) by reparameterisation: sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε.

    Args:
      sched: the schedule.
      x0: clean data, float [B, ...].
      t: int [B] in [0, T).
      noise: ε ~ N(0, I), x0's shape.

    Returns:
      x_t, x0's shape and dtype.
    """
    t = check_batch_timesteps(sched, t, x0)
    if noise.shape != x0.shape:
        raise ValueError(f"noise must have x0's shape {x0.shape}, got {noise.shape}.")
    return (
        _extract(sched.sqrt_alphas_cumprod, t, x0) * x0
        + _extract(sched.sqrt_one_minus_alphas_cumprod, t, x0) * noise
    )


def q_posterior_mean_variance(
    sched: Schedule, x0: jax.Array, x_t: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The true posterior q(x_{t-1}|x_t, x_0) = N(μ_q, σ_q² I), from Bayes' rule.

    μ_q = coef1_t x_0 + coef2_t x_t and σ_q² = β_t (1 - ᾱ_{t-1})/(1 - ᾱ_t); see `Schedule`.

    Args:
      sched: the schedule.
      x0: clean data, float [B, ...].
      x_t: noisy data at step t, x0's shape.
      t: int [B] in [0, T).

    Returns:
      (mean, variance, log_variance), each of x0's shape; the log-variance is clipped at the
      first step as in Ho et al. (`posterior_log_variance_clipped`).
    """
    t = check_batch_timesteps(sched, t, x0)
    if x_t.shape != x0.shape:
        raise ValueError(f"x_t must have x0's shape {x0.shape}, got {x_t.shape}.")
    mean = (
        _extract(sched.posterior_mean_coef1, t, x0) * x0
        + _extract(sched.posterior_mean_coef2, t, x0) * x_t
    )
    variance = jnp.broadcast_to(_extract(sched.posterior_variance, t, x0), x0.shape)
    log_variance = jnp.broadcast_to(_extract(sched.posterior_log_variance_clipped, t, x0), x0.shape)
    return mean, variance, log_variance


# --------------------------------------------------------------------------- parameterizations


def eps_from_x0(sched: Schedule, x_t: jax.Array, t: jax.Array, x0: jax.Array) -> jax.Array:
    """ε implied by x_0 at x_t: (x_t - sqrt(ᾱ_t) x_0)/sqrt(1 - ᾱ_t)."""
    t = check_batch_timesteps(sched, t, x_t)
    return (x_t - _extract(sched.sqrt_alphas_cumprod, t, x_t) * x0) / _extract(
        sched.sqrt_one_minus_alphas_cumprod, t, x_t
    )


def x0_from_eps(sched: Schedule, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """x_0 implied by ε at x_t: x_t/sqrt(ᾱ_t) - sqrt(1/ᾱ_t - 1) ε."""
    t = check_batch_timesteps(sched, t, x_t)
    return (
        _extract(sched.sqrt_recip_alphas_cumprod, t, x_t) * x_t
        - _extract(sched.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
    )


def v_from_x0_eps(sched: Schedule, x0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
    """The velocity v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0 (Salimans & Ho)."""
    t = check_batch_timesteps(sched, t, x0)
    return (
        _extract(sched.sqrt_alphas_cumprod, t, x0) * eps
        - _extract(sched.sqrt_one_minus_alphas_cumprod, t, x0) * x0
    )


def x0_from_v(sched: Schedule, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    """x_0 implied by v at x_t: sqrt(ᾱ_t) x_t - sqrt(1 - ᾱ_t) v."""
    t = check_batch_timesteps(sched, t, x_t)
    return (
        _extract(sched.sqrt_alphas_cumprod, t, x_t) * x_t
        - _extract(sched.sqrt_one_minus_alphas_cumprod, t, x_t) * v
    )


def eps_from_v(sched: Schedule, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    """ε implied by v at x_t: sqrt(1 - ᾱ_t) x_t + sqrt(ᾱ_t) v."""
    t = check_batch_timesteps(sched, t, x_t)
    return (
        _extract(sched.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t
        + _extract(sched.sqrt_alphas_cumprod, t, x_t) * v
    )


def prediction_to_x0(
    sched: Schedule, x_t: jax.Array, t: jax.Array, prediction: jax.Array, parameterization: str
) -> jax.Array:
    """x̂_0 from a model's prediction in the given parameterization ("x0", "eps" or "v")."""
    check_choice(parameterization, PARAMETERIZATIONS, "parameterization")
    if prediction.shape != x_t.shape:
        raise ValueError(
            f"The model prediction must have x_t's shape {x_t.shape}, got {prediction.shape}."
        )
    if parameterization == "x0":
        return prediction
    if parameterization == "eps":
        return x0_from_eps(sched, x_t, t, prediction)
    return x0_from_v(sched, x_t, t, prediction)


def x0_to_prediction(
    sched: Schedule, x_t: jax.Array, t: jax.Array, x0: jax.Array, parameterization: str
) -> jax.Array:
    """The prediction target in `parameterization` that corresponds to x_0 at x_t."""
    check_choice(parameterization, PARAMETERIZATIONS, "parameterization")
    if parameterization == "x0":
        return x0
    eps = eps_from_x0(sched, x_t, t, x0)
    if parameterization == "eps":
        return eps
    return v_from_x0_eps(sched, x0, eps, t)


# --------------------------------------------------------------------------- reverse process


class PMeanVariance(NamedTuple):
    """p_θ(x_{t-1}|x_t) = N(mean, variance I) and the x̂_0 it was built from; x_t's shape."""

    mean: jax.Array
    variance: jax.Array
    log_variance: jax.Array
    pred_x0: jax.Array


def is_learned(variance: str) -> bool:
    """True for a variance the model predicts ("learned", "learned_range")."""
    check_choice(variance, VARIANCES, "variance")
    return variance in LEARNED_VARIANCES


def split_output(model_output: jax.Array, x: jax.Array, variance: str):
    """(prediction, v) of a model's output: v is None for a fixed variance.

    With a learned variance the model outputs 2C channels for C-channel data: the prediction
    (in its parameterization), then v, which sets the log-variance (`learned_log_variance`).
    """
    c = x.shape[-1]
    if not is_learned(variance):
        return model_output, None
    if model_output.shape != (*x.shape[:-1], 2 * c):
        raise ValueError(
            f"With variance={variance!r} the model must output 2C = {2 * c} channels (the "
            f"prediction, then the variance), shape {(*x.shape[:-1], 2 * c)}; got "
            f"{model_output.shape}."
        )
    return model_output[..., :c], model_output[..., c:]


def learned_log_variance(
    sched: Schedule, t: jax.Array, x: jax.Array, v: jax.Array, variance: str
) -> jax.Array:
    """log σ_t² from the model's variance output v (x's shape).

    "learned": log σ_t² = v (Ho et al.'s learned variance). "learned_range" (Nichol &
    Dhariwal): log σ_t² = f log β_t + (1 - f) log σ_q²(clipped), f = (v + 1)/2, an
    interpolation between the two fixed choices: v = -1 is exactly "fixedsmall", v = +1 is
    β_t (= "fixedlarge" for t >= 1; at t = 0 β_1 where "fixedlarge" takes σ_q² of step 2).
    """
    if variance == "learned":
        return v
    frac = (v + 1.0) / 2.0
    min_log = _extract(sched.posterior_log_variance_clipped, t, x)
    max_log = _extract(jnp.log(sched.betas), t, x)
    return frac * max_log + (1.0 - frac) * min_log


def model_variance(
    sched: Schedule, t: jax.Array, x: jax.Array, variance: str
) -> tuple[jax.Array, jax.Array]:
    """Fixed reverse-process variance and log-variance at t, each [B, 1, ..., 1].

    "fixedsmall": σ_t² = σ_q², the true posterior variance (0 at t = 0), with Ho et al.'s
    clipped log-variance (the second step's value at t = 0). "fixedlarge": σ_t² = β_t, except
    at t = 0, where Ho et al. use the second step's posterior variance so that the decoder's
    log-variance is the same under both choices (β_1 when T = 1).
    """
    t = check_batch_timesteps(sched, t, x)
    check_choice(variance, FIXED_VARIANCES, "fixed variance")
    if variance == "fixedsmall":
        return (
            _extract(sched.posterior_variance, t, x),
            _extract(sched.posterior_log_variance_clipped, t, x),
        )
    if sched.num_timesteps == 1:
        large = sched.betas
    else:
        large = jnp.concatenate([sched.posterior_variance[1:2], sched.betas[1:]])
    return _extract(large, t, x), _extract(jnp.log(large), t, x)


def p_mean_variance(
    sched: Schedule,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    *,
    parameterization: str = "x0",
    variance: str = "fixedsmall",
    clip_denoised: bool = False,
) -> PMeanVariance:
    """The reverse step p_θ(x_{t-1}|x_t) from a model's output.

    The mean has the true posterior's form with x̂_0 in place of x_0:
    μ_θ = coef1_t x̂_0 + coef2_t x_t (the x_0-parameterization; ε and v predictions are first
    converted to the x̂_0 they imply).

    Args:
      sched: the schedule.
      model_output: the model's output at (x_t, t): x_t's shape, or 2C channels with a
        learned variance (the prediction, then v; see `split_output`).
      x_t: noisy data, float [B, ...].
      t: int [B] in [0, T).
      parameterization: what the model predicts: "x0", "eps" or "v".
      variance: "fixedsmall" or "fixedlarge" (see `model_variance`), or "learned" /
        "learned_range" (see `learned_log_variance`). The default, the true posterior's
        variance, is the bound's; a trained model's config names its own (`sampling.sample`
        defaults to Ho et al.'s "fixedlarge").
      clip_denoised: clip x̂_0 to [-1, 1] before forming the mean.

    Returns:
      `PMeanVariance(mean, variance, log_variance, pred_x0)`, each of x_t's shape.
    """
    t = check_batch_timesteps(sched, t, x_t)
    prediction, v = split_output(model_output, x_t, variance)
    pred_x0 = prediction_to_x0(sched, x_t, t, prediction, parameterization)
    if clip_denoised:
        pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
    mean = (
        _extract(sched.posterior_mean_coef1, t, x_t) * pred_x0
        + _extract(sched.posterior_mean_coef2, t, x_t) * x_t
    )
    if v is None:
        var, log_var = model_variance(sched, t, x_t, variance)
    else:
        log_var = learned_log_variance(sched, t, x_t, v.astype(x_t.dtype), variance)
        var = jnp.exp(log_var)
    return PMeanVariance(
        mean=mean,
        variance=jnp.broadcast_to(var, x_t.shape),
        log_variance=jnp.broadcast_to(log_var, x_t.shape),
        pred_x0=pred_x0,
    )
