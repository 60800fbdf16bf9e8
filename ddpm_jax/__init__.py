"""ddpm_jax: Denoising Diffusion Probabilistic Models (Ho et al. 2020) in JAX/Flax.

The mathematics lives in the top-level modules, which import nothing else from the package:
`schedules` (β schedules -> `Schedule` pytree), `diffusion` (forward process, posterior,
parameterizations, reverse step, weighted ELBO), `likelihood` (the bound in bits/dim),
`timesteps` (which steps a chain visits) and `sampling` (reverse chains under `lax.scan`);
`edm` is Karras et al.'s formulation (preconditioned denoiser, its loss, Heun/Euler on Karras
σ's) and `edm_discrete` runs those samplers on DDPM-trained models.
The folders hold the machinery: `models`, `data`, `runtime`, `experiment`, and the three
modes `train`, `inference` and `evaluation`.

`ddpm_jax.load_sampler(workdir)` loads a trained (or imported) workdir for sampling; it is
imported on first use, so `import ddpm_jax` stays the mathematics alone.
"""

from ddpm_jax import diffusion, edm, edm_discrete, likelihood, sampling, schedules, timesteps
from ddpm_jax.diffusion import (
    p_mean_variance,
    q_posterior_mean_variance,
    q_sample,
    training_losses,
)
from ddpm_jax.likelihood import bits_per_dim
from ddpm_jax.sampling import sample
from ddpm_jax.schedules import Schedule, get_beta_schedule, make_schedule

__all__ = [
    "Sampler",
    "Schedule",
    "bits_per_dim",
    "diffusion",
    "edm",
    "edm_discrete",
    "get_beta_schedule",
    "likelihood",
    "load_sampler",
    "make_schedule",
    "p_mean_variance",
    "q_posterior_mean_variance",
    "q_sample",
    "sample",
    "sampling",
    "schedules",
    "timesteps",
    "training_losses",
]

_INFERENCE_NAMES = ("Sampler", "load_sampler")


def __getattr__(name: str):
    if name in _INFERENCE_NAMES:
        from ddpm_jax.inference import sampler

        return getattr(sampler, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
