"""Feature statistics (streaming, float64), the Fréchet distance, and their `.npz` files.

FID = ||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^{1/2}) between Gaussians fitted to Inception
pool3 features, computed as pytorch-fid / TTUR do (scipy `sqrtm`, an eps-offset retry when the
product is singular, tolerance on imaginary round-off). Covariances are unbiased (divide by
N - 1), as `np.cov`.
"""

import os
import re
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike
from scipy import linalg

from ddpm_jax.files import atomic_writer


class FeatureStats(NamedTuple):
    """Running statistics of feature vectors (Chan et al.'s parallel update, float64).

    Attributes:
        count: number of vectors seen.
        mean: float64 [D] running mean.
        m2: float64 [D, D] sum of outer products of deviations from the running mean.
    """

    count: int
    mean: np.ndarray
    m2: np.ndarray


def init_feature_stats(dim: int) -> FeatureStats:
    """Empty statistics for `dim`-dimensional features."""
    if dim <= 0:
        raise ValueError(f"dim must be positive, got {dim}.")
    return FeatureStats(0, np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64))


def merge_feature_stats(a: FeatureStats, b: FeatureStats) -> FeatureStats:
    """Statistics of the union of two disjoint sets (e.g. two hosts' shares)."""
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"feature dims differ: {a.mean.shape} vs {b.mean.shape}.")
    n = a.count + b.count
    if a.count == 0 or b.count == 0:
        return b if a.count == 0 else a
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.count / n)
    m2 = a.m2 + b.m2 + np.outer(delta, delta) * (a.count * b.count / n)
    return FeatureStats(n, mean, m2)


def update_feature_stats(stats: FeatureStats, features: ArrayLike) -> FeatureStats:
    """Adds a batch of feature vectors.

    Args:
        stats: running statistics.
        features: [N, D] (numpy or a fully addressable jax array); converted to float64.

    Returns:
        The updated statistics.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != stats.mean.shape[0]:
        raise ValueError(f"features must be [N, {stats.mean.shape[0]}], got shape {x.shape}.")
    if x.shape[0] == 0:
        return stats
    mean = x.mean(axis=0)
    centred = x - mean
    return merge_feature_stats(stats, FeatureStats(x.shape[0], mean, centred.T @ centred))


def mean_and_covariance(stats: FeatureStats) -> tuple[np.ndarray, np.ndarray]:
    """Returns (mu float64 [D], sigma float64 [D, D]) with the unbiased (N - 1) covariance."""
    if stats.count < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {stats.count}.")
    return stats.mean.copy(), stats.m2 / (stats.count - 1)


def frechet_distance(
    mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike, eps: float = 1e-6
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    Args:
        mu1, mu2: means [D].
        sigma1, sigma2: covariances [D, D].
        eps: diagonal offset added to both covariances when S1 S2 is too singular for
            `sqrtm` to return a finite result.

    Returns:
        ||mu1 - mu2||² + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^{1/2}), a float.

    Raises:
        ValueError: on shape mismatches, or if the square root keeps a significant imaginary
            part (the statistics are not covariance matrices).
    """
    mu1, mu2 = (
        np.atleast_1d(np.asarray(mu1, np.float64)),
        np.atleast_1d(np.asarray(mu2, np.float64)),
    )
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"mu1 and mu2 must be [D] of the same D, got {mu1.shape}, {mu2.shape}.")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"sigma1 and sigma2 must be [{d}, {d}], got {sigma1.shape}, {sigma2.shape}."
        )
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(d) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"sqrtm(sigma1 @ sigma2) has an imaginary component of "
                f"{np.max(np.abs(covmean.imag)):.3g}: are sigma1/sigma2 covariance matrices?"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _sqrtm(a: np.ndarray) -> np.ndarray:
    # A (nearly) singular product is expected for few samples; the caller's finiteness check
    # decides whether to retry with an offset, so scipy's warning is noise here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(a)


def save_stats(
    path: str | os.PathLike, mu: ArrayLike, sigma: ArrayLike, num_examples: int | None = None
) -> None:
    """Writes `mu`, `sigma` (and `num_examples`) to an `.npz` (pytorch-fid's key names).

    Written to a temporary name and renamed, so readers never see a partial file.
    """
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"mu": mu, "sigma": sigma}
    if num_examples is not None:
        arrays["num_examples"] = np.asarray(num_examples, np.int64)
    with atomic_writer(path, "wb") as f:
        np.savez(f, **arrays)


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Reads (mu [D], sigma [D, D]) float64 from an `.npz` with keys `mu`, `sigma`.

    Also reads pytorch-fid / TTUR reference statistics files. Never unpickles.
    """
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in ("mu", "sigma") if k not in data.files]
        if missing:
            raise ValueError(f"{path}: missing keys {missing} (found {data.files}).")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not [D], [D, D].")
    return mu, sigma


def reference_stats_path(
    cache_dir: str | os.PathLike,
    dataset: str,
    split: str,
    image_size: int,
    weights_fingerprint: str,
    num_examples: int = 0,
) -> Path:
    """Cache path of a dataset split's reference statistics.

    One file per (dataset, split, image size, number of examples, Inception weights): e.g.
    `<cache_dir>/cifar10-train-32px-all-inception_1a2b3c4d5e6f7a8b.npz`.

    Args:
        cache_dir: directory of cached statistics.
        dataset: dataset name (e.g. a TFDS name; "/" and other odd characters become "_").
        split: split name, e.g. "train" or "test[:10000]".
        image_size: side of the images fed to the network (before its resize to 299).
        weights_fingerprint: `InceptionWeights.fingerprint` (hex, at least 16 digits).
        num_examples: examples used; 0 means the whole split.
    """
    if not re.fullmatch(r"[0-9a-f]{16,}", weights_fingerprint):
        raise ValueError(
            f"weights_fingerprint must be >= 16 hex digits, got {weights_fingerprint!r}."
        )
    if image_size <= 0 or num_examples < 0:
        raise ValueError(
            f"need image_size > 0 and num_examples >= 0, got {image_size}, {num_examples}."
        )
    count = "all" if num_examples == 0 else str(num_examples)
    name = (
        f"{_safe_name(dataset)}-{_safe_name(split)}-{image_size}px-{count}-"
        f"inception_{weights_fingerprint[:16]}.npz"
    )
    return Path(cache_dir) / name


def _safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_.") or "_"
