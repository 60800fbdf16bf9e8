"""`digits`: scikit-learn's handwritten digits as a TFDS dataset, built offline.

The 1,797 8×8 images ship inside scikit-learn (UCI "optdigits" test set, 17 grey levels),
so the dataset builds with no network in about a second. Each image is scaled to 0..255
and stored as a PNG-encoded uint8 [S, S, 1] `image` with a 10-class `label`, in ArrayRecord
files that `tfds.data_source` reads with random access and no TensorFlow. Two builder
configs give the size S:

- `digits/16` (default): bicubically upsampled 8×8 → 16×16, smooth strokes rather than
  blocks; the size of recognisable samples from a small U-Net in minutes on a CPU.
- `digits/8`: the native 8×8 pixels, for tests and smoke runs.

`train` holds the first 1,500 images in scikit-learn's order and `test` the last 297 (TFDS
stores each split in a fixed order of its own, hashed from the example keys).
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Iterator
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from ddpm_jax.errors import ConfigError

NAME = "digits"
IMAGE_SIZES = (8, 16)
DEFAULT_IMAGE_SIZE = 16
NUM_CLASSES = 10
NUM_TRAIN = 1_500
NUM_TEST = 297
_SOURCE_SIZE = 8
_SOURCE_MAX = 16.0  # scikit-learn's digits take the values 0..16.


def to_uint8_image(pixels: np.ndarray, image_size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
    """Converts one scikit-learn digit to the stored image.

    Args:
      pixels: float array [8, 8] with values in [0, 16].
      image_size: 8 (native) or 16 (bicubic upsampling).

    Returns:
      uint8 array [image_size, image_size, 1]: round(pixels · 255/16), resampled if needed
      (PIL resamples uint8 in fixed point and clips the bicubic overshoot to 0..255).
    """
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"image_size must be one of {IMAGE_SIZES}, got {image_size}.")
    pixels = np.asarray(pixels, dtype=np.float64)
    if pixels.shape != (_SOURCE_SIZE, _SOURCE_SIZE):
        raise ValueError(f"pixels must have shape (8, 8), got {pixels.shape}.")
    image = np.round(np.clip(pixels, 0.0, _SOURCE_MAX) * (255.0 / _SOURCE_MAX)).astype(np.uint8)
    if image_size != _SOURCE_SIZE:
        resized = Image.fromarray(image).resize((image_size,) * 2, Image.Resampling.BICUBIC)
        image = np.asarray(resized, dtype=np.uint8)
    return image[:, :, None]


def _png(image: np.ndarray) -> bytes:
    # tfds' own numpy → PNG encoder needs TensorFlow; PIL writes the same PNG bytes.
    buffer = io.BytesIO()
    Image.fromarray(image[:, :, 0]).save(buffer, format="png")
    return buffer.getvalue()


@dataclasses.dataclass(eq=False)
class DigitsConfig(tfds.core.BuilderConfig):
    """A `digits` variant; `image_size` is the stored height = width."""

    image_size: int = DEFAULT_IMAGE_SIZE


class Digits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS builder of the embedded digits dataset (see the module docstring).

    Registration in TFDS' global registry is skipped: `ddpm_jax.data.sources` maps the
    name "digits" to `prepare` explicitly, and once prepared the dataset also opens by name
    from its data_dir (`tfds.data_source("digits/16", data_dir=...)`).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "scikit-learn digits at 8×8 and bicubic 16×16; 1,500/297 split."
    }
    BUILDER_CONFIGS: ClassVar[list[DigitsConfig]] = [
        DigitsConfig(name=str(size), image_size=size, description=f"{size}×{size} pixels.")
        for size in IMAGE_SIZES
    ]
    DEFAULT_BUILDER_CONFIG_NAME = str(DEFAULT_IMAGE_SIZE)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds 4.9.10 resolves this through the `importlib_resources` backport, which it
        # only installs on Python < 3.9; this module's own file is the same answer.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(
                        shape=(size, size, 1), dtype=np.uint8, encoding_format="png"
                    ),
                    "label": tfds.features.ClassLabel(names=[str(i) for i in range(NUM_CLASSES)]),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80",
            citation=(
                "@misc{optdigits, author={Alpaydin, E. and Kaynak, C.}, year={1998},"
                " title={Optical Recognition of Handwritten Digits},"
                " howpublished={UCI Machine Learning Repository}}"
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the data ships with scikit-learn.
        from sklearn.datasets import load_digits  # Imported here: slow, and only to build.

        data = load_digits()
        images, labels = data.images, data.target
        if len(images) != NUM_TRAIN + NUM_TEST:
            raise RuntimeError(
                f"scikit-learn's digits have {len(images)} images, expected "
                f"{NUM_TRAIN + NUM_TEST}; this scikit-learn version is not supported."
            )
        return {
            "train": self._generate_examples(images[:NUM_TRAIN], labels[:NUM_TRAIN], 0),
            "test": self._generate_examples(images[NUM_TRAIN:], labels[NUM_TRAIN:], NUM_TRAIN),
        }

    def _generate_examples(
        self, images: np.ndarray, labels: np.ndarray, offset: int
    ) -> Iterator[tuple[int, dict]]:
        size = self.builder_config.image_size
        for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
            yield offset + i, {"image": _png(to_uint8_image(pixels, size)), "label": int(label)}


def prepare(
    data_dir: str | os.PathLike | None = None, image_size: int = DEFAULT_IMAGE_SIZE
) -> Digits:
    """Returns the digits builder of one size, building its ArrayRecord files if needed.

    Idempotent and quick: an existing build is reused as is (milliseconds); a fresh build
    takes about a second. When several processes share `data_dir` and race to build, each
    writes to a private temporary folder and only the first rename wins; the others then
    read the winner's files.

    Args:
      data_dir: TFDS data directory; None means TFDS' default (`$TFDS_DATA_DIR` or
        `~/tensorflow_datasets`).
      image_size: 8 or 16 (config.data.image_size).

    Raises:
      ValueError: for another image size, naming config.data.image_size.
    """
    if image_size not in IMAGE_SIZES:
        raise ConfigError(
            f"config.data.image_size={image_size} is not available for the embedded "
            f"{NAME!r} dataset; set config.data.image_size to one of {IMAGE_SIZES}."
        )

    def builder() -> Digits:
        return Digits(config=str(image_size), data_dir=data_dir, file_format="array_record")

    existing = builder()
    if existing.is_prepared():
        return existing
    # TFDS' build shows progress bars that rewrite a line of a log file hundreds of times.
    shown = tfds.core.utils.tqdm_utils._active
    tfds.display_progress_bar(False)
    try:
        existing.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(try_download_gcs=False),
        )
    except OSError:
        if not builder().is_prepared():  # else another process renamed its build in first.
            raise
    finally:
        tfds.display_progress_bar(shown)
    # A fresh builder reads the split sizes from the dataset_info.json now on disk.
    return builder()
