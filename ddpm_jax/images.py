"""Images out of a model: uint8 quantisation, grids a person can look at, PNG files.

Imports nothing from the package but `files` (atomic writes).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from ddpm_jax.files import atomic_writer

# Grids of small images are enlarged (nearest neighbour, by an integer factor) to at least
# this many pixels across, so that 16×16 digits are visible; larger grids are left as they are.
MIN_GRID_WIDTH = 512


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Images in [-1, 1] (float, [N, H, W, C]) to uint8 [N, H, W, C], rounding to the grid."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(
        np.uint8
    )


def image_grid(
    images: np.ndarray,
    columns: int | None = None,
    pad: int = 2,
    *,
    min_width: int = MIN_GRID_WIDTH,
) -> np.ndarray:
    """Tiles uint8 images [N, H, W, C] into one uint8 image [rows·(H'+pad)+pad, …, C].

    Each image is first enlarged by the smallest integer factor k (nearest neighbour, H' = kH)
    that makes the grid at least `min_width` pixels wide (k = 1 for grids already that wide),
    so that every pixel of a small image stays a visible square; the padding is not scaled.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"image_grid needs uint8 [N, H, W, C], got {images.dtype} {images.shape}.")
    n, h, w, c = images.shape
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / columns)
    scale = max(1, math.ceil((min_width - (columns + 1) * pad) / (columns * w)))
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = img
    return grid


def save_png(path: str, image: np.ndarray) -> None:
    """Writes a uint8 [H, W, C] image (C = 1 or 3) as PNG, atomically."""
    img = image[..., 0] if image.shape[-1] == 1 else image
    with atomic_writer(path, "wb") as f:
        Image.fromarray(img).save(f, format="PNG")
