"""The Inception Score and improved precision and recall, as guided-diffusion's evaluator computes
them (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis", ADM).

* Inception Score (Salimans et al. 2016, "Improved Techniques for Training GANs", §4):
  IS = exp E_x KL(p(y|x) ‖ p(y)), with p(y|x) the softmax of the 1008 logits and p(y) its mean
  over a split; the mean and standard deviation over splits. ADM takes the logits as pool3
  times `softmax/logits/MatMul`'s kernel, without the bias (`make_features_fn`'s "logits").
* Precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for
  Assessing Generative Models", §2, eqs. 1-2): each set's manifold is the union of balls
  around its feature vectors, the radius of a ball the distance to that vector's k-th nearest
  neighbour in the same set; precision is the fraction of generated vectors inside the real
  manifold, recall the fraction of real vectors inside the generated one.
* sFID (Nash et al. 2021, "Generating Images with Sparse Representations", §4.1) needs nothing
  here: it is `frechet_distance` of the statistics of `make_features_fn`'s "spatial" features.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike

# Rows x columns of one block of squared distances: 5000^2 float32 is 100 MB, so the memory of
# 50k x 50k precision and recall stays bounded by a few hundred MB besides the features.
DEFAULT_BLOCK_SIZE = 5000


def inception_score(logits: ArrayLike, splits: int = 10) -> tuple[float, float]:
    """Inception Score (mean, std over splits) from the 1008-way logits.

    The N examples are cut into `splits` consecutive parts, part i being rows
    [i·N // splits, (i+1)·N // splits) (equal parts when splits divides N: ADM's split size of
    5,000 on 50,000 samples is splits=10); each part scores exp(mean_x Σ_y p(y|x) (log p(y|x)
    - log p(y))) with p(y) the part's mean of p(y|x). The std is over parts (ddof 0, as
    improved-gan's `np.std`). Computed in float64 with log-softmax, so no probability rounds
    to log 0.

    Args:
        logits: [N, C] logits (numpy or a fully addressable jax array), C = 1008 for Inception.
        splits: number of parts, 1 <= splits <= N.

    Returns:
        (mean, std) of the per-part scores, floats.

    Raises:
        ValueError: logits not 2-D, or splits out of range.
    """
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be [N, C] with C >= 2, got shape {logits.shape}.")
    n = logits.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"splits must be in [1, N] = [1, {n}], got {splits}.")
    scores = []
    for i in range(splits):
        part = logits[i * n // splits : (i + 1) * n // splits].astype(np.float64)
        shifted = part - part.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        p = np.exp(log_p)
        log_marginal = np.log(p.mean(axis=0))
        scores.append(np.exp(np.mean(np.sum(p * (log_p - log_marginal), axis=1))))
    return float(np.mean(scores)), float(np.std(scores))


# --------------------------------------------------------------------------- precision / recall


def _squared_distances(u: jax.Array, v: jax.Array) -> jax.Array:
    """‖u_i - v_j‖² [R, C] in float32 as ‖u‖² - 2 u·v + ‖v‖², clamped at 0 (as ADM)."""
    uv = jnp.dot(u, v.T, precision=jax.lax.Precision.HIGHEST)
    d = jnp.sum(u * u, axis=1)[:, None] - 2.0 * uv + jnp.sum(v * v, axis=1)[None, :]
    return jnp.maximum(d, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _smallest_update(best, rows, cols, cols_valid, *, k):
    """Merges a block's squared distances into the running k+1 smallest per row (ascending)."""
    d = jnp.where(cols_valid[None, :], _squared_distances(rows, cols), jnp.inf)
    neg, _ = jax.lax.top_k(-jnp.concatenate([best, d], axis=1), k + 1)
    return -neg


@jax.jit
def _inside_block(a, radii_a, valid_a, b, radii_b, valid_b):
    """For a block pair: a_i inside some ball of b, and b_j inside some ball of a ([R], [C])."""
    d = _squared_distances(a, b)
    a_in = jnp.any((d <= radii_b[None, :]) & valid_b[None, :], axis=1)
    b_in = jnp.any((d <= radii_a[:, None]) & valid_a[:, None], axis=0)
    return a_in, b_in


def _padded_blocks(features: np.ndarray, block: int):
    """Yields (start, float32 [block, D] rows zero-padded, bool [block] valid)."""
    for start in range(0, features.shape[0], block):
        rows = np.asarray(features[start : start + block], np.float32)
        count = rows.shape[0]
        valid = np.arange(block) < count
        yield start, np.pad(rows, ((0, block - count), (0, 0))), valid


def _padded_slice(values: np.ndarray, start: int, block: int) -> np.ndarray:
    part = values[start : start + block]
    return np.pad(part, (0, block - part.shape[0]))


def _check_features(name: str, features: ArrayLike, dim: int | None = None) -> np.ndarray:
    features = np.asarray(features)
    if features.ndim != 2 or (dim is not None and features.shape[1] != dim):
        want = f"[N, {dim}]" if dim is not None else "[N, D]"
        raise ValueError(f"{name} must be {want}, got shape {features.shape}.")
    return features


def knn_radii(
    features: ArrayLike, k: int = 3, *, block_size: int = DEFAULT_BLOCK_SIZE
) -> np.ndarray:
    """Squared distance of each vector to its k-th nearest neighbour in the same set.

    The vector itself (distance 0) is not counted: the (k+1)-th smallest squared distance of
    its row, as ADM's `ManifoldEstimator.manifold_radii` (`nhood_sizes=(3,)`). Computed in
    float32 blocks of `block_size` x `block_size` squared distances, keeping the k+1 smallest
    per row, so memory is O(block_size²) whatever N.

    Args:
        features: [N, D] feature vectors, N > k.
        k: neighbourhood size.
        block_size: rows and columns per block.

    Returns:
        float32 [N] squared radii.
    """
    features = _check_features("features", features)
    n = features.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, N) = [1, {n}), got {k}.")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}.")
    block = min(block_size, n)
    radii = np.empty(n, np.float32)
    for start, rows, _ in _padded_blocks(features, block):
        best = jnp.full((block, k + 1), jnp.inf, jnp.float32)
        for _, cols, cols_valid in _padded_blocks(features, block):
            best = _smallest_update(best, rows, cols, cols_valid, k=k)
        count = min(block, n - start)
        radii[start : start + count] = np.asarray(best[:count, k])
    return radii


def precision_recall(
    real_features: ArrayLike,
    fake_features: ArrayLike,
    k: int = 3,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    real_radii: ArrayLike | None = None,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of generated vs real features.

    precision = mean over generated f of [∃ real r: ‖f - r‖² <= radius_r²],
    recall = mean over real r of [∃ generated f: ‖r - f‖² <= radius_f²],
    with radii from `knn_radii` of each set (k = 3 and the 2,048 pool3 features in ADM).

    Squared distances are float32 (‖u‖² - 2 u·v + ‖v‖² at HIGHEST matmul precision, clamped at
    0; its rounding error is about 1e-7 · (‖u‖² + ‖v‖²)), where ADM's evaluator computes them
    in float16 and falls back to float32 only when float16 overflows: comparisons that float16
    rounding would flip are decided here at float32 accuracy, so figures may differ from ADM's
    in the last digits. Blocks of `block_size` x `block_size` (100 MB at the default) bound the
    memory, so 50k x 50k needs no more than a few hundred MB besides the features; every block
    function is jitted once (the last blocks are zero-padded and masked).

    Args:
        real_features: [N_r, D] features of the reference set.
        fake_features: [N_f, D] features of the generated set.
        k: neighbourhood size (ADM: 3).
        block_size: rows and columns per block of distances.
        real_radii: `knn_radii(real_features, k)` if already computed (e.g. cached with the
            reference statistics); computed otherwise.

    Returns:
        (precision, recall), floats in [0, 1].

    Raises:
        ValueError: features of different widths, or too few vectors for k.
    """
    real = _check_features("real_features", real_features)
    fake = _check_features("fake_features", fake_features, real.shape[1])
    if real_radii is None:
        real_radii = knn_radii(real, k, block_size=block_size)
    real_radii = np.asarray(real_radii, np.float32)
    if real_radii.shape != (real.shape[0],):
        raise ValueError(f"real_radii must be [{real.shape[0]}], got shape {real_radii.shape}.")
    fake_radii = knn_radii(fake, k, block_size=block_size)
    block = min(block_size, max(real.shape[0], fake.shape[0]))
    real_in = np.zeros(real.shape[0], bool)
    fake_in = np.zeros(fake.shape[0], bool)
    for r_start, r_rows, r_valid in _padded_blocks(real, block):
        r_radii = _padded_slice(real_radii, r_start, block)
        r_count = int(r_valid.sum())
        for f_start, f_rows, f_valid in _padded_blocks(fake, block):
            f_radii = _padded_slice(fake_radii, f_start, block)
            f_count = int(f_valid.sum())
            a_in, b_in = _inside_block(r_rows, r_radii, r_valid, f_rows, f_radii, f_valid)
            real_in[r_start : r_start + r_count] |= np.asarray(a_in[:r_count])
            fake_in[f_start : f_start + f_count] |= np.asarray(b_in[:f_count])
    return float(fake_in.mean()), float(real_in.mean())
