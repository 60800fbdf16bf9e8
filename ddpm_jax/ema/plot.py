"""A line plot drawn with PIL alone (matplotlib is not a dependency): the σ_rel sweep's curve."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ddpm_jax import files

WIDTH, HEIGHT = 720, 480
_MARGIN = (80, 30, 30, 60)  # left, right, top, bottom, in pixels
_CURVE, _MARK, _AXIS, _GRID = (31, 90, 180), (200, 40, 40), (0, 0, 0), (225, 225, 225)


def nice_ticks(low: float, high: float, count: int = 6) -> np.ndarray:
    """About `count` round tick values (1, 2 or 5 times a power of ten apart) in [low, high]."""
    if not high > low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(count - 1, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9) * step
    return np.arange(first, high + step * 1e-6, step)


def line_plot(
    path: str,
    x: Sequence[float],
    y: Sequence[float],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    marks: Sequence[tuple[float, float, str]] = (),
) -> str:
    """Writes a PNG of the curve (x, y) with points, and labelled marks (x, y, label) in red.

    Non-finite y values are left out. Returns `path`.
    """
    font = ImageFont.load_default()
    xs, ys = np.asarray(x, np.float64), np.asarray(y, np.float64)
    keep = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = xs[keep], ys[keep]
    all_x = np.concatenate([xs, [m[0] for m in marks if math.isfinite(m[1])]])
    all_y = np.concatenate([ys, [m[1] for m in marks if math.isfinite(m[1])]])
    x_ticks = nice_ticks(float(all_x.min(initial=0.0)), float(all_x.max(initial=1.0)))
    pad = 0.05 * (all_y.max(initial=1.0) - all_y.min(initial=0.0) or 1.0)
    y_ticks = nice_ticks(float(all_y.min(initial=0.0) - pad), float(all_y.max(initial=1.0) + pad))
    x0, x1 = min(x_ticks[0], all_x.min(initial=0.0)), max(x_ticks[-1], all_x.max(initial=1.0))
    y0 = min(y_ticks[0], all_y.min(initial=0.0) - pad)
    y1 = max(y_ticks[-1], all_y.max(initial=1.0) + pad)
    left, right, top, bottom = _MARGIN
    w, h = WIDTH - left - right, HEIGHT - top - bottom

    def px(u: float, v: float) -> tuple[float, float]:
        return left + (u - x0) / (x1 - x0) * w, top + (1 - (v - y0) / (y1 - y0)) * h

    image = Image.new("RGB", (WIDTH, HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for t in x_ticks:
        u, _ = px(t, y0)
        draw.line([(u, top), (u, top + h)], fill=_GRID)
        draw.text((u, top + h + 6), f"{t:g}", fill=_AXIS, font=font, anchor="ma")
    for t in y_ticks:
        _, v = px(x0, t)
        draw.line([(left, v), (left + w, v)], fill=_GRID)
        draw.text((left - 6, v), f"{t:.4g}", fill=_AXIS, font=font, anchor="rm")
    draw.rectangle([left, top, left + w, top + h], outline=_AXIS)
    draw.text((left + w / 2, HEIGHT - 18), xlabel, fill=_AXIS, font=font, anchor="mm")
    draw.text((8, top - 18), ylabel, fill=_AXIS, font=font, anchor="la")
    if title:
        draw.text((left + w / 2, 8), title, fill=_AXIS, font=font, anchor="ma")
    order = np.argsort(xs)
    points = [px(u, v) for u, v in zip(xs[order], ys[order], strict=True)]
    if len(points) > 1:
        draw.line(points, fill=_CURVE, width=2)
    for u, v in points:
        draw.ellipse([u - 3, v - 3, u + 3, v + 3], fill=_CURVE)
    for mx, my, label in marks:
        if not (math.isfinite(mx) and math.isfinite(my)):
            continue
        u, v = px(mx, my)
        draw.polygon([(u, v - 6), (u + 6, v), (u, v + 6), (u - 6, v)], fill=_MARK)
        draw.text((u + 9, v - 14), label, fill=_MARK, font=font, anchor="la")
    with files.atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path
