"""Published reference files, read as they are published (never unpickled).

* guided-diffusion (ADM) reference batches, e.g. `VIRTUAL_imagenet256_labeled.npz`: `arr_0`
  uint8 images [N, H, W, 3] (and, in class-conditional sample batches, `arr_1` int labels [N]),
  with the statistics of its evaluator `mu` [2048], `sigma` [2048, 2048] (pool3) and `mu_s`
  [2023], `sigma_s` [2023, 2023] (spatial, for sFID). ADM publishes ImageNet and LSUN batches,
  not CIFAR-10.
* EDM's (Karras et al. 2022) reference statistics, e.g. `cifar10-32x32.npz`: `mu` [2048],
  `sigma` [2048, 2048]; pytorch-fid's and `frechet.save_stats`'s files have the same keys.

`load_reference` reads the statistics and the images' header (not the images, which can be
gigabytes); `iter_reference_images` streams the images in batches.
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ddpm_jax.errors import DataError
from ddpm_jax.fid import inception
from ddpm_jax.files import sha256_file

IMAGES_KEY = "arr_0"
LABELS_KEY = "arr_1"
_STAT_PAIRS = (("mu", "sigma"), ("mu_s", "sigma_s"))


class ReferenceFile(NamedTuple):
    """What a reference `.npz` holds.

    Attributes:
        path: the file.
        sha256: its SHA-256 (hex), for the record of an evaluation.
        keys: the arrays in the file, sorted.
        num_images: N of `arr_0`, or None without images.
        image_shape: (H, W, 3) of `arr_0`, or None.
        mu, sigma: float64 [2048], [2048, 2048] pool3 statistics, or None.
        mu_s, sigma_s: float64 [2023], [2023, 2023] spatial (sFID) statistics, or None.
    """

    path: Path
    sha256: str
    keys: tuple[str, ...]
    num_images: int | None
    image_shape: tuple[int, int, int] | None
    mu: np.ndarray | None
    sigma: np.ndarray | None
    mu_s: np.ndarray | None
    sigma_s: np.ndarray | None


@contextlib.contextmanager
def _npy_member(path: Path, key: str):
    """Opens `key`.npy inside the `.npz` at `path`: yields (shape, dtype, stream at the data)."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise DataError(f"{path}: {key} has .npy format {version}, expected 1.0 or 2.0.")
        if dtype.hasobject:
            raise DataError(f"{path}: {key} holds Python objects; refusing to unpickle it.")
        if fortran and len(shape) > 1:
            raise DataError(f"{path}: {key} is in Fortran order, which cannot be streamed.")
        yield shape, dtype, f


def _image_header(path: Path, image_channels: int) -> tuple[int, tuple[int, int, int]]:
    with _npy_member(path, IMAGES_KEY) as (shape, dtype, _):
        pass
    if len(shape) != 4 or shape[-1] != image_channels or dtype != np.uint8:
        raise DataError(
            f"{path}: {IMAGES_KEY} must be uint8 images [N, H, W, {image_channels}], got "
            f"{dtype} {shape}."
        )
    return int(shape[0]), tuple(int(s) for s in shape[1:])


def load_reference(
    path: str | os.PathLike,
    *,
    pool_dim: int = inception.FEATURE_DIM,
    spatial_dim: int = inception.SPATIAL_DIM,
) -> ReferenceFile:
    """Reads an ADM reference batch or an EDM / pytorch-fid statistics file.

    Statistics come as pairs (`mu`, `sigma`) and (`mu_s`, `sigma_s`), each pair all or none;
    the file must hold images (`arr_0`) or pool statistics. Other keys (`arr_1` labels,
    `num_examples`) are allowed and listed in `keys`. Read with `np.load(allow_pickle=False)`.

    Args:
        path: the `.npz`.
        pool_dim: the width `mu` must have (2048: Inception pool3).
        spatial_dim: the width `mu_s` must have (2023: ADM's `mixed_6/conv`, 7 channels).

    Returns:
        A `ReferenceFile`; statistics as float64.

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: one line naming the file and what is wrong (not an `.npz`, object arrays,
            a half pair, a shape that does not fit).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no reference file at {path}.")
    keys, arrays = _read_arrays(path, [k for pair in _STAT_PAIRS for k in pair])
    stats = {}
    for pair, dim in zip(_STAT_PAIRS, (pool_dim, spatial_dim), strict=True):
        present = [k for k in pair if k in arrays]
        if len(present) == 1:
            raise DataError(f"{path} has {present[0]!r} without its pair {pair}.")
        if present:
            mu, sigma = (np.asarray(arrays[k], np.float64) for k in pair)
            if mu.shape != (dim,) or sigma.shape != (dim, dim):
                raise DataError(
                    f"{path}: {pair[0]} {mu.shape} and {pair[1]} {sigma.shape} must be [{dim}] "
                    f"and [{dim}, {dim}]."
                )
            stats.update(zip(pair, (mu, sigma), strict=True))
    num_images, image_shape = _image_header(path, 3) if IMAGES_KEY in keys else (None, None)
    if num_images is None and "mu" not in stats:
        raise DataError(
            f"{path} holds neither images ({IMAGES_KEY}) nor statistics (mu, sigma); found "
            f"{list(keys)}."
        )
    return ReferenceFile(
        path,
        sha256_file(path),
        keys,
        num_images,
        image_shape,
        stats.get("mu"),
        stats.get("sigma"),
        stats.get("mu_s"),
        stats.get("sigma_s"),
    )


def _read_arrays(path: Path, wanted: list[str]) -> tuple[tuple[str, ...], dict]:
    """(all keys sorted, {key: array} of the `wanted` ones present); errors in one line."""
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise DataError(f"{path} is not a readable .npz without pickles: {e}") from e
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise DataError(f"{path} is a single .npy array, not an .npz of named arrays.")
    with data:
        keys = tuple(sorted(data.files))
        try:
            arrays = {k: data[k] for k in wanted if k in keys}
        except (ValueError, OSError, zipfile.BadZipFile) as e:  # object arrays, truncation
            raise DataError(f"{path}: {e}") from e
    return keys, arrays


def iter_reference_images(path: str | os.PathLike, batch_size: int) -> Iterator[np.ndarray]:
    """Streams `arr_0` of an `.npz` as uint8 batches [b, H, W, 3] (the last may be smaller).

    Reads `batch_size` images at a time from the archive (compressed or not), so a reference
    batch of gigabytes never sits in memory whole.

    Raises:
        ValueError: no `arr_0`, not uint8 [N, H, W, 3], or a truncated file.
    """
    path = Path(path).expanduser()
    if batch_size < 1:
        raise DataError(f"batch_size must be positive, got {batch_size}.")
    try:
        num, image_shape = _image_header(path, 3)
    except KeyError as e:
        raise DataError(f"{path} has no {IMAGES_KEY} (images).") from e
    per_image = int(np.prod(image_shape))
    with _npy_member(path, IMAGES_KEY) as (_, _, f):
        for start in range(0, num, batch_size):
            count = min(batch_size, num - start)
            data = f.read(count * per_image)
            if len(data) != count * per_image:
                raise DataError(f"{path}: {IMAGES_KEY} ends after {start} images of {num}.")
            yield np.frombuffer(data, np.uint8).reshape(count, *image_shape)
