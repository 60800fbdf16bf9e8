"""`config.data.source = "huggingface"`: a Hugging Face `datasets` dataset, read in place.

    source, name, num_classes = open_huggingface(data, "train", "config.data.split")

`config.data.path` is either a directory written by `Dataset.save_to_disk` or
`DatasetDict.save_to_disk`, or `hf://NAME` for a Hub dataset already in the `datasets` cache
(`config.data.data_dir`, else `$HF_DATASETS_CACHE`): it is never downloaded here, and one
that is not cached fails at once with the command that fetches it on a machine with network.

Rows are read with random access from the dataset's memory-mapped Arrow table (a pickled
source holds only the file paths, so Grain worker processes map the same files). The images
of `config.data.image_key` (an `Image` feature: encoded bytes or a file path; or anything
`datasets` formats as a Pillow image or a uint8 array) are decoded, converted and resized
like the folder source's (`images.to_array`). Labels come from `config.data.label_key`: a
`ClassLabel` or an integer column; a missing or non-integer column (or negative labels,
which mark unlabelled rows) gives an unlabelled dataset.

Splits: a `DatasetDict` has its own (`config.data.split` names one of them); a single
`Dataset` has "train" and "test", the `config.data.eval_fraction` of its rows held out by a
hash of the row index (`ddpm_jax.data.splits`).

The `datasets` package is imported only here, only for this source
(`pip install 'ddpm_jax[hf]'`).
"""

from __future__ import annotations

import contextlib
import importlib
import os
from typing import Any

import numpy as np
from PIL import Image

from ddpm_jax.data import decode, splits
from ddpm_jax.data.config import DataConfig, OpenedSplit
from ddpm_jax.errors import DataError, DataNotFoundError

HUB_PREFIX = "hf://"


def _import_datasets():
    try:
        return importlib.import_module("datasets")
    except ImportError as e:
        raise DataError(
            "config.data.source='huggingface' needs the `datasets` package, which is not "
            "installed: pip install 'ddpm_jax[hf]' (or pip install datasets)."
        ) from e


class HuggingFaceSource:
    """Random access to the decoded images (and labels) of some rows of a `datasets.Dataset`.

    Picklable: the dataset pickles as the paths of its memory-mapped Arrow files, and the
    column it reads from is looked up again after unpickling.

    Args:
      dataset: the `datasets.Dataset`.
      rows: int64 [n] the dataset rows this source serves, in order.
      labels: int32 [n] their labels, or None when unlabelled.
      image_key: the image column.
      image_size: output height = width, in pixels.
      channels: output channels (`images.MODES`).
    """

    def __init__(self, dataset: Any, rows: np.ndarray, labels: np.ndarray | None,
                 image_key: str, image_size: int, channels: int):  # fmt: skip
        self.dataset = dataset
        self.rows = np.asarray(rows, np.int64)
        self.labels = labels
        self.image_key = image_key
        self.image_size = image_size
        self.channels = channels
        indices = getattr(dataset, "_indices", None)  # a select()ed, unflattened dataset
        if indices is not None:
            self.rows = np.asarray(indices.column(0).to_numpy(), np.int64)[self.rows]
        # `dataset.features` deep-copies the features on every access: look once.
        self._image_feature = isinstance(dataset.features[image_key], _import_datasets().Image)
        self._column = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_column": None}

    def __len__(self) -> int:
        return len(self.rows)

    def _encoded(self, row: int) -> Any:
        """The stored value: an Image feature's {bytes, path} straight from Arrow."""
        if self._column is None:
            self._column = self.dataset.data.column(self.image_key)
        return self._column[row].as_py()

    def __getitem__(self, index: int) -> dict:
        """Example `index`: `image` uint8 [S, S, C] and, when labelled, `label` int."""
        index = int(index)
        row = int(self.rows[index])
        try:
            image = self._image(row)
        except decode.DECODE_ERRORS as e:
            raise DataError(
                f"row {row} of the Hugging Face dataset (column {self.image_key!r}) is not an "
                f"image that can be decoded: {e}"
            ) from e
        if self.labels is None:
            return {"image": image}
        return {"image": image, "label": int(self.labels[index])}

    def _image(self, row: int) -> np.ndarray:
        if self._image_feature:
            value = self._encoded(row)
            if value is not None and (value.get("bytes") or value.get("path")):
                return decode.decode(value["bytes"] or value["path"], self.image_size,
                                     self.channels)  # fmt: skip
        value = self.dataset[row][self.image_key]  # formatted by datasets: PIL or array
        if value is None:
            raise ValueError("the value is empty")
        if not hasattr(value, "convert"):  # not a Pillow image: an array
            array = np.asarray(value)
            if array.dtype != np.uint8 or array.ndim not in (2, 3):
                raise ValueError(f"it holds {array.dtype} {array.shape}, not uint8 [H, W(, C)]")
            value = Image.fromarray(array[:, :, 0] if array.shape[2:] == (1,) else array)
        return decode.to_array(value, self.image_size, self.channels)


@contextlib.contextmanager
def _offline(datasets: Any):
    """Makes `datasets` and `huggingface_hub` resolve names from the cache, never the Hub."""
    import huggingface_hub.constants as hub_constants

    # datasets < 2.19 reads HF_DATASETS_OFFLINE, later versions HF_HUB_OFFLINE.
    flags = [(datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
             (hub_constants, "HF_HUB_OFFLINE")]  # fmt: skip
    flags = [(module, name) for module, name in flags if hasattr(module, name)]
    saved = [getattr(module, name) for module, name in flags]
    for module, name in flags:
        setattr(module, name, True)
    try:
        yield
    finally:
        for (module, name), value in zip(flags, saved, strict=True):
            setattr(module, name, value)


def load(data: DataConfig) -> Any:
    """The `datasets.Dataset` or `DatasetDict` that `data.path` names (see the module doc).

    Raises:
      FileNotFoundError: the directory does not exist, or the Hub dataset is not cached.
      ValueError: a directory that `save_to_disk` did not write; `datasets` not installed.
    """
    datasets = _import_datasets()
    path = data.path
    if path.startswith(HUB_PREFIX):
        name = path[len(HUB_PREFIX) :].removeprefix("datasets/").strip("/")
        if not name:
            raise DataError(f"config.data.path={path!r} names no dataset; write hf://OWNER/NAME.")
        cache = f", cache_dir={data.data_dir!r}" if data.data_dir else ""
        try:
            with _offline(datasets):
                return datasets.load_dataset(name, cache_dir=data.data_dir)
        except Exception as e:
            where = data.data_dir or datasets.config.HF_DATASETS_CACHE
            raise DataNotFoundError(
                f"Hugging Face dataset {name!r} (config.data.path={path!r}) is not in the "
                f"datasets cache {where} ({type(e).__name__}), and nothing is downloaded "
                'during training. On a machine with network access run `python -c "import '
                f"datasets; datasets.load_dataset('{name}'{cache}).save_to_disk('DIR')\"`, copy "
                "DIR here and set config.data.path=DIR."
            ) from e
    if not os.path.exists(path):
        raise DataNotFoundError(
            f"config.data.path={path!r} does not exist; config.data.source='huggingface' reads "
            "a directory written by datasets' save_to_disk, or hf://OWNER/NAME for a dataset "
            "in the datasets cache."
        )
    markers = ("dataset_dict.json", "state.json")
    if not os.path.isdir(path) or not any(os.path.exists(os.path.join(path, m)) for m in markers):
        raise DataError(
            f"config.data.path={path!r} is not a directory written by datasets' save_to_disk "
            "(it has no dataset_dict.json or state.json); write one with "
            "`dataset.save_to_disk(DIR)`, or use config.data.source='folder' for image files."
        )
    return datasets.load_from_disk(path)


def _dataset_of_split(data: DataConfig, loaded: Any, split: str, field: str):
    """(datasets.Dataset, rows int64) of `split`."""
    if hasattr(loaded, "keys"):  # a DatasetDict
        names = sorted(loaded.keys())
        if split not in loaded:
            raise DataError(f"{field}={split!r} is not a split of the Hugging Face dataset "
                            f"{data.path}; its splits are {names}.")  # fmt: skip
        if data.eval_fraction:
            raise DataError(
                f"config.data.eval_fraction={data.eval_fraction} holds out part of a single "
                f"dataset, but {data.path} has its own splits {names}; set "
                "config.data.eval_fraction=0 and config.data.split / config.eval.split to them."
            )
        dataset = loaded[split]
        return dataset, np.arange(len(dataset), dtype=np.int64)
    keys = [str(i) for i in range(len(loaded))]
    return loaded, splits.select(keys, split, data.eval_fraction, field)


def _labels(
    data: DataConfig, dataset: Any, rows: np.ndarray, every_split: list[Any]
) -> tuple[np.ndarray | None, int, str, tuple[str, ...]]:
    """(int32 labels of `rows` or None, num_classes, a note on why there are none, names).

    An integer column has max + 1 classes, the maximum taken over every split so that all
    splits agree.
    """
    datasets = _import_datasets()
    key = data.label_key
    if key is None:
        return None, 0, " (config.data.label_key is None)", ()
    if key not in dataset.column_names:
        note = (f" (it has no column {key!r} (config.data.label_key); its columns are "
                f"{dataset.column_names})")  # fmt: skip
        return None, 0, note, ()
    feature = dataset.features[key]
    dtype = getattr(feature, "dtype", "")
    if not isinstance(feature, datasets.ClassLabel) and not str(dtype).startswith(("int", "uint")):
        what = dtype or type(feature).__name__
        return None, 0, f" (column {key!r} holds {what}, not class indices)", ()
    column = [np.asarray(d.data.column(key).to_numpy(zero_copy_only=False)) for d in every_split]
    if any(len(c) and c.min() < 0 for c in column):
        return None, 0, f" (column {key!r} holds negative labels: unlabelled rows)", ()
    labels = np.asarray(dataset.data.column(key).to_numpy(zero_copy_only=False))[rows]
    if isinstance(feature, datasets.ClassLabel):
        return labels.astype(np.int32), int(feature.num_classes), "", tuple(feature.names)
    num_classes = max((int(c.max()) + 1 for c in column if len(c)), default=0)
    return labels.astype(np.int32), num_classes, "", ()


def open_huggingface(data: DataConfig, split: str, field: str) -> OpenedSplit:
    """Opens split `split` of the Hugging Face dataset `data.path`.

    Raises:
      FileNotFoundError: a path that does not exist, a Hub dataset that is not cached.
      ValueError: not a saved dataset, an unknown split, no `data.image_key` column (the
        message lists the columns), a first image that does not decode.
    """
    loaded = load(data)
    dataset, rows = _dataset_of_split(data, loaded, split, field)
    if data.image_key not in dataset.column_names:
        raise DataError(
            f"the Hugging Face dataset {data.path} has no column {data.image_key!r} "
            f"(config.data.image_key); its columns are {dataset.column_names}: set "
            "config.data.image_key to the one holding the images."
        )
    every_split = list(loaded.values()) if hasattr(loaded, "keys") else [loaded]
    labels, num_classes, note, names = _labels(data, dataset, rows, every_split)
    source = HuggingFaceSource(
        dataset, rows, labels, data.image_key, data.image_size, data.channels
    )
    if len(source):
        source[0]  # fails now, naming the column, if it holds no images
    return OpenedSplit(source, f"huggingface:{data.path}", num_classes, note, names)


def split_names(data: DataConfig) -> list[str]:
    """The splits of `data.path`: a DatasetDict's own, else "train" (and "test")."""
    loaded = load(data)
    if hasattr(loaded, "keys"):
        return sorted(loaded.keys())
    return list(splits.SPLITS) if data.eval_fraction else ["train"]
