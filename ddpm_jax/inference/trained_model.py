"""`TrainedModel` and `load_sampler`: a workdir's EMA weights, sampled sharded, chunked, jitted.

    import ddpm_jax

    model = ddpm_jax.load_sampler("workdirs/digits")          # EMA params, latest step
    images = model.sample(64, seed=0)                          # uint8 [64, H, W, C]
    fast = model.sample(64, seed=0, sampler="ddim", num_steps=50)
    x0_hat = model.model_fn(x_t, t)                            # the network, jitted

Randomness: chunk c of a request with key k uses `fold_in(k, c)`, and image j of that chunk
`fold_in(fold_in(k, c), j)` (split into its chain's key and its class label's key). Each image
is a function of its own key alone (the chain runs vmapped over images), so the padding of a
chunk to a multiple of the device count, the number of devices and a shorter request change
no image: `sample(5, seed=s)` equals the first 5 images of `sample(8, seed=s)`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from ddpm_jax import fields, files
from ddpm_jax.errors import ConfigError, WorkdirError
from ddpm_jax.experiment import (
    Experiment,
    ExperimentConfig,
    ReverseProcess,
    SamplingOptions,
    changes,
)
from ddpm_jax.experiment.chain_program import ChainProgram, raw_key
from ddpm_jax.experiment.programs import config_key
from ddpm_jax.images import to_uint8
from ddpm_jax.runtime import checkpointing, compilation_cache, executables
from ddpm_jax.runtime import sharding as shd
from ddpm_jax.runtime.checkpointing import named_emas
from ddpm_jax.runtime.progress import Progress
from ddpm_jax.runtime.startup import StartupTimer

__all__ = ["Chunk", "TrainedModel", "chunk_sizes", "load_sampler"]

PyTree = Any


class Chunk(NamedTuple):
    """One chunk of samples, still on the devices.

    Attributes:
      images: float32 [P, H, W, C] in [-1, 1], sharded over "data"; P is the chunk size
        padded up to a multiple of the device count.
      labels: int32 [P] class labels the images were drawn with (0 if unconditional).
      num_valid: the first `num_valid` rows are the requested images; the rest is padding.
    """

    images: jax.Array
    labels: jax.Array
    num_valid: int


def chunk_sizes(num_images: int, batch_size: int) -> list[int]:
    """Sizes of the chunks of `num_images` images in chunks of at most `batch_size`."""
    full, rest = divmod(num_images, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


@dataclasses.dataclass(frozen=True, eq=False)
class TrainedModel:
    """A trained (or imported) model's EMA parameters, for sampling sharded over every device.

    Build it with `load_sampler(workdir)`. "Sampler" in this package means the chain
    algorithm (`config.sampling.sampler`: "ancestral", "ddim", ...); this class runs any of
    them over the workdir's network. Calls are chunked by `config.sampling.batch_size`;
    each chunk is a jitted program whose batch is sharded over the mesh's "data" axis, padded
    to a multiple of the device count (the padding is dropped). In a multi-process run every
    process must make the same calls (they are collective); each gets the full result.

    Attributes:
      config: the parsed config of the run (model, data, diffusion of the checkpoint; sampling
        and mesh of the caller).
      params: the EMA parameters, on `mesh`.
      step: the training step of the checkpoint (of a named EMA: its reconstruction step).
      mesh: the device mesh.
      experiment: the network, schedule and reverse process.
      ema: which parameters: "ema_params" (the checkpoint's exponential EMA) or the name of a
        post-hoc EMA of `<workdir>/emas/` (`config.eval.ema`, `ddpm-jax ema`).
      executable_cache: where the sampling programs are kept compiled
        (`runtime.executables`); None: compiled in this process only.
      timer: times the phases of the start (`runtime.startup`); None: not timed.
    """

    config: ExperimentConfig
    params: PyTree
    step: int
    mesh: jax.sharding.Mesh
    experiment: Experiment
    ema: str = named_emas.DEFAULT_EMA
    executable_cache: executables.ExecutableCache | None = None
    timer: StartupTimer | None = None
    _compiled: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

    @classmethod
    def from_config(
        cls,
        config: Any,
        workdir: str,
        *,
        step: int | None = None,
        ema: str | None = None,
        executable_cache: executables.ExecutableCache | str | None = executables.DEFAULT,
        timer: StartupTimer | None = None,
    ) -> TrainedModel:
        """Restores only the EMA parameters of `workdir`'s checkpoint `step` (default latest).

        No optimizer or train state is built: the parameters' shapes come from the network.

        Args:
          config: a resolved config (`experiment.changes.run_config`), ConfigDict or parsed: its
            model/data/diffusion must be those the checkpoint was trained with.
          workdir: the training run's workdir.
          step: checkpoint step; None for the newest that restores. With a named EMA: None
            or its own step.
          ema: a post-hoc EMA of `<workdir>/emas/` to use instead of the checkpoint's EMA;
            None: `config.eval.ema` (None there too: the checkpoint's EMA).
          executable_cache: where the sampling programs are kept compiled; default: beside
            JAX's persistent compilation cache (off when it is off); None: not kept.
          timer: times the phases (`init`, `restore`, the programs' compilation).

        Raises:
          WorkdirNotFoundError: no checkpoint (at `step`) in `workdir`, or no such named EMA.
          ConfigError: a bad sampling field, naming it.
          WorkdirError: a named EMA of another step than `step`.
        """
        clock = StartupTimer() if timer is None else timer
        experiment = Experiment.from_config(config)
        mesh = shd.make_mesh()
        cache = executables.resolve(executable_cache)
        extra = {"executable_cache": cache, "timer": timer}
        shapes = executables.cached_eval_shape(
            cache, "params_shapes", {"config": config_key(experiment.config)}
        )
        abstract = clock.call("init", experiment.abstract_params, mesh, eval_shape=shapes)
        name = experiment.config.eval.ema if ema is None else ema
        if name not in (None, named_emas.DEFAULT_EMA):
            params, meta = clock.call(
                "restore", named_emas.restore_named_ema, workdir, name, abstract
            )
            if step is not None and int(step) != int(meta["step"]):
                raise WorkdirError(
                    f"The post-hoc EMA {name!r} is the average at step {meta['step']}, not "
                    f"{step}; leave the step out, or reconstruct one at step {step}."
                )
            return cls(experiment.config, params, int(meta["step"]), mesh, experiment, name,
                       **extra)  # fmt: skip
        params, step = clock.call(
            "restore", checkpointing.restore_subtree, workdir, "ema_params", abstract, step=step
        )
        return cls(experiment.config, params, int(step), mesh, experiment, **extra)

    @property
    def network(self):
        """The U-Net (a flax.linen Module)."""
        return self.experiment.model

    @property
    def sched(self):
        """The diffusion schedule."""
        return self.experiment.schedule

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image."""
        return self.experiment.image_shape

    @property
    def num_classes(self) -> int:
        """Classes of a class-conditional model; 0 if unconditional."""
        return self.experiment.num_classes

    @property
    def reverse(self) -> ReverseProcess:
        """The reverse process the chains use (parameterization, variance, clipping)."""
        return self.experiment.reverse

    @property
    def model_fn(self) -> Callable[[jax.Array, jax.Array], jax.Array]:
        """The workdir's network, jitted: `(x_t, t) -> prediction` in its parameterization.

        x_t: float32 [B, H, W, C] in model scale; t: int32 [B] in [0, T); the prediction is
        float32 [B, H, W, C] (`reverse.parameterization`: x̂_0, ε̂ or v̂). Unconditional, or
        the null class of a class-conditional model. Compiled once per batch size.
        """
        fn = self._compiled.get("model_fn")
        if fn is None:
            apply = jax.jit(lambda params, x, t: self.experiment.model_fn(params)(x, t))
            fn = self._compiled["model_fn"] = lambda x_t, t: apply(self.params, x_t, t)
        return fn

    @property
    def denoiser(self) -> Callable[[jax.Array, jax.Array], jax.Array]:
        """The workdir's network as a denoiser, jitted: `(x, sigma) -> D(x; σ)`.

        x: float32 [B, H, W, C] = x_0 + σ n; sigma: float32 [B] > 0; D: float32 like x
        (`Experiment.denoiser`: EDM's preconditioned network, or a DDPM network queried at the
        fractional timestep of σ). Unconditional, or the null class.
        """
        fn = self._compiled.get("denoiser")
        if fn is None:
            apply = jax.jit(lambda params, x, s: self.experiment.denoiser(params)(x, s))
            fn = self._compiled["denoiser"] = lambda x, sigma: apply(self.params, x, sigma)
        return fn

    def options(self, **changes) -> SamplingOptions:
        """`config.sampling`'s chain options with the non-None `changes` applied, checked."""
        given = {k: v for k, v in changes.items() if v is not None}
        options = dataclasses.replace(self.config.sampling.options, **given)
        options.check(self.config.diffusion, self.num_classes)
        return options

    def sample_chunk(
        self,
        index: int,
        size: int,
        key: jax.Array | int | None = None,
        *,
        options: SamplingOptions | None = None,
        labels: np.ndarray | None = None,
        progress: Progress | None = None,
    ) -> Chunk:
        """Draws chunk `index` (`size` images) of a request with `key`; stays on device.

        Image j of the chunk uses key `fold_in(fold_in(key, index), j)`.

        Args:
          index: the chunk's index within its request.
          size: images in the chunk, >= 1.
          key: the request's key, or an int seed; None: `config.sampling.seed`.
          options: how to sample; default `config.sampling`'s.
          labels: optional int [size] class labels in [0, num_classes] (num_classes is the
            null class); default drawn uniformly from the images' keys.
          progress: counts the chunk's reverse steps, if given.
        """
        options = self.options() if options is None else options
        for name, value, low in (("index", index, 0), ("size", size, 1)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")
        n_dev = self.mesh.devices.size
        padded = math.ceil(size / n_dev) * n_dev
        labels_in = np.full((padded,), -1, np.int32)  # -1: draw the label.
        if labels is not None:
            labels_in[:size] = self._check_labels(labels, size)
        # Chains of the same length share one compiled program, whichever timesteps.
        program = self._compiled.get((padded, options.program_key))
        if program is None:
            program = ChainProgram(
                self.experiment, self.mesh, padded, options,
                executable_cache=self.executable_cache, timer=self.timer,
            )  # fmt: skip
            self._compiled[(padded, options.program_key)] = program
        raw = raw_key(key, self.config.sampling.seed)
        ts = None if options.karras else options.timesteps(self.config.diffusion)
        images, out_labels = program(self.params, raw, int(index), labels_in, progress, ts)
        return Chunk(images, out_labels, int(size))

    def steps_per_chunk(self, options: SamplingOptions | None = None) -> int:
        """Reverse steps of one chain with `options` (for progress counts); heun/euler:
        network evaluations."""
        options = self.options() if options is None else options
        if options.karras:
            return options.num_evaluations
        return options.num_steps or self.sched.num_timesteps

    def iter_chunks(
        self,
        num_images: int,
        key: jax.Array | int | None = None,
        *,
        options: SamplingOptions | None = None,
        labels: np.ndarray | None = None,
        batch_size: int | None = None,
        progress: bool | Progress = False,
    ) -> Iterator[Chunk]:
        """The chunks of a request for `num_images` images, in order (see `sample_chunk`).

        `progress`: True shows one counting reverse steps (process 0); a `Progress` is
        updated instead.
        """
        if isinstance(num_images, bool) or not isinstance(num_images, int | np.integer):
            raise ValueError(f"num_images must be an int, got {num_images!r}.")
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}.")
        batch = self.config.sampling.batch_size if batch_size is None else batch_size
        fields.integer("sampling.batch_size", batch, 1)
        options = self.options() if options is None else options
        if labels is not None:
            labels = self._check_labels(labels, num_images)
        sizes = chunk_sizes(int(num_images), batch)
        bar = progress if isinstance(progress, Progress) else None
        if progress is True:
            total = len(sizes) * self.steps_per_chunk(options)
            bar = Progress(total, desc=f"sampling {num_images} images", unit=options.progress_unit)
        try:
            for i, size in enumerate(sizes):
                chunk_labels = None if labels is None else labels[i * batch : i * batch + size]
                yield self.sample_chunk(
                    i, size, key, options=options, labels=chunk_labels, progress=bar
                )
        finally:
            if progress is True:
                bar.close()

    def sample(
        self,
        num_images: int,
        key: jax.Array | int | None = None,
        *,
        seed: int | None = None,
        sampler: str | None = None,
        num_steps: int | None = None,
        eta: float | None = None,
        guidance_scale: float | None = None,
        order: int | None = None,
        timestep_spacing: str | None = None,
        labels: np.ndarray | None = None,
        batch_size: int | None = None,
        return_labels: bool = False,
        progress: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Draws `num_images` samples as uint8 [N, H, W, C].

        Args:
          num_images: N >= 1.
          key: a `jax.random` key (typed or raw) or an int seed; None: `seed`, else
            `config.sampling.seed`.
          seed: int seed, instead of `key`.
          sampler: one of `experiment.sampling_config.SAMPLERS` ("heun"/"euler": EDM's samplers on
            Karras σ's, also for DDPM models; the others for DDPM models only); None:
            `config.sampling.sampler`.
          num_steps: steps of the chain, 0 for all T (heun/euler: 18); None:
            `config.sampling.num_steps`.
          eta: DDIM's η; None: `config.sampling.eta`.
          guidance_scale: classifier-free guidance w (class-conditional models); None:
            `config.sampling.guidance_scale`.
          order: order of "dpm_solver++" / "unipc" (1, 2, 3); None: `config.sampling.order`.
          timestep_spacing: which `num_steps` timesteps (`timesteps.SPACINGS`); None:
            `config.sampling.timestep_spacing`.
          labels: int [N] class labels in [0, num_classes]; None: drawn uniformly.
          batch_size: images per chunk; None: `config.sampling.batch_size`.
          return_labels: also return the int32 [N] labels the images were drawn with.
          progress: show progress in reverse steps (process 0).

        Returns:
          uint8 [N, H, W, C] (and int32 [N] labels if `return_labels`).
        """
        out = self.sample_float(
            num_images, key, seed=seed, sampler=sampler, num_steps=num_steps, eta=eta,
            guidance_scale=guidance_scale, order=order, timestep_spacing=timestep_spacing,
            labels=labels, batch_size=batch_size, return_labels=return_labels, progress=progress,
        )  # fmt: skip
        if return_labels:
            return to_uint8(out[0]), out[1]
        return to_uint8(out)

    def sample_float(
        self,
        num_images: int,
        key: jax.Array | int | None = None,
        *,
        seed: int | None = None,
        sampler: str | None = None,
        num_steps: int | None = None,
        eta: float | None = None,
        guidance_scale: float | None = None,
        order: int | None = None,
        timestep_spacing: str | None = None,
        labels: np.ndarray | None = None,
        batch_size: int | None = None,
        return_labels: bool = False,
        progress: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """As `sample`, but float32 [N, H, W, C] in [-1, 1], before quantisation to uint8."""
        if seed is not None:
            if key is not None:
                raise ValueError("pass key or seed, not both.")
            key = seed
        options = self.options(
            sampler=sampler, num_steps=num_steps, eta=eta, guidance_scale=guidance_scale,
            order=order, timestep_spacing=timestep_spacing,
        )  # fmt: skip
        images, all_labels = [], []
        chunks = self.iter_chunks(
            num_images, key, options=options, labels=labels, batch_size=batch_size,
            progress=progress,
        )  # fmt: skip
        for chunk in chunks:
            host_images, host_labels = shd.global_to_host((chunk.images, chunk.labels))
            images.append(host_images[: chunk.num_valid])
            all_labels.append(host_labels[: chunk.num_valid])
        images = np.concatenate(images)
        return (images, np.concatenate(all_labels)) if return_labels else images

    def _check_labels(self, labels: Any, size: int) -> np.ndarray:
        labels = np.asarray(labels)
        if self.num_classes == 0:
            raise ValueError("labels were given but the model is unconditional (num_classes=0).")
        if labels.shape != (size,) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be int [{size}], got {labels.dtype} {labels.shape}.")
        if labels.min() < 0 or labels.max() > self.num_classes:
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}] ({self.num_classes}: the null "
                f"class), got values in [{labels.min()}, {labels.max()}]."
            )
        return labels.astype(np.int32)


def load_sampler(
    workdir: str,
    *,
    step: int | None = None,
    ema: str | None = None,
    config_overrides: Mapping[str, Any] | None = None,
    compilation_cache_dir: str | None = compilation_cache.DEFAULT,
    timer: StartupTimer | None = None,
) -> TrainedModel:
    """The `TrainedModel` of a training (or imported) workdir's EMA parameters, to sample from.

    Reads `<workdir>/config.json` and restores only `ema_params` (no optimizer state) onto
    every device; compiles lazily, once per chunk shape and sampling options.

    Args:
      workdir: the workdir (`~` and relative paths are resolved here).
      step: checkpoint step; None for the newest that restores.
      ema: the name of a post-hoc EMA that `ddpm-jax ema` wrote to `<workdir>/emas/`, to
        sample from instead of the checkpoint's EMA (its step is its reconstruction step);
        None: `config.eval.ema` of the overrides, else the checkpoint's EMA.
      config_overrides: dotted-path changes, e.g. `{"sampling.batch_size": 64,
        "sampling.num_steps": 100}` (see `experiment.changes.apply_overrides` for what may
        change).
      compilation_cache_dir: turns on JAX's persistent compilation cache there, unless the
        process already has one (so a second `load_sampler` of the same model starts in
        seconds); the default is `compilation_cache.default_dir()`, None leaves JAX's
        setting alone. The sampling programs' executables are kept beside it
        (`runtime.executables`), so that a second process neither traces nor compiles them.
      timer: times the phases of the start (`runtime.startup`), e.g. for `ddpm-jax-restart`.

    Returns:
      The `TrainedModel`; `model.sample(n, seed=s)` gives uint8 [n, H, W, C].

    Raises:
      WorkdirNotFoundError: no config.json or no checkpoint in `workdir`.
      ConfigError, WorkdirError: a bad override, or a config.json that does not parse.
    """
    workdir = files.resolve_path(workdir)
    if compilation_cache_dir is not None:
        compilation_cache.enable(compilation_cache_dir, only_if_unset=True)
    config = changes.apply_overrides(changes.read_config(workdir), config_overrides)
    try:
        return TrainedModel.from_config(config, workdir, step=step, ema=ema, timer=timer)
    except ConfigError as e:
        raise ConfigError(f"{workdir}/config.json: {e}") from e
