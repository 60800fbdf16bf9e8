"""EDM's Heun and Euler samplers on Karras σ's for models trained on the discrete DDPM chain.

A DDPM model at timestep t sees x_t = √ᾱ_t (x₀ + σ_t n) with σ_t = √((1 − ᾱ_t)/ᾱ_t), so in the
scaling x = x_t/√ᾱ_t its chain is EDM's x = x₀ + σn over the T levels σ_0 < … < σ_{T−1}, and
any x₀-, ε- or v-prediction is a denoiser D(x; σ): the model is queried at
(x/√(σ² + 1), t(σ)), t(σ) the fractional timestep whose log σ interpolates linearly between
the two neighbouring integer timesteps (diffusers' `_sigma_to_t`; the U-Net's sinusoidal
embedding takes a float t). `ddpm_jax.edm.integrate` then runs Heun or Euler on the Karras grid
between the model's smallest and largest σ.

This is diffusers' `HeunDiscreteScheduler` and `EulerDiscreteScheduler` with
`use_karras_sigmas=True` (and their defaults `timestep_spacing="linspace"`,
`final_sigmas_type="zero"`), step for step, including the start x = x_T · σ_max
(`init_noise_sigma`) and the last step to σ = 0. The σ's are computed from the schedule's
float32 ᾱ as diffusers computes them, so that the grids agree. One exception: N = 1 is EDM's
[σ_max, 0] here, where diffusers' "linspace" spacing of one timestep (t = 0) gives [σ_min, 0].
With churn, diffusers' Euler scales the model input by σ_i and ours by σ̂_i (the level x̂_i is
at), and its noise comes from torch.

Euler on this grid is DDIM with η = 0 on Karras σ's: DDIM's update
x_{t'}/√ᾱ_{t'} = x_t/√ᾱ_t + (σ_{t'} − σ_t) ε̂ is the Euler step of dx/dσ = ε̂ = (x − D)/σ.

Zero terminal SNR (`schedules.rescale_zero_terminal_snr`): ᾱ_{T−1} = 0 gives σ_{T−1} = ∞; as
diffusers' Euler does, ᾱ_{T−1} is clamped to 2⁻²⁴ here (σ_max ≈ 4096), so that the chain starts
from x_T · 4096 and every parameterization, ε included, gives a finite D there (the chains of
`ddpm_jax.sampling`, which reach ᾱ = 0 itself, refuse ε at t = T − 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion, edm
from ddpm_jax._base import ModelFn, check_choice
from ddpm_jax.schedules import Schedule

__all__ = [
    "ZERO_SNR_ALPHA_CUMPROD",
    "denoiser",
    "karras_grid",
    "model_sigmas",
    "sample",
    "sigma_to_t",
]

# The ᾱ that replaces ᾱ_{T−1} = 0 (diffusers' clamp under `rescale_betas_zero_snr`).
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24


def model_sigmas(sched: Schedule) -> np.ndarray:
    """σ_t = √((1 − ᾱ_t)/ᾱ_t) of every timestep, float64 numpy [T] (increasing in t).

    Computed in float32 from the schedule's float32 ᾱ, as diffusers computes its `sigmas`;
    ᾱ_{T−1} = 0 (zero terminal SNR) is clamped to `ZERO_SNR_ALPHA_CUMPROD` first, which can
    leave σ_{T−1} below σ_{T−2} (see `_lookup_sigmas`).

    Raises:
      ValueError: the schedule is traced (the grid is static), or ᾱ is 0 before the last step.
    """
    if isinstance(sched.alphas_cumprod, jax.core.Tracer):
        raise ValueError("The Karras samplers need a concrete schedule; build it outside jit.")
    ac = np.asarray(sched.alphas_cumprod, np.float32).copy()
    if np.any(ac[:-1] <= 0.0):
        raise ValueError("ᾱ_t must be > 0 before the last timestep.")
    if ac[-1] <= 0.0:
        ac[-1] = ZERO_SNR_ALPHA_CUMPROD
    return np.sqrt((1.0 - ac) / ac).astype(np.float64)


def _lookup_sigmas(sched: Schedule) -> np.ndarray:
    """The increasing σ table that `sigma_to_t` interpolates.

    `model_sigmas`, less a clamped σ_{T−1} that is below σ_{T−2} (a zero-SNR schedule whose
    ᾱ_{T−2} < 2⁻²⁴, e.g. the rescaled linear one at T = 1000): σ_max = σ_{T−1} then maps to the
    timestep where the schedule has ᾱ = 2⁻²⁴ (t ≈ 995.26 there), as in diffusers, whose
    `_sigma_to_t` skips that entry too.
    """
    sigmas = model_sigmas(sched)
    if sigmas.size > 1 and sigmas[-1] < sigmas[-2]:
        return sigmas[:-1]
    return sigmas


def sigma_to_t(sigma: jax.Array, log_sigmas: jax.Array) -> jax.Array:
    """The fractional timestep of σ: log σ interpolated linearly in the table log σ_t.

    t = i + w with log σ_i <= log σ <= log σ_{i+1}, w = (log σ − log σ_i)/(log σ_{i+1} −
    log σ_i); σ beyond the table's ends gives 0 or T − 1 (diffusers' `_sigma_to_t`).

    Args:
      sigma: float32 [B], σ > 0.
      log_sigmas: float32 [T], log σ_t, increasing.

    Returns:
      float32 [B] in [0, T − 1].
    """
    T = log_sigmas.shape[0]
    if T == 1:
        return jnp.zeros_like(sigma, jnp.float32)
    log_sigma = jnp.log(jnp.maximum(sigma, 1e-10))
    low = jnp.clip(jnp.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, T - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = jnp.clip((lo - log_sigma) / (lo - hi), 0.0, 1.0)
    return (low + w).astype(jnp.float32)


def denoiser(
    model_fn: ModelFn,
    sched: Schedule,
    *,
    parameterization: str = "x0",
    variance: str = "fixedlarge",
) -> edm.DenoiseFn:
    """D(x; σ) of a DDPM model, in the scaling x = x_t/√ᾱ_t.

    The model is called as `model_fn(x/√(σ² + 1), t(σ))` (`sigma_to_t` on `model_sigmas`) and
    its prediction converted with σ itself: "x0": D = out; "eps": D = x − σ ε̂; "v":
    D = x/(σ² + 1) − σ v̂/√(σ² + 1) (the forms of diffusers' discrete schedulers). A learned
    variance's extra channels are dropped.

    Args:
      model_fn: `model_fn(x_t, t)`, x_t float32 [B, ...], t float32 [B], fractional.
      sched: the schedule the model was trained with (concrete).
      parameterization: "x0", "eps" or "v".
      variance: the model's variance; "learned" and "learned_range" mean 2C output channels.

    Returns:
      `denoise_fn(x, sigma) -> D(x; σ)`, x float32 [B, ...], sigma float32 [B].
    """
    check_choice(parameterization, diffusion.PARAMETERIZATIONS, "parameterization")
    check_choice(variance, diffusion.VARIANCES, "variance")
    log_sigmas = jnp.asarray(np.log(_lookup_sigmas(sched)), jnp.float32)

    def denoise_fn(x: jax.Array, sigma: jax.Array) -> jax.Array:
        sigma = edm._check_sigma(sigma, x)
        s = edm._per_example(sigma, x)
        scale = jax.lax.rsqrt(jnp.square(s) + 1.0)  # √ᾱ at σ
        out = model_fn(x * scale, sigma_to_t(sigma, log_sigmas)).astype(x.dtype)
        out, _ = diffusion.split_output(out, x, variance)
        if out.shape != x.shape:
            raise ValueError(f"model_fn must return x's shape {tuple(x.shape)}, got {out.shape}.")
        if parameterization == "x0":
            return out
        if parameterization == "eps":
            return x - s * out
        return x * jnp.square(scale) - s * scale * out

    return denoise_fn


def karras_grid(sched: Schedule, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """`edm.karras_sigmas(N, σ_min, σ_max, ρ)` between the model's smallest and largest σ.

    Returns float64 numpy [N + 1]; diffusers rounds it to float32, and so do the samplers.
    """
    sigmas = model_sigmas(sched)
    return edm.karras_sigmas(num_steps, float(sigmas[0]), float(sigmas[-1]), rho)


def sample(
    model_fn: ModelFn,
    sched: Schedule,
    shape: Sequence[int],
    key: jax.Array,
    *,
    parameterization: str = "x0",
    variance: str = "fixedlarge",
    num_steps: int = edm.DEFAULT_NUM_STEPS,
    solver: str = "heun",
    rho: float = 7.0,
    s_churn: float = 0.0,
    s_min: float = 0.0,
    s_max: float | None = float("inf"),
    s_noise: float = 1.0,
    x_T: jax.Array | None = None,
    return_steps: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Samples a DDPM model with Heun or Euler on Karras σ's (diffusers' discrete schedulers).

    x = x_T · σ_0, σ_0 the float32 largest σ of the grid (`init_noise_sigma`), then
    `edm.integrate` down `karras_grid(sched, N, ρ)` (rounded to float32, as diffusers) with
    `denoiser`: 2N − 1 model calls with Heun, N with Euler. Randomness as `edm.sample`:
    `x_key, churn_key = jax.random.split(key)`, x_T = normal(x_key, shape) unless given.

    Args:
      model_fn: `model_fn(x_t, t)` with t float32 [B] (fractional timesteps).
      sched: the model's schedule (concrete; zero terminal SNR is clamped, see the module).
      shape: static output shape (B, ...).
      key: PRNG key.
      parameterization, variance: as in `denoiser`.
      num_steps: N >= 1.
      solver: "heun" or "euler".
      rho: ρ of the grid (diffusers: 7).
      s_churn, s_min, s_max, s_noise: EDM's churn (diffusers' Euler `step` arguments; its noise
        differs). 0 by default.
      x_T: optional unit-normal latents of `shape`.
      return_steps: also return the unclipped point after every model call (`edm.integrate`).

    Returns:
      float32 [*shape] in [-1, 1]; with `return_steps` also the steps, float32 [E, *shape].
    """
    shape = edm._check_shape(shape)
    sigmas = karras_grid(sched, num_steps, rho).astype(np.float32)
    x_key, churn_key = jax.random.split(key)
    if x_T is None:
        x_T = jax.random.normal(x_key, shape, jnp.float32)
    elif tuple(x_T.shape) != shape:
        raise ValueError(f"x_T must have shape {shape}, got {tuple(x_T.shape)}.")
    fn = denoiser(model_fn, sched, parameterization=parameterization, variance=variance)
    out = edm.integrate(
        fn, jnp.asarray(x_T, jnp.float32) * sigmas[0], sigmas, churn_key, solver=solver,
        s_churn=s_churn, s_min=s_min, s_max=s_max, s_noise=s_noise, return_steps=return_steps,
    )  # fmt: skip
    if return_steps:
        return jnp.clip(out[0], -1.0, 1.0), out[1]
    return jnp.clip(out, -1.0, 1.0)
