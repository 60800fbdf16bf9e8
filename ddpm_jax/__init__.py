"""ddpm_jax: Denoising Diffusion Probabilistic Models (Ho et al. 2020) in JAX/Flax.

The mathematics lives in three modules that import nothing else from the package:
`schedules` (β schedules -> `Schedule` pytree), `diffusion` (forward process, posterior,
parameterizations, weighted ELBO, bits/dim) and `sampling` (reverse chains under `lax.scan`).
"""

from ddpm_jax import diffusion, schedules

__all__ = ["diffusion", "schedules"]
