"""ddpm_jax: Denoising Diffusion Probabilistic Models (Ho et al. 2020) in JAX/Flax.

The mathematics lives in three modules that import nothing else from the package:
`schedules` (β schedules -> `Schedule` pytree), `diffusion` (forward process, posterior,
parameterizations, weighted ELBO, bits/dim) and `sampling` (reverse chains under `lax.scan`).
"""

from ddpm_jax import diffusion, sampling, schedules
from ddpm_jax.diffusion import (
    bits_per_dim,
    p_mean_variance,
    q_posterior_mean_variance,
    q_sample,
    training_losses,
)
from ddpm_jax.sampling import sample
from ddpm_jax.schedules import Schedule, get_beta_schedule, make_schedule

__all__ = [
    "Schedule",
    "bits_per_dim",
    "diffusion",
    "get_beta_schedule",
    "make_schedule",
    "p_mean_variance",
    "q_posterior_mean_variance",
    "q_sample",
    "sample",
    "sampling",
    "schedules",
    "training_losses",
]
