"""Inception features of image batches on the mesh, and what a metric suite keeps of them.

Every image passes the network once (`fid.make_features_fn`), giving the 2,048 pool3
features (FID, precision and recall), the 1,008 logits (Inception Score) and ADM's 2,023
spatial features (sFID, Mixed_6d.branch1x1, first 7 channels). `FeatureSet` streams the pool
and spatial features into running statistics and keeps, in preallocated float32 host arrays,
the rows that cannot be streamed: the pool features (precision and recall compare every pair)
and the logits (the Inception Score's p(y) is a mean over a split). That is
N × (2,048 + 1,008) × 4 bytes: 611 MB for 50,000 samples (410 MB of pool features for
50,000 reference images, which keep no logits).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import fid
from ddpm_jax.runtime import sharding as shd

FeaturesFn = Callable[[jax.Array], dict[str, np.ndarray]]


def inception_input(images: jax.Array) -> jax.Array:
    """Float [B, H, W, C] in [-1, 1], C in {1, 3} -> the uint8 grid, back in [-1, 1], 3 channels.

    The uint8 quantization is the one saved images have, before every metric.
    """
    quantised = jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
    x = fid.images_from_uint8(quantised)
    return jnp.tile(x, (1, 1, 1, 3)) if x.shape[-1] == 1 else x


def make_features(
    weights: fid.InceptionWeights,
    mesh: jax.sharding.Mesh,
    outputs: tuple[str, ...] = ("pool", "spatial"),
) -> FeaturesFn:
    """`features(images sharded [B, H, W, C] in [-1, 1]) -> {output: host float32 [B, D]}`.

    Args:
      weights: the Inception weights; "logits" in `outputs` needs their logits kernel.
      mesh: the devices the images are sharded over.
      outputs: a subset of `fid.FEATURE_OUTPUTS`.
    """
    kernel = weights.logits_kernel if "logits" in outputs else None
    kernel = None if kernel is None else shd.global_replicated(np.asarray(kernel), mesh)
    features_fn = fid.make_features_fn(
        shd.global_replicated(weights.variables, mesh), kernel, outputs=outputs
    )
    prepare = jax.jit(inception_input, out_shardings=shd.batch_sharding(mesh))
    return lambda images: shd.global_to_host(features_fn(prepare(images)))


def make_uint8_features(features_fn: FeaturesFn, mesh: jax.sharding.Mesh) -> FeaturesFn:
    """`features(uint8 host [B, H, W, 3]) -> ...` for reference images read from a file.

    Every process passes the same batch; it is padded to a multiple of the devices and the
    processes, each process puts its share on its devices, and the padding rows are dropped.
    """
    num_p, p = jax.process_count(), jax.process_index()
    multiple = int(np.lcm(mesh.devices.size, num_p))

    def features(images: np.ndarray) -> dict[str, np.ndarray]:
        count = images.shape[0]
        padded = -(-count // multiple) * multiple
        x = np.zeros((padded, *images.shape[1:]), np.float32)
        x[:count] = np.asarray(images, np.float32) / 127.5 - 1.0
        local = padded // num_p
        out = features_fn(shd.host_to_global(x[p * local : (p + 1) * local], mesh))
        return {k: v[:count] for k, v in out.items()}

    return features


class FeatureSet:
    """The features of one image set, as the metrics need them.

    Attributes:
      count: rows added so far.
      stats: {output: `fid.FeatureStats`} of the streamed outputs ("pool", "spatial").
      rows: {output: float32 [capacity, D]} of the kept outputs ("pool", "logits"); the first
        `count` rows are filled.
      seconds: {part: wall time} of the sampling, the Inception and each metric.
    """

    def __init__(self, capacity: int, streamed: tuple[str, ...], kept: tuple[str, ...]):
        self.capacity, self.count = int(capacity), 0
        self.streamed, self.kept = tuple(streamed), tuple(kept)
        self.stats: dict[str, fid.FeatureStats] = {}
        self.rows: dict[str, np.ndarray] = {}
        self.seconds: dict[str, float] = {}  # wall time of what made and used the set.

    def add(self, features: dict[str, np.ndarray]) -> None:
        """Adds a batch {output: [b, D]} (rows beyond the capacity are an error)."""
        b = next(iter(features.values())).shape[0]
        if self.count + b > self.capacity:
            raise ValueError(f"{self.count + b} rows exceed the capacity {self.capacity}.")
        for name in self.streamed:
            f = np.asarray(features[name])
            if name not in self.stats:
                self.stats[name] = fid.init_feature_stats(f.shape[1])
            self.stats[name] = fid.update_feature_stats(self.stats[name], f)
        for name in self.kept:
            f = np.asarray(features[name], np.float32)
            if name not in self.rows:
                self.rows[name] = np.empty((self.capacity, f.shape[1]), np.float32)
            self.rows[name][self.count : self.count + b] = f
        self.count += b

    def statistics(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(mu float64 [D], sigma float64 [D, D]) of a streamed output."""
        return fid.mean_and_covariance(self.stats[name])

    def kept_rows(self, name: str) -> np.ndarray:
        """float32 [count, D] of a kept output."""
        return self.rows[name][: self.count]

    @property
    def nbytes(self) -> int:
        """Host bytes of the kept rows (the statistics add 8·D² bytes per streamed output)."""
        return sum(int(r.nbytes) for r in self.rows.values())


def describe_bytes(n: float) -> str:
    """A byte count in MB or GB, for logs."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"
