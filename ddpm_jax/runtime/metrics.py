"""Metrics and images out of a run: JSONL + TensorBoard scalars, PNG sample grids.

Only process 0 writes; every other process gets a writer that does nothing, so callers never
branch on the process index.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping

import numpy as np
from PIL import Image

from ddpm_jax.runtime.workdir import METRICS_FILE, atomic_writer


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Images in [-1, 1] (float, [N, H, W, C]) to uint8 [N, H, W, C], rounding to the grid."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(
        np.uint8
    )


def image_grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """Tiles uint8 images [N, H, W, C] into one uint8 image [rows·(H+pad)+pad, …, C]."""
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"image_grid needs uint8 [N, H, W, C], got {images.dtype} {images.shape}.")
    n, h, w, c = images.shape
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = img
    return grid


def save_png(path: str, image: np.ndarray) -> None:
    """Writes a uint8 [H, W, C] image (C = 1 or 3) as PNG, atomically (tmp file + rename)."""
    img = image[..., 0] if image.shape[-1] == 1 else image
    with atomic_writer(path, "wb") as f:
        Image.fromarray(img).save(f, format="PNG")


def drop_rows_after(path: str, step: int) -> int:
    """Removes the rows of a metrics.jsonl whose step is past `step`; returns how many.

    A run that stopped after its last checkpoint logged steps it will log again on resume;
    their rows go, so that every step appears once. Rows that do not parse are kept.
    """
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if _row_step(line) <= step]
    if len(kept) != len(lines):
        with atomic_writer(path) as f:
            f.writelines(kept)
    return len(lines) - len(kept)


def _row_step(line: str) -> float:
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -math.inf


class MetricWriter:
    """Scalars to `<logdir>/metrics.jsonl` and TensorBoard; images to TensorBoard and PNG.

    Args:
      logdir: directory for the files (created).
      enabled: False on processes other than 0: every method is then a no-op.
    """

    def __init__(self, logdir: str, *, enabled: bool = True):
        self.logdir = logdir
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if enabled:
            os.makedirs(logdir, exist_ok=True)
            from tensorboardX import SummaryWriter  # heavy import: only where it writes.

            self._tb = SummaryWriter(logdir, flush_secs=30)
            self._jsonl = open(os.path.join(logdir, METRICS_FILE), "a")

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "time": time.time()}
        for name, value in scalars.items():
            value = float(value)
            record[name] = value
            self._tb.add_scalar(name, value, int(step))
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def write_images(self, step: int, name: str, images_uint8: np.ndarray) -> str | None:
        """Writes a grid of `images_uint8` [N, H, W, C] as `<logdir>/<name>_<step>.png`."""
        if not self.enabled:
            return None
        grid = image_grid(images_uint8)
        path = os.path.join(self.logdir, f"{name}_{int(step):08d}.png")
        save_png(path, grid)
        self._tb.add_image(name, grid, int(step), dataformats="HWC")
        return path

    def flush(self) -> None:
        if self.enabled:
            self._tb.flush()
            self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()
            self.enabled = False
