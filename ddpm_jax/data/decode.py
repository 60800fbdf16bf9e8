"""Image decoding shared by the sources: Pillow image or bytes → uint8 [S, S, C].

Every source that decodes files (`folder`, `huggingface`, `prepare`) goes through
`to_array`, so a folder read directly and the ArrayRecord files `prepare` writes from it hold
the same pixels. The geometry is that of the TFDS path (`pipeline._ToModelInput`): the
central square, resized with Pillow's antialiased bicubic filter.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image

# Files a folder source reads (compared lower-case); every other file is ignored and counted.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# config.data.channels → the Pillow mode images are converted to (alpha is dropped for 1, 3).
MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
# What Pillow raises for a file it cannot identify or decode (truncated, not an image, ...).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, C] → uint8 [size, size, C]: central square, antialiased bicubic resize."""
    h, w, c = image.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    square = image[top : top + s, left : left + s]
    pil = Image.fromarray(square[:, :, 0] if c == 1 else square)
    out = np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None))
    return out.reshape(size, size, c)


def to_array(image: Image.Image, size: int, channels: int) -> np.ndarray:
    """A Pillow image as the model's input image.

    Converts to the mode of `channels` (palette images through RGBA, so that transparency
    is handled by Pillow and not warned about), crops the central square and resizes it to
    `size` × `size` with the antialiased bicubic filter (no resize if it already has that
    size). A JPEG is decoded at the smallest DCT scale that keeps both sides ≥ 2·size
    (`Image.draft`), which is exact for sizes that need no resize and keeps decoding fast
    when a large photo becomes a small training image.

    Args:
      image: an opened (not necessarily loaded) Pillow image.
      size: output height = width, in pixels.
      channels: 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA).

    Returns:
      uint8 array [size, size, channels].
    """
    mode = MODES[channels]
    if image.format == "JPEG" and min(image.size) > 2 * size:
        image.draft(None, (2 * size, 2 * size))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # palette transparency notes
        if image.mode == "P":
            image = image.convert("RGBA")
        if image.mode != mode:
            image = image.convert(mode)
    w, h = image.size
    if (w, h) != (size, size):
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        square = image.crop((left, top, left + s, top + s))
        image = square.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None)
    return np.asarray(image, dtype=np.uint8).reshape(size, size, channels)


def decode(data: bytes | str | os.PathLike, size: int, channels: int) -> np.ndarray:
    """Encoded image bytes, or a file path, → uint8 [size, size, channels] (see `to_array`).

    Raises:
      One of `DECODE_ERRORS` for data Pillow cannot decode.
    """
    stream = io.BytesIO(data) if isinstance(data, bytes | bytearray | memoryview) else data
    with Image.open(stream) as image:
        return to_array(image, size, channels)


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [H, W, C] → PNG bytes (lossless; `decode` gives the same array back)."""
    buffer = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buffer, format="png")
    return buffer.getvalue()
