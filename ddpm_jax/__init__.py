"""ddpm_jax: Denoising Diffusion Probabilistic Models (Ho et al. 2020) in JAX/Flax.

The mathematics lives in the top-level modules, which import nothing else from the package,
bottom-up: `schedules` (β schedules -> `Schedule` pytree), `diffusion` (forward process,
posterior, parameterizations, reverse step), `likelihood` (the bound in bits/dim), `losses`
(the weighted ELBO and the other objectives), `timesteps` (which steps a chain visits),
`solvers` (multistep ODE solvers), `sampling` (reverse chains under `lax.scan`) and
`inversion` (DDIM inversion). The folders hold the machinery: `models`, `data`, `fid`,
`runtime`, `experiment`, and the three modes `inference`, `evaluation` and `train`.
`edm` is Karras et al.'s formulation beside DDPM's (the preconditioned denoiser, its loss,
Heun/Euler on Karras σ's) and `edm_discrete` runs those samplers on DDPM-trained models.

The names below are the stable paths of the public API. `ddpm_jax.load_sampler(workdir)`
loads a trained (or imported) workdir for sampling; it is imported on first use, so that
`import ddpm_jax` stays the mathematics alone.
"""

from ddpm_jax import (
    diffusion,
    edm,
    edm_discrete,
    inversion,
    likelihood,
    losses,
    sampling,
    schedules,
    timesteps,
)
from ddpm_jax.diffusion import p_mean_variance, q_posterior_mean_variance, q_sample
from ddpm_jax.likelihood import bits_per_dim
from ddpm_jax.losses import training_losses
from ddpm_jax.sampling import sample
from ddpm_jax.schedules import Schedule, get_beta_schedule, make_schedule

__all__ = [
    "Schedule",
    "TrainedModel",
    "bits_per_dim",
    "diffusion",
    "edm",
    "edm_discrete",
    "get_beta_schedule",
    "inversion",
    "likelihood",
    "load_sampler",
    "losses",
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

_INFERENCE_NAMES = ("TrainedModel", "load_sampler")


def __getattr__(name: str):
    if name in _INFERENCE_NAMES:
        from ddpm_jax.inference import trained_model

        return getattr(trained_model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
