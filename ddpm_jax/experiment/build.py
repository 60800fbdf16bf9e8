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

from ddpm_jax import edm, edm_discrete, models, schedules
from ddpm_jax.experiment.config import ExperimentConfig, ReverseProcess
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

        A DDPM network is queried in the x/√ᾱ scaling at the fractional timestep of σ
        (`edm_discrete.denoiser`). Arguments as `model_fn`.
        """
        r = self.reverse
        return edm_discrete.denoiser(
            self.model_fn(params, labels, **apply_kwargs),
            self.schedule,
            parameterization=r.parameterization,
            variance=r.variance,
        )

    @property
    def sigma_range(self) -> tuple[float, float]:
        """(σ_min, σ_max): the noise levels the network was trained between (DDPM: σ_t at
        t = 0 and t = T - 1, as `edm_discrete.model_sigmas`)."""
        sigmas = edm_discrete.model_sigmas(self.schedule)
        return float(sigmas[0]), float(sigmas[-1])
