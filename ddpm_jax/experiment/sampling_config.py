"""The `config.sampling` view: how a reverse chain runs (`SamplingOptions`, the hashable options
of one compiled chain) and which one a config samples with (`SamplingConfig`).

The DDPM chains ("ancestral", "ddim", "dpm_solver++", "unipc") run DDPM models; EDM's samplers
("heun", "euler", on Karras σ's) run any model. The defaults are `defaults.py`'s.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ddpm_jax import edm, fields, sampling, solvers, timesteps
from ddpm_jax.errors import ConfigError
from ddpm_jax.experiment import edm_config

# The DDPM chains (DDPM models only) and EDM's samplers on Karras σ's (any model).
SAMPLERS = (*sampling.SAMPLERS, *edm.SOLVERS)


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """How to run the reverse chain (hashable: one compilation per distinct `program_key`).

    Attributes:
      sampler: one of `SAMPLERS` ("heun", "euler": `karras`, for any model; the others DDPM).
      num_steps: steps of the chain; 0 means all T (heun/euler: EDM's 18).
      eta: DDIM's η (0: deterministic); "ddim" only.
      guidance_scale: classifier-free guidance w (1: the conditional model alone);
        class-conditional models only.
      order: 1, 2 or 3, the order of the multistep solvers ("dpm_solver++", "unipc"); the
        other samplers take only the default, 2.
      timestep_spacing: which `num_steps` timesteps are visited, one of
        `timesteps.SPACINGS` ("endpoints", the default, keeps 0 and T-1); not heun/euler.
      sigma_min, sigma_max, rho, s_churn, s_min, s_max, s_noise: heun/euler's Karras grid
        (None: the model's σ range) and churn (`edm.integrate`; s_max None: ∞).
    """

    sampler: str
    num_steps: int
    eta: float
    guidance_scale: float
    order: int
    timestep_spacing: str
    sigma_min: float | None
    sigma_max: float | None
    rho: float
    s_churn: float
    s_min: float
    s_max: float | None
    s_noise: float

    def __post_init__(self):
        fields.choice("sampling.sampler", self.sampler, SAMPLERS)
        fields.integer("sampling.num_steps", self.num_steps, 0,
                       hint=" 0: all T steps (heun/euler: 18).")  # fmt: skip
        fields.number("sampling.eta", self.eta, 0.0, hint=" 0: deterministic DDIM.")
        if self.eta != 0.0 and self.sampler != "ddim":
            raise fields.fail(
                "sampling.eta",
                self.eta,
                f"applies to the DDIM sampler only, but config.sampling.sampler = "
                f"{self.sampler!r}; set eta to 0 or sampler to 'ddim'.",
            )
        fields.number("sampling.guidance_scale", self.guidance_scale, hint=" 1: no guidance.")
        fields.integer("sampling.order", self.order, 1, solvers.MAX_ORDER)
        if self.order != 2 and self.sampler not in solvers.SOLVERS:
            raise fields.fail(
                "sampling.order",
                self.order,
                f"applies to the multistep solvers {solvers.SOLVERS} only, but "
                f"config.sampling.sampler = {self.sampler!r}; leave it at 2.",
            )
        fields.choice("sampling.timestep_spacing", self.timestep_spacing, timesteps.SPACINGS)
        edm_config.check_karras_fields(self)

    @property
    def karras(self) -> bool:
        """True for EDM's samplers on Karras σ's ("heun", "euler")."""
        return self.sampler in edm.SOLVERS

    @property
    def num_evaluations(self) -> int | None:
        """Network evaluations per image of a heun/euler chain (2N - 1, N); None otherwise."""
        n = self.num_steps or edm.DEFAULT_NUM_STEPS
        return edm.num_evaluations(n, self.sampler) if self.karras else None

    @property
    def progress_unit(self) -> str:  # what a chain's progress counts.
        return "network evaluations" if self.karras else "reverse steps"

    @property
    def program_key(self) -> tuple:
        """What a compiled chain depends on: not which timesteps it visits, only how many."""
        key = (self.sampler, self.num_steps, self.eta, self.guidance_scale, self.order)
        return key + tuple(getattr(self, f) for f in edm_config.KARRAS_FIELDS)

    def timesteps(self, diffusion: Any) -> np.ndarray:
        """The timesteps a DDPM chain visits (all T if num_steps is 0), int64 [K], increasing.

        `diffusion` is the config's `DiffusionConfig` (not imported here: it holds this view).
        """
        T = diffusion.num_timesteps
        if self.num_steps == 0:
            return np.arange(T)
        try:
            return timesteps.spaced_timesteps(
                T, self.num_steps, self.timestep_spacing, np.cumprod(1.0 - diffusion.betas())
            )
        except ValueError as e:
            raise ConfigError(
                f"config.sampling.num_steps = {self.num_steps} with timestep_spacing = "
                f"{self.timestep_spacing!r}: {e}"
            ) from e

    def check(self, diffusion: Any, num_classes: int) -> None:
        """Raises `ConfigError` for options this model cannot sample with."""
        edm_config.check_sampler_for_model(self, diffusion)  # and num_steps <= T.
        if not self.karras:
            self.timesteps(diffusion)
        if self.guidance_scale != 1.0 and num_classes == 0:
            raise ConfigError(
                f"config.sampling.guidance_scale = {self.guidance_scale} needs a "
                "class-conditional model (config.model.num_classes > 0); use 1.0."
            )


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """The `config.sampling` group: the chain (`options`) and how many images, in what chunks."""

    sampler: str
    num_steps: int
    eta: float
    num_samples: int
    batch_size: int
    seed: int
    guidance_scale: float
    order: int
    timestep_spacing: str
    sigma_min: float | None
    sigma_max: float | None
    rho: float
    s_churn: float
    s_min: float
    s_max: float | None
    s_noise: float

    def __post_init__(self):
        self.options  # noqa: B018  (checks the chain's fields)
        fields.integer("sampling.num_samples", self.num_samples, 1)
        fields.integer("sampling.batch_size", self.batch_size, 1)
        fields.integer("sampling.seed", self.seed, 0, 2**31 - 1)

    @property
    def options(self) -> SamplingOptions:
        """The chain's options (`dataclasses.replace` them to change one)."""
        names = [f.name for f in dataclasses.fields(SamplingOptions)]
        return SamplingOptions(**{name: getattr(self, name) for name in names})
