"""`config.data` → a checked, random-access data source of one split.

`open_split` dispatches on `config.data.source`:

- "tfds" (the default): the name "digits" selects the embedded offline dataset
  (`ddpm_jax.data.digits`), built into the TFDS data_dir on first use; any other name is a
  TFDS catalog dataset that must already be prepared there in ArrayRecord format (no
  TensorFlow): it is never downloaded here, and a missing one fails at once with the
  command that prepares it.
- "folder" (`ddpm_jax.data.folder`): the image files under `config.data.path`.
- "huggingface" (`ddpm_jax.data.huggingface`): a saved or cached `datasets` dataset.
- "arrayrecord" (`ddpm_jax.data.arrayrecord`): what `ddpm-jax-data prepare` wrote.

Every source gives the same thing, index → {"image": uint8 [S, S, C], "label": int}, and
goes through the same checks; the Grain pipeline (`ddpm_jax.data.pipeline`) cannot tell
them apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from ddpm_jax.data import arrayrecord, digits, folder, huggingface
from ddpm_jax.data.config import DataConfig, DatasetInfo, OpenedSplit
from ddpm_jax.errors import DataError, DataNotFoundError

# Embedded name → prepare(data_dir, image_size) → a prepared TFDS builder.
EMBEDDED = {digits.NAME: digits.prepare}
# config.data.source → open(data, split, field) → OpenedSplit, for the sources besides TFDS.
OPENERS = {
    "folder": folder.open_folder,
    "huggingface": huggingface.open_huggingface,
    "arrayrecord": arrayrecord.open_arrayrecord,
}


def get_dataset_info(
    config: Any,
    split: str | None = None,
    *,
    num_classes: int | None = None,
    global_batch_size: int | None = None,
) -> DatasetInfo:
    """Opens a split, checks `config` against the data and describes it.

    Builds the embedded "digits" dataset on first use (about a second); never downloads.
    A folder is listed and every file's header read (see `ddpm_jax.data.folder`).

    Args:
      config: a `DataConfig`, or an experiment config (its `data` group).
      split: the split to describe; defaults to `config.data.split`.
      num_classes: classes the model is conditioned on (0: unconditional), checked against
        the labels; None: `config.model.num_classes` of an experiment config, else 0.
      global_batch_size: the training batch over all processes: a split of the folder,
        Hugging Face or ArrayRecord sources with fewer examples is refused. None: no check.

    Raises:
      ValueError: naming the config field and its fix, for an unknown dataset or split, an
        image size / channel count that does not match the data, a `config.model.
        num_classes` that does not match the labels, an empty split, unreadable image
        files, a dataset without `config.data.image_key`, or fewer examples than a batch.
      FileNotFoundError: a catalog dataset not prepared in data_dir (within a second,
        with the command that prepares it), a `config.data.path` that does not exist.
    """
    _, info = open_split(
        config, split, num_classes=num_classes, global_batch_size=global_batch_size
    )
    return info


def data_and_classes(config: Any, num_classes: int | None) -> tuple[DataConfig, int]:
    """(`DataConfig`, num_classes) from a `DataConfig` or an experiment config."""
    if num_classes is None:
        num_classes = int(getattr(getattr(config, "model", None), "num_classes", 0) or 0)
    return DataConfig.from_config(config), num_classes


def open_split(
    config: Any,
    split: str | None = None,
    *,
    num_classes: int | None = None,
    global_batch_size: int | None = None,
) -> tuple[Sequence[Mapping], DatasetInfo]:
    """Returns the random-access data source of a split and its checked `DatasetInfo`.

    The source maps an index in [0, num_examples) to a dict with `image` (uint8
    [H, W, C]) and, when the dataset has labels, `label`. Arguments and errors are those of
    `get_dataset_info`.
    """
    data, wanted = data_and_classes(config, num_classes)
    if split is None:
        split = data.split
    # The split to train on is config.data.split; any other is the evaluation's.
    field = "config.data.split" if split == data.split else "config.eval.split"
    if data.source != "tfds":
        opened = OPENERS[data.source](data, split, field)
        return opened.source, _check_opened(data, split, field, opened, wanted, global_batch_size)
    source = _data_source(data, split, field)
    info = _check_features(data, split, source.dataset_info.features, len(source))
    if wanted and wanted != info.num_classes:
        raise DataError(
            f"config.model.num_classes={wanted} but dataset {data.name!r} has "
            f"{info.num_classes} label classes; set config.model.num_classes="
            f"{info.num_classes} (or 0 for an unconditional model)."
        )
    return source, info


def _check_opened(
    data: DataConfig,
    split: str,
    field: str,
    opened: OpenedSplit,
    wanted: int,
    global_batch_size: int | None,
) -> DatasetInfo:
    """The `DatasetInfo` of a split of the non-TFDS sources, after the common checks."""
    n = len(opened.source)
    if n == 0:
        hint = (
            "; set config.data.eval_fraction > 0 to hold out part of the files as 'test'"
            if split == "test" and not data.eval_fraction and data.source != "arrayrecord"
            else ""
        )
        raise DataError(f"{field}={split!r} of {opened.name} is empty{hint}.")
    if wanted and wanted != opened.num_classes:
        fix = (
            f"set config.model.num_classes={opened.num_classes} (or 0 for an unconditional model)"
            if opened.num_classes
            else "set config.model.num_classes=0 for an unconditional model"
        )
        raise DataError(
            f"config.model.num_classes={wanted} but {opened.name} has {opened.num_classes} "
            f"label classes{opened.label_note}; {fix}."
        )
    if global_batch_size is not None and n < global_batch_size:
        raise DataError(
            f"{field}={split!r} of {opened.name} has {n} images, fewer than one global batch "
            f"(config.training.batch_size={global_batch_size}); add images or lower the batch "
            "size."
        )
    return DatasetInfo(opened.name, split, n, data.image_size, data.channels, opened.num_classes)


def _data_source(data: DataConfig, split: str, field: str) -> Sequence[Mapping]:
    if data.name in EMBEDDED:
        builder = EMBEDDED[data.name](data.data_dir, data.image_size)
        try:
            return builder.as_data_source(split=split)
        except ValueError as e:
            raise DataError(f"{field}={split!r} is not a split of {data.name!r}: {e}") from e
    try:
        # download=False: a missing dataset fails here at once instead of downloading.
        return tfds.data_source(data.name, split=split, data_dir=data.data_dir, download=False)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataError(
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
        return DataNotFoundError(
            f"TFDS dataset {data.name!r} (config.data.name) is not prepared in {builder.data_dir}"
            " and is never downloaded during training; prepare it once, on a machine with"
            " network access and TensorFlow: `pip install tensorflow && tfds build"
            f" {data.name} --file_format=array_record{where}`, or set config.data.name='digits'"
            " for the embedded offline dataset."
        )
    formats = [f.value for f in builder.info.available_file_formats()]
    if "array_record" not in formats:
        return DataNotFoundError(
            f"TFDS dataset {data.name!r} is prepared in {builder.data_dir} as {formats}, but "
            "random access needs ArrayRecord; convert it (needs TensorFlow): `tfds"
            f" convert_format --dataset_version_dir={builder.data_dir}"
            " --out_file_format=array_record`."
        )
    if split not in builder.info.splits:
        return DataError(
            f"{field}={split!r} is not a split of {data.name!r}; available: "
            f"{sorted(builder.info.splits)}."
        )
    return DataError(f"could not open split {split!r} of TFDS dataset {data.name!r}.")


def _check_features(data: DataConfig, split: str, features: Any, n: int) -> DatasetInfo:
    if "image" not in features or not isinstance(features["image"], tfds.features.Image):
        raise DataError(
            f"dataset {data.name!r} has no 'image' feature of type tfds.features.Image; "
            "config.data.name must name an image dataset."
        )
    image = features["image"]
    height, width, channels = image.shape
    if np.dtype(image.np_dtype) != np.uint8:
        raise DataError(f"dataset {data.name!r} stores {image.np_dtype} images; only uint8.")
    if channels != data.channels:
        raise DataError(
            f"config.data.channels={data.channels} but {data.name!r} images have {channels} "
            f"channel(s); set config.data.channels={channels}."
        )
    # Datasets of varying image size are centre-cropped and resized; fixed sizes must match.
    if height is not None and width is not None and (height, width) != (data.image_size,) * 2:
        raise DataError(
            f"config.data.image_size={data.image_size} but {data.name!r} images are "
            f"{height}×{width}; set config.data.image_size={height}"
            + ("." if height == width else " (or pick a dataset with square images).")
        )
    label = features["label"] if "label" in features else None
    num_classes = label.num_classes if isinstance(label, tfds.features.ClassLabel) else 0
    if n == 0:
        raise DataError(f"split {split!r} of {data.name!r} is empty; choose another split.")
    return DatasetInfo(data.name, split, n, data.image_size, data.channels, num_classes)
