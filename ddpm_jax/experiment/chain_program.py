"""One chunk of samples from an experiment's network: per-image chains, sharded, run in segments.

    program = ChainProgram(experiment, mesh, padded=64, options=config.sampling.options)
    images, labels = program(params, raw_key(seed, seed), index=0, labels=np.full(64, -1))

Image j of chunk c of a request with key k uses key `fold_in(fold_in(k, c), j)`, split into
its chain's key and its class label's key. Each image is a function of its own key alone
(the chain runs vmapped over images), so the padding of a chunk to a multiple of the device
count, the number of devices and a shorter request change no image.

The chain runs as segments of `ceil(K / SEGMENTS)` steps, each one jitted call over the same
compiled program (`sampling.ReverseChain.run`), so that a caller can report progress in
reverse steps between them; the result equals one `lax.scan` over all K steps. The respaced
schedule and the timesteps are arguments of the compiled programs, not constants: one
compilation serves every chain of the same length. Training's sample grids, `load_sampler`
and FID all draw through this.

The samplers "heun" and "euler" (EDM's Algorithm 2 on Karras σ's, for EDM and DDPM models,
through `Experiment.denoiser`) run the same way, K being their E network evaluations
(`edm.integration_plan`'s rows, `edm.integration_step`): image j's chain equals
`edm.sample` (EDM) or `edm_discrete.sample` (DDPM) of shape [1, H, W, C] with its chain key,
`x_key, churn_key = split(key)`.
"""

from __future__ import annotations

import logging
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import edm, sampling, timesteps
from ddpm_jax.experiment.build import Experiment
from ddpm_jax.experiment.config import ReverseProcess
from ddpm_jax.experiment.programs import config_key
from ddpm_jax.experiment.sampling_config import SamplingOptions
from ddpm_jax.runtime import executables
from ddpm_jax.runtime import sharding as shd
from ddpm_jax.runtime.progress import Progress
from ddpm_jax.runtime.startup import StartupTimer

PyTree = Any

# A chain is run in about this many segments (one jitted call each), for progress.
SEGMENTS = 20


class KarrasState(NamedTuple):
    """A heun/euler chain between evaluations: `edm.integration_step`'s (x, x̂, d)."""

    x: jax.Array
    x_hat: jax.Array
    d: jax.Array


def raw_key(key: jax.Array | int | None, default_seed: int) -> np.ndarray:
    """An int seed, a PRNG key (typed or raw uint32 [2]) or None (`default_seed`) -> raw key."""
    if key is None:
        key = default_seed
    if isinstance(key, int | np.integer) and not isinstance(key, bool):
        return np.asarray(jax.random.key_data(jax.random.key(int(key))))
    key = jnp.asarray(key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    if key.shape != (2,) or key.dtype != jnp.uint32:
        raise ValueError(
            f"key must be an int seed, a jax.random.key or a raw uint32 [2] PRNGKey; got "
            f"{key.dtype} {key.shape}."
        )
    return np.asarray(key)


class ChainProgram:
    """The compiled reverse chains of `padded` images with `options`, over `mesh`.

    Args:
      experiment: the model, schedule and reverse process.
      mesh: the device mesh; images are sharded over its "data" axis (`padded` must be a
        multiple of its size).
      padded: images per call.
      options: the sampler, its number of steps, η, guidance.
      reverse: the reverse process; default the experiment's.
      executable_cache: keeps the compiled programs on disk (`runtime.executables`); None:
        compiled in this process only.
      timer: times their tracing, lowering, compilation or loading (`runtime.startup`).
    """

    def __init__(
        self,
        experiment: Experiment,
        mesh: jax.sharding.Mesh,
        padded: int,
        options: SamplingOptions,
        reverse: ReverseProcess | None = None,
        *,
        executable_cache: executables.ExecutableCache | None = None,
        timer: StartupTimer | None = None,
    ):
        if padded % mesh.devices.size:
            raise ValueError(f"padded={padded} is not a multiple of {mesh.devices.size} devices.")
        self.experiment, self.mesh, self.padded, self.options = experiment, mesh, padded, options
        self.reverse = experiment.reverse if reverse is None else reverse
        batch_sh = shd.batch_sharding(mesh)
        self._prepare = jax.jit(self._prepare_fn, out_shardings=(batch_sh, batch_sh))
        self._finish = jax.jit(_images_of, out_shardings=batch_sh)
        self._steps: dict[tuple[int, ...], tuple] = {}
        if options.karras:
            self._init_karras(options, batch_sh)
            self._cache(executable_cache, timer)
            return
        self.num_steps = options.num_steps or experiment.schedule.num_timesteps
        self.segment = math.ceil(self.num_steps / SEGMENTS)
        self._sub, self._ts = self.device_steps(options.timesteps(experiment.config.diffusion))
        self._init = jax.jit(
            jax.vmap(self._init_one, in_axes=(None, None, 0)), out_shardings=batch_sh
        )
        self._run = jax.jit(
            jax.vmap(self._run_one, in_axes=(None, None, None, 0, 0, 0, None)),
            out_shardings=batch_sh,
            donate_argnums=(3,),
        )
        self._cache(executable_cache, timer)

    def _cache(self, executable_cache, timer) -> None:
        """Its programs from `executable_cache` (`runtime.executables`), timed in `timer`."""
        if executable_cache is None and timer is None:
            return
        key = {
            "config": config_key(self.experiment.config),
            "options": repr(self.options),
            "reverse": repr(self.reverse),
            "padded": self.padded,
            "segment": self.segment,
        }
        for name in ("_prepare", "_init", "_run", "_finish"):
            program = executables.CachedJit(
                getattr(self, name), f"chain{name}", key, executable_cache, timer
            )
            setattr(self, name, program)

    def _init_karras(self, options: SamplingOptions, batch_sh) -> None:
        """heun/euler: the plan's rows (on the mesh) replace the respaced schedule."""
        grid = self.experiment.karras_grid(options)
        rows, self._churn = edm.integration_plan(
            grid, options.sampler, s_churn=options.s_churn, s_min=options.s_min,
            s_max=options.s_max, s_noise=options.s_noise,
        )  # fmt: skip
        self.num_steps = int(rows["step"].shape[0])  # network evaluations
        self.segment = math.ceil(self.num_steps / SEGMENTS)
        replicated = shd.replicated(self.mesh)
        self._sub = jax.device_put(rows, replicated)
        self._ts = jax.device_put(np.float32(grid[0]), replicated)  # x = x_T σ_0
        self._init = jax.jit(
            jax.vmap(self._karras_init_one, in_axes=(None, None, 0)), out_shardings=batch_sh
        )
        self._run = jax.jit(
            jax.vmap(self._karras_run_one, in_axes=(None, None, None, 0, 0, 0, None)),
            out_shardings=batch_sh,
            donate_argnums=(3,),
        )
        churn = f", churn S_churn = {options.s_churn:g}" if self._churn else ""
        logging.info(
            "Sampling with %s in %d steps on Karras σ's from %.4g to %.4g (ρ = %g%s): %d "
            "network evaluations per image.", options.sampler, len(grid) - 1, grid[0],
            grid[-2], options.rho, churn, self.num_steps,
        )  # fmt: skip

    def device_steps(self, ts: np.ndarray) -> tuple[PyTree, jax.Array]:
        """The respaced schedule and timesteps [K] of a chain, on the mesh (cached)."""
        key = tuple(int(t) for t in ts)
        if len(key) != self.num_steps:
            raise ValueError(f"this program runs chains of {self.num_steps} steps, got {len(key)}.")
        if key not in self._steps:
            sub = timesteps.respaced_schedule(self.experiment.schedule, np.asarray(key))
            replicated = shd.replicated(self.mesh)
            self._steps[key] = (
                jax.device_put(sub, replicated),
                jax.device_put(jnp.asarray(key, jnp.int32), replicated),
            )
        return self._steps[key]

    # Per image: `key` is its chain's key, `label` its (drawn) class label.
    def _chain(self, params, sub, ts, key, label) -> sampling.ReverseChain:
        exp, num_classes = self.experiment, self.experiment.num_classes
        if num_classes:
            model_fn = exp.model_fn(params, label[None])
            if self.options.guidance_scale != 1.0:
                null = jnp.full((1,), num_classes, jnp.int32)
                model_fn = sampling.guided_model_fn(
                    model_fn, exp.model_fn(params, null), self.options.guidance_scale
                )
        else:
            model_fn = exp.model_fn(params)
        return sampling.ReverseChain(
            model_fn=model_fn,
            sub=sub,
            timesteps=ts,
            num_timesteps=exp.schedule.num_timesteps,
            shape=(1, *exp.image_shape),
            key=key,
            sampler=self.options.sampler,
            eta=float(self.options.eta),
            order=self.options.order,
            **self.reverse.kwargs(),
        )

    def _denoiser(self, params, label) -> edm.DenoiseFn:
        """D(x; σ) of one image's chain, with its class label and guidance."""
        exp, num_classes = self.experiment, self.experiment.num_classes
        if not num_classes:
            return exp.denoiser(params)
        denoise_fn = exp.denoiser(params, label[None])
        if self.options.guidance_scale != 1.0:  # D is affine in the network's output.
            null = jnp.full((1,), num_classes, jnp.int32)
            denoise_fn = sampling.guided_model_fn(
                denoise_fn, exp.denoiser(params, null), self.options.guidance_scale
            )
        return denoise_fn

    def _karras_init_one(self, rows, sigma0, key) -> KarrasState:
        x_key, _ = jax.random.split(key)
        x = jax.random.normal(x_key, (1, *self.experiment.image_shape), jnp.float32) * sigma0
        return KarrasState(x, x, jnp.zeros_like(x))

    def _karras_run_one(self, params, rows, sigma0, state, key, label, start) -> KarrasState:
        denoise_fn = self._denoiser(params, label)
        _, churn_key = jax.random.split(key)
        last = self.num_steps - 1

        def step(carry, row):
            return edm.integration_step(denoise_fn, carry, row, churn_key, churn=self._churn)

        def body(carry, j):
            row = jax.tree.map(lambda a: a[jnp.minimum(j, last)], rows)
            return jax.lax.cond(j <= last, step, lambda c, _: c, carry, row), None

        js = jnp.asarray(start, jnp.int32) + jnp.arange(self.segment, dtype=jnp.int32)
        carry, _ = jax.lax.scan(body, tuple(state), js)
        return KarrasState(*carry)

    def _prepare_fn(self, key, index, labels):
        """Per-image chain keys [P, 2] and labels [P] (drawn where labels < 0)."""
        chunk_key = jax.random.fold_in(key, index)
        keys = jax.vmap(lambda j: jax.random.fold_in(chunk_key, j))(jnp.arange(self.padded))
        chain_keys, label_keys = jax.vmap(jax.random.split)(keys).swapaxes(0, 1)
        num_classes = self.experiment.num_classes
        if num_classes:
            drawn = jax.vmap(lambda k: jax.random.randint(k, (), 0, num_classes, jnp.int32))(
                label_keys
            )
            labels = jnp.where(labels >= 0, labels, drawn)
        else:
            labels = jnp.zeros_like(labels)
        return chain_keys, labels

    def _init_one(self, sub, ts, key):
        return self._chain(None, sub, ts, key, jnp.zeros((), jnp.int32)).init()

    def _run_one(self, params, sub, ts, state, key, label, start):
        return self._chain(params, sub, ts, key, label).run(state, start, self.segment)

    def __call__(
        self,
        params: PyTree,
        key: np.ndarray,
        index: int,
        labels: np.ndarray,
        progress: Progress | None = None,
        timesteps: np.ndarray | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Draws the chunk: (images float32 [P, H, W, C] in [-1, 1], labels int32 [P]).

        Args:
          params: the network's parameters, on the mesh.
          key: the request's raw key (uint32 [2], `raw_key`).
          index: the chunk's index within its request.
          labels: int32 [P], a class label per image or -1 to draw it.
          progress: counts reverse steps (K per chunk) if given; each segment then waits for
            the previous one, so that the count is true.
          timesteps: the K timesteps to visit, increasing; default the options' (any K of
            them run on the same compiled program). None for heun/euler (K: evaluations).
        """
        if timesteps is not None and self.options.karras:
            raise ValueError(f"a {self.options.sampler} chain visits no timesteps.")
        sub, ts = self.device_steps(timesteps) if timesteps is not None else (self._sub, self._ts)
        args = shd.global_replicated((key, np.int32(index), labels), self.mesh)
        keys, drawn = self._prepare(*args)
        state = self._init(sub, ts, keys)
        for start in range(0, self.num_steps, self.segment):
            state = self._run(params, sub, ts, state, keys, drawn, np.int32(start))
            if progress is not None:
                jax.block_until_ready(state)
                progress.update(min(self.segment, self.num_steps - start))
        return self._finish(state), drawn


def _images_of(state: sampling.ChainState | KarrasState) -> jax.Array:
    """The per-image chains' final states [P, 1, H, W, C] -> images [P, H, W, C] in [-1, 1]."""
    return jnp.clip(state.x[:, 0], -1.0, 1.0)
