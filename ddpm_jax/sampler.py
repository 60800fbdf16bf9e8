"""`Sampler`: sharded, chunked, jitted sampling from a model's parameters.

Randomness: chunk c of a request with key k uses `fold_in(k, c)`, and image j of that chunk
`fold_in(fold_in(k, c), j)` (split into its chain's key and its class label's key). Each image
is a function of its own key alone (the chain runs vmapped over images), so the padding of a
chunk to a multiple of the device count, the number of devices and a shorter request change
no image: `sample(5, seed=s)` equals the first 5 images of `sample(8, seed=s)`.

Build one from a training workdir with `ddpm_jax.generate.load_sampler(workdir)`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from ddpm_jax import checkpointing, metrics, sampling, schedules, train
from ddpm_jax import sharding as shd
from ddpm_jax.config_checks import DiffusionConfig

PyTree = Any


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """How to run the reverse chain (hashable: one compilation per distinct options).

    Attributes:
      sampler: "ancestral" or "ddim".
      num_steps: steps of the chain; 0 means all T.
      eta: DDIM's η (0: deterministic); "ddim" only.
      guidance_scale: classifier-free guidance w (1: the conditional model alone);
        class-conditional models only.
    """

    sampler: str = "ancestral"
    num_steps: int = 0
    eta: float = 0.0
    guidance_scale: float = 1.0

    def check(self, num_timesteps: int, num_classes: int) -> None:
        """Raises ValueError naming the offending option and the fix."""
        if self.sampler not in sampling.SAMPLERS:
            raise ValueError(
                f"sampler (config.sampling.sampler) = {self.sampler!r} is not one of "
                f"{sampling.SAMPLERS}."
            )
        steps = self.num_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= num_timesteps:
            raise ValueError(
                f"num_steps (config.sampling.num_steps) must be 0 (all steps) or an int in "
                f"[1, {num_timesteps}], got {steps!r}."
            )
        if not self.eta >= 0.0 or (self.eta != 0.0 and self.sampler != "ddim"):
            raise ValueError(
                f"eta (config.sampling.eta) = {self.eta} must be >= 0, and 0 unless "
                f"sampler='ddim' (sampler is {self.sampler!r})."
            )
        if self.guidance_scale != 1.0 and num_classes == 0:
            raise ValueError(
                f"guidance_scale = {self.guidance_scale} needs a class-conditional model "
                "(config.model.num_classes > 0); use 1.0."
            )


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


def global_replicated(tree: PyTree, mesh: jax.sharding.Mesh) -> PyTree:
    """Host values identical on every process -> global arrays replicated over `mesh`."""

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, shd.replicated(mesh), lambda idx: x[idx])

    return jax.tree.map(put, tree)


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


@dataclasses.dataclass(frozen=True, eq=False)
class Sampler:
    """Draws samples from a trained model's EMA parameters, sharded over every device.

    Build it with `load_sampler(workdir)` (or `Sampler.from_config`). Calls are chunked by
    `config.sampling.batch_size`; each chunk is one jitted program whose batch is sharded over
    the mesh's "data" axis, padded to a multiple of the device count (the padding is dropped).
    In a multi-process run every process must make the same calls (they are collective); each
    gets the full result.

    Attributes:
      config: the resolved config, frozen (model, data, diffusion of the checkpoint).
      params: the EMA parameters, on `mesh`.
      step: the training step of the checkpoint.
      mesh: the device mesh.
      model: the U-Net.
      sched: the diffusion schedule.
    """

    config: ml_collections.FrozenConfigDict
    params: PyTree
    step: int
    mesh: jax.sharding.Mesh
    model: Any
    sched: schedules.Schedule
    _compiled: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

    @classmethod
    def from_config(
        cls, config: ml_collections.ConfigDict, workdir: str, *, step: int | None = None
    ) -> Sampler:
        """Restores only the EMA parameters of `workdir`'s checkpoint `step` (default latest).

        Args:
          config: a resolved config (`generate.resolve_config`): its model/data/diffusion must be
            those the checkpoint was trained with.
          workdir: the training run's workdir.
          step: checkpoint step; None for the latest.

        Raises:
          FileNotFoundError: no checkpoint (at `step`) in `workdir`.
          ValueError: a bad sampling field, naming it.
        """
        config = ml_collections.FrozenConfigDict(config)  # the compiled functions rely on it.
        mesh = shd.make_mesh(config.mesh)
        model, sched, _, abstract, _ = train.build(config, mesh)
        options = default_options(config)
        options.check(sched.num_timesteps, int(config.model.num_classes))
        _check_batch_size(config.sampling.batch_size)
        if step is None:
            step = checkpointing.latest_step(workdir)
            if step is None:
                raise FileNotFoundError(
                    f"No checkpoint in {checkpointing.checkpoint_dir(workdir)}: train first."
                )
        params = checkpointing.load_subtree(workdir, "ema_params", abstract.ema_params, step=step)
        return cls(config, params, int(step), mesh, model, sched)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image."""
        size, channels = int(self.config.data.image_size), int(self.config.data.channels)
        return size, size, channels

    @property
    def num_classes(self) -> int:
        """Classes of a class-conditional model; 0 if unconditional."""
        return int(self.config.model.num_classes)

    def options(self, **changes) -> SamplingOptions:
        """`config.sampling`'s options with the non-None `changes` applied, checked."""
        options = dataclasses.replace(
            default_options(self.config), **{k: v for k, v in changes.items() if v is not None}
        )
        options.check(self.sched.num_timesteps, self.num_classes)
        return options

    def sample_chunk(
        self,
        index: int,
        size: int,
        key: jax.Array | int | None = None,
        *,
        options: SamplingOptions | None = None,
        labels: np.ndarray | None = None,
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
        fn = self._compiled.get((padded, options))
        if fn is None:
            fn = self._compiled[(padded, options)] = self._compile(padded, options)
        raw = raw_key(key, int(self.config.sampling.seed))
        args = global_replicated((raw, np.int32(index), labels_in), self.mesh)
        images, out_labels = fn(self.params, *args)
        return Chunk(images, out_labels, int(size))

    def iter_chunks(
        self,
        num_images: int,
        key: jax.Array | int | None = None,
        *,
        options: SamplingOptions | None = None,
        labels: np.ndarray | None = None,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> Iterator[Chunk]:
        """The chunks of a request for `num_images` images, in order (see `sample_chunk`)."""
        if isinstance(num_images, bool) or not isinstance(num_images, int | np.integer):
            raise ValueError(f"num_images must be an int, got {num_images!r}.")
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}.")
        batch = int(self.config.sampling.batch_size) if batch_size is None else batch_size
        _check_batch_size(batch)
        if labels is not None:
            labels = self._check_labels(labels, num_images)
        sizes = chunk_sizes(int(num_images), batch)
        bar = show_progress(progress, len(sizes), 0, "sample")
        try:
            for i, size in enumerate(sizes):
                chunk_labels = None if labels is None else labels[i * batch : i * batch + size]
                yield self.sample_chunk(i, size, key, options=options, labels=chunk_labels)
                bar.update(1)
        finally:
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
          sampler: "ancestral" or "ddim"; None: `config.sampling.sampler`.
          num_steps: steps of the chain, 0 for all T; None: `config.sampling.num_steps`.
          eta: DDIM's η; None: `config.sampling.eta`.
          guidance_scale: classifier-free guidance w (class-conditional models); None: 1.
          labels: int [N] class labels in [0, num_classes]; None: drawn uniformly.
          batch_size: images per chunk; None: `config.sampling.batch_size`.
          return_labels: also return the int32 [N] labels the images were drawn with.
          progress: show a progress bar over chunks (process 0).

        Returns:
          uint8 [N, H, W, C] (and int32 [N] labels if `return_labels`).
        """
        out = self.sample_float(
            num_images, key, seed=seed, sampler=sampler, num_steps=num_steps, eta=eta,
            guidance_scale=guidance_scale, labels=labels, batch_size=batch_size,
            return_labels=return_labels, progress=progress,
        )  # fmt: skip
        if return_labels:
            return metrics.to_uint8(out[0]), out[1]
        return metrics.to_uint8(out)

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
            sampler=sampler, num_steps=num_steps, eta=eta, guidance_scale=guidance_scale
        )
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

    def _compile(self, padded: int, options: SamplingOptions) -> Callable:
        d = DiffusionConfig.from_config(self.config)
        model, sched, num_classes = self.model, self.sched, self.num_classes
        shape = (1, *self.image_shape)
        batch_sh = shd.batch_sharding(self.mesh)

        def one_image(params, key, label):
            chain_key, label_key = jax.random.split(key)
            if num_classes:
                drawn = jax.random.randint(label_key, (), 0, num_classes, jnp.int32)
                label = jnp.where(label >= 0, label, drawn)
                model_fn = train.make_model_fn(model, params, y=label[None])
                if options.guidance_scale != 1.0:
                    null = jnp.full((1,), num_classes, jnp.int32)
                    model_fn = sampling.guided_model_fn(
                        model_fn, train.make_model_fn(model, params, y=null),
                        options.guidance_scale,
                    )  # fmt: skip
            else:
                label = jnp.zeros((), jnp.int32)
                model_fn = train.make_model_fn(model, params)
            image = sampling.sample(
                model_fn,
                sched,
                shape,
                chain_key,
                parameterization=d.parameterization,
                variance=d.variance,
                clip_denoised=d.clip_denoised,
                sampler=options.sampler,
                num_steps=options.num_steps or None,
                eta=float(options.eta),
            )
            return image[0], label

        def sample_chunk(params, key, index, labels):
            chunk_key = jax.random.fold_in(key, index)
            keys = jax.vmap(lambda j: jax.random.fold_in(chunk_key, j))(jnp.arange(padded))
            # Sharding the per-image keys makes the whole chain data-parallel from the start.
            keys = jax.lax.with_sharding_constraint(keys, batch_sh)
            labels = jax.lax.with_sharding_constraint(labels, batch_sh)
            return jax.vmap(one_image, in_axes=(None, 0, 0))(params, keys, labels)

        return jax.jit(sample_chunk, out_shardings=(batch_sh, batch_sh))


def default_options(config: ml_collections.ConfigDict) -> SamplingOptions:
    """The `SamplingOptions` of `config.sampling`."""
    s = config.sampling
    return SamplingOptions(
        sampler=s.sampler,
        num_steps=s.num_steps,
        eta=float(s.eta),
        guidance_scale=float(s.get("guidance_scale", 1.0)),
    )


def _check_batch_size(batch_size: Any) -> None:
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int | np.integer)
        or batch_size < 1
    ):
        raise ValueError(
            f"config.sampling.batch_size (batch_size) must be an int >= 1, got {batch_size!r}."
        )


def show_progress(enabled: bool, total: int, initial: int, desc: str):
    import tqdm

    return tqdm.tqdm(
        total=total, initial=initial, disable=not (enabled and jax.process_index() == 0),
        unit="chunk", desc=desc, dynamic_ncols=True,
    )  # fmt: skip


def from_process_0(value: np.ndarray) -> np.ndarray:
    """Process 0's `value` on every process (a collective in multi-process runs)."""
    if jax.process_count() == 1:
        return value
    return np.asarray(multihost_utils.broadcast_one_to_all(value))
