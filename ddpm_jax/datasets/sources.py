"""`config.data` → a checked, random-access TFDS data source (ArrayRecord, no TensorFlow).

The name "digits" selects the embedded offline dataset (`ddpm_jax.datasets.digits`), built
into the TFDS data_dir on first use; any other name is a TFDS catalog dataset that must
already be prepared there in ArrayRecord format: it is never downloaded here, and a missing
one fails at once with the command that prepares it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from ddpm_jax.datasets import digits

# Embedded name → prepare(data_dir, image_size) → a prepared TFDS builder.
EMBEDDED = {digits.NAME: digits.prepare}


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The `config.data` group, typed and checked (see configs/default.py).

    Attributes:
      name: "digits" (embedded, offline) or a TFDS catalog name, e.g. "cifar10".
      split: TFDS split to train on, e.g. "train" or "train[:90%]".
      eval_split: TFDS split to evaluate on.
      image_size: height = width of the images fed to the model, in pixels.
      channels: image channels (1 grey, 3 RGB).
      random_flip: flip training images horizontally with probability 1/2.
      data_dir: TFDS data_dir; None means TFDS' default (`$TFDS_DATA_DIR` or
        `~/tensorflow_datasets`).
      num_workers: Grain worker processes for training batches (0: threads in this process).
    """

    name: str
    split: str = "train"
    eval_split: str = "test"
    image_size: int = 32
    channels: int = 3
    random_flip: bool = False
    data_dir: str | None = None
    num_workers: int = 0

    def __post_init__(self):
        for field in ("name", "split", "eval_split"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value:
                raise ValueError(f"config.data.{field} must be a non-empty string, got {value!r}.")
        for field, low in (("image_size", 1), ("channels", 1), ("num_workers", 0)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"config.data.{field} must be an integer ≥ {low}, got {value!r}.")
        if not isinstance(self.random_flip, bool):
            raise ValueError(f"config.data.random_flip must be a bool, got {self.random_flip!r}.")
        if self.data_dir is not None and not isinstance(self.data_dir, str):
            raise ValueError(f"config.data.data_dir must be a path or None, got {self.data_dir!r}.")

    @classmethod
    def from_config(cls, config: Any) -> DataConfig:
        """Reads `config.data` from an experiment config (or accepts a DataConfig)."""
        if isinstance(config, DataConfig):
            return config
        data = config.data
        data = dict(data.to_dict() if hasattr(data, "to_dict") else data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"config.data has unknown field(s) {unknown}; known fields: {sorted(known)}."
            )
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the rest of the library needs to know about one split.

    Attributes:
      name: the dataset name (`config.data.name`).
      split: the split these numbers describe.
      num_examples: examples in the split.
      image_size: height = width of the images after the pipeline, in pixels.
      channels: image channels.
      num_classes: classes of the `label` feature; 0 if the dataset has none.
    """

    name: str
    split: str
    num_examples: int
    image_size: int
    channels: int
    num_classes: int


def get_dataset_info(config: Any, split: str | None = None) -> DatasetInfo:
    """Opens a split, checks `config` against the data and describes it.

    Builds the embedded "digits" dataset on first use (about a second); never downloads.

    Args:
      config: the experiment config (its `data` group) or a `DataConfig`.
      split: the split to describe; defaults to `config.data.split`.

    Raises:
      ValueError: naming the config field and its fix, for an unknown dataset or split, an
        image size / channel count that does not match the data, or a `config.model.
        num_classes` that does not match the labels.
      FileNotFoundError: a catalog dataset not prepared in data_dir (within a second,
        with the command that prepares it).
    """
    _, info = open_split(config, split)
    return info


def open_split(config: Any, split: str | None = None) -> tuple[Sequence[Mapping], DatasetInfo]:
    """Returns the random-access data source of a split and its checked `DatasetInfo`.

    The source maps an index in [0, num_examples) to a dict with `image` (uint8
    [H, W, C]) and, when the dataset has labels, `label`. Arguments and errors are those of
    `get_dataset_info`.
    """
    data = DataConfig.from_config(config)
    field = "config.data.split"
    if split is None:
        split = data.split
    elif split == data.eval_split:
        field = "config.data.eval_split"
    source = _data_source(data, split, field)
    info = _check_features(data, split, source.dataset_info.features, len(source))
    model = getattr(config, "model", None)
    wanted = getattr(model, "num_classes", 0) or 0
    if wanted and wanted != info.num_classes:
        raise ValueError(
            f"config.model.num_classes={wanted} but dataset {data.name!r} has "
            f"{info.num_classes} label classes; set config.model.num_classes="
            f"{info.num_classes} (or 0 for an unconditional model)."
        )
    return source, info


def _data_source(data: DataConfig, split: str, field: str) -> Sequence[Mapping]:
    if data.name in EMBEDDED:
        builder = EMBEDDED[data.name](data.data_dir, data.image_size)
        try:
            return builder.as_data_source(split=split)
        except ValueError as e:
            raise ValueError(f"{field}={split!r} is not a split of {data.name!r}: {e}") from e
    try:
        # download=False: a missing dataset fails here at once instead of downloading.
        return tfds.data_source(data.name, split=split, data_dir=data.data_dir, download=False)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(
            f"config.data.name={data.name!r} is neither an embedded dataset "
            f"({', '.join(sorted(EMBEDDED))}) nor a TFDS catalog dataset; set "
            "config.data.name to 'digits' (offline) or a name listed by tfds.list_builders()."
        ) from e
    except Exception as e:
        raise _explain_open_failure(data, split, field) from e


def _explain_open_failure(data: DataConfig, split: str, field: str) -> Exception:
    """The most useful error for a catalog dataset that could not be opened."""
    builder = tfds.builder(data.name, data_dir=data.data_dir)
    where = f" --data_dir={data.data_dir}" if data.data_dir else ""
    if not builder.is_prepared():
        return FileNotFoundError(
            f"TFDS dataset {data.name!r} (config.data.name) is not prepared in {builder.data_dir}"
            " and is never downloaded during training. Prepare it once, on a machine with"
            " network access and TensorFlow:\n"
            f"  pip install tensorflow && tfds build {data.name} --file_format=array_record"
            f"{where}\nor set config.data.name='digits' for the embedded offline dataset."
        )
    formats = [f.value for f in builder.info.available_file_formats()]
    if "array_record" not in formats:
        return FileNotFoundError(
            f"TFDS dataset {data.name!r} is prepared in {builder.data_dir} as {formats}, but "
            "random access needs ArrayRecord. Convert it (needs TensorFlow):\n"
            f"  tfds convert_format --dataset_version_dir={builder.data_dir}"
            " --out_file_format=array_record"
        )
    if split not in builder.info.splits:
        return ValueError(
            f"{field}={split!r} is not a split of {data.name!r}; available: "
            f"{sorted(builder.info.splits)}."
        )
    return RuntimeError(f"could not open split {split!r} of TFDS dataset {data.name!r}.")


def _check_features(data: DataConfig, split: str, features: Any, n: int) -> DatasetInfo:
    if "image" not in features or not isinstance(features["image"], tfds.features.Image):
        raise ValueError(
            f"dataset {data.name!r} has no 'image' feature of type tfds.features.Image; "
            "config.data.name must name an image dataset."
        )
    image = features["image"]
    height, width, channels = image.shape
    if np.dtype(image.np_dtype) != np.uint8:
        raise ValueError(f"dataset {data.name!r} stores {image.np_dtype} images; only uint8.")
    if channels != data.channels:
        raise ValueError(
            f"config.data.channels={data.channels} but {data.name!r} images have {channels} "
            f"channel(s); set config.data.channels={channels}."
        )
    # Datasets of varying image size are centre-cropped and resized; fixed sizes must match.
    if height is not None and width is not None and (height, width) != (data.image_size,) * 2:
        raise ValueError(
            f"config.data.image_size={data.image_size} but {data.name!r} images are "
            f"{height}×{width}; set config.data.image_size={height}"
            + ("." if height == width else " (or pick a dataset with square images).")
        )
    label = features["label"] if "label" in features else None
    num_classes = label.num_classes if isinstance(label, tfds.features.ClassLabel) else 0
    if n == 0:
        raise ValueError(f"split {split!r} of {data.name!r} is empty; choose another split.")
    return DatasetInfo(data.name, split, n, data.image_size, data.channels, num_classes)
