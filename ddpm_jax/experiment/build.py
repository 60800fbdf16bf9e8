"""From a config to the diffusion model it describes: network, schedule, reverse process.

    exp = Experiment.from_config(config)        # parses and checks the config once
    params = exp.init_params(key)               # or exp.abstract_params(mesh) to restore into
    x0_hat = exp.model_fn(params)(x_t, t)       # the network as `model_fn(x_t, t)`

No optimizer and nothing of training: sampling, evaluation and the weight importer build
exactly this; `ddpm_jax.train` adds the optimizer and its state on top.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import edm, edm_discrete, models, schedules
from ddpm_jax.experiment import edm_config
from ddpm_jax.experiment.config import ExperimentConfig, ReverseProcess
from ddpm_jax.experiment.sampling_config import SamplingOptions
from ddpm_jax.runtime import sharding as shd

PyTree = Any


def make_model_fn(model: flax.linen.Module, params: PyTree, **apply_kwargs) -> Callable:
    """`model_fn(x_t, t)` for `ddpm_jax.diffusion` and `ddpm_jax.sampling` from a U-Net."""
    return lambda x_t, t: model.apply({"params": params}, x_t, t, **apply_kwargs)


@dataclasses.dataclass(frozen=True, eq=False)
class Experiment:
    """The model a config describes.

    Attributes:
      config: the parsed config.
      model: the U-Net (its `ModelConfig` is `config.model`).
      schedule: the forward process of `config.diffusion`.
    """

    config: ExperimentConfig
    model: models.UNet
    schedule: schedules.Schedule

    @classmethod
    def from_config(cls, config: Any) -> Experiment:
        """Builds from a ConfigDict (parsed and checked here) or an `ExperimentConfig`."""
        config = ExperimentConfig.from_config(config)
        return cls(config, models.UNet(config.model), config.diffusion.make_schedule())

    @property
    def reverse(self) -> ReverseProcess:
        """The reverse-process triple (parameterization, variance, clip_denoised)."""
        return self.config.diffusion.reverse

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image."""
        return self.config.image_shape

    @property
    def is_edm(self) -> bool:
        """True for an EDM model (`config.diffusion.formulation = "edm"`)."""
        return self.config.diffusion.formulation == "edm"

    @property
    def num_classes(self) -> int:
        """Classes of a class-conditional model; 0 if unconditional."""
        return self.config.model.num_classes

    def init_params(self, key: jax.Array) -> PyTree:
        """Freshly initialised parameters (float32 pytree)."""
        x = jnp.zeros((1, *self.image_shape), jnp.float32)
        return self.model.init(key, x, jnp.zeros((1,), jnp.int32))["params"]

    def abstract_params(
        self, mesh: jax.sharding.Mesh, *, eval_shape: Callable = jax.eval_shape
    ) -> PyTree:
        """Shapes, dtypes and shardings (`config.mesh`) of the parameters; nothing allocated
        (`eval_shape` gives the shapes: `runtime.executables.cached_eval_shape`)."""
        m = self.config.mesh
        return shd.sharded_abstract(
            self.init_params, mesh, jax.random.PRNGKey(0), fsdp=m.fsdp, min_size=m.fsdp_min_size,
            eval_shape=eval_shape,
        )  # fmt: skip

    def model_fn(self, params: PyTree, labels: jax.Array | None = None, **apply_kwargs) -> Callable:
        """The network with `params` as `model_fn(x_t, t) -> prediction`.

        An EDM model's network is the raw F of `edm.precondition`: `model_fn(c_in x, c_noise)`
        with c_noise = ¼ ln σ float32 [B] in place of t (`denoiser` is D(x; σ)).

        Args:
          params: the parameters.
          labels: class labels int [B'] of a class-conditional model (num_classes: the null
            class). A batch of k·B' rows gets them repeated, `tile(labels, k)`: the bound's
            functions evaluate k stacked copies of a batch in one call.
          **apply_kwargs: passed to `model.apply` (e.g. train=True, rngs=...).
        """
        if labels is None:
            return make_model_fn(self.model, params, **apply_kwargs)

        def model_fn(x_t, t):
            y = jnp.tile(labels, x_t.shape[0] // labels.shape[0])
            return self.model.apply({"params": params}, x_t, t, y=y, **apply_kwargs)

        return model_fn

    def denoiser(
        self, params: PyTree, labels: jax.Array | None = None, **apply_kwargs
    ) -> edm.DenoiseFn:
        """The network as a denoiser `D(x; σ)` (x = x_0 + σ n, x float32 [B, ...], σ float32
        [B]), for the samplers and the likelihood written in that convention (`ddpm_jax.edm`,
        `likelihood.ode_log_likelihood`).

        An EDM network is preconditioned (`edm.precondition` with `config.edm.sigma_data`:
        its time embedding takes c_noise = ¼ ln σ); a DDPM network is queried in the x/√ᾱ
        scaling at the fractional timestep of σ (`edm_discrete.denoiser`). Arguments as
        `model_fn`.
        """
        model_fn = self.model_fn(params, labels, **apply_kwargs)
        if self.is_edm:
            return edm.precondition(model_fn, self.config.edm.sigma_data)
        r = self.reverse
        return edm_discrete.denoiser(
            model_fn, self.schedule, parameterization=r.parameterization, variance=r.variance
        )

    @property
    def sigma_range(self) -> tuple[float, float]:
        """(σ_min, σ_max): the noise levels the samplers integrate between. DDPM: those the
        network was trained between, σ_t at t = 0 and t = T - 1 (`edm_discrete.model_sigmas`);
        EDM: `config.sampling.sigma_min`/`sigma_max` (None: EDM's 0.002 and 80)."""
        if self.is_edm:
            s = self.config.sampling
            lo, hi = edm_config.EDM_SIGMA_RANGE
            return (lo if s.sigma_min is None else s.sigma_min,
                    hi if s.sigma_max is None else s.sigma_max)  # fmt: skip
        return edm_config.ddpm_sigma_range(self.schedule)

    def karras_grid(self, options: SamplingOptions) -> np.ndarray:
        """The σ grid [N + 1] (ending at 0) of a heun/euler chain with `options`: float64 for an
        EDM model (as `edm.sample`), float32 for a DDPM one (as `edm_discrete.sample`)."""
        return edm_config.karras_grid(options, self.config.diffusion, self.schedule)
