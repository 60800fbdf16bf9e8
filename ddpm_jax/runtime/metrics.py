"""Metrics out of a run: JSONL + TensorBoard scalars, PNG sample grids.

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

from ddpm_jax.files import atomic_writer
from ddpm_jax.images import image_grid, save_png
from ddpm_jax.runtime.workdir import METRICS_FILE


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
