"""`config.data.source = "arrayrecord"`: images `prepare` decoded and resized once, on disk.

A prepared directory (`ddpm-jax-data prepare ... --out=DIR`) holds

    info.json                 format, image_size, channels, encoding, classes, splits
    <split>.array_record      one record per example, in the source's order

Each split is one ArrayRecord file written with `group_size:1` (every record its own chunk,
so any record is one read: random access at ArrayRecord speed) and no compression. A record
is an 8-byte little-endian signed label (-1: unlabelled) followed by the image: with
encoding "raw" (the default) its uint8 pixels [S, S, C] in C order, read back with
`np.frombuffer`, no decode at all; with "png" a PNG file (smaller on disk, decoded by
Pillow on every read). The pixels are exactly those the folder or Hugging Face source
gives for the same config (`images.to_array`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from array_record.python import array_record_data_source, array_record_module

from ddpm_jax.data import decode
from ddpm_jax.data.config import DataConfig, OpenedSplit
from ddpm_jax.errors import DataError, DataNotFoundError

FORMAT = "ddpm_jax.arrayrecord"
VERSION = 1
INFO_FILE = "info.json"
ENCODINGS = ("raw", "png")
WRITER_OPTIONS = "group_size:1,uncompressed"
_LABEL_BYTES = 8


def split_file(split: str) -> str:
    """The file name of a split's records (characters unsafe in a file name become "_")."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", split) + ".array_record"


def encode(image: np.ndarray, label: int | None, encoding: str) -> bytes:
    """One record: label (int64 LE, -1 if None) + the uint8 [S, S, C] image as `encoding`."""
    head = (-1 if label is None else int(label)).to_bytes(_LABEL_BYTES, "little", signed=True)
    body = np.ascontiguousarray(image, np.uint8).tobytes() if encoding == "raw" else (
        decode.encode_png(image))  # fmt: skip
    return head + body


class ArrayRecordSource(Sequence):
    """Random access to the examples of one prepared split (picklable, for Grain workers).

    Args:
      paths: the split's ArrayRecord files (absolute).
      image_size: stored height = width.
      channels: stored channels.
      encoding: "raw" or "png".
      labelled: whether records carry labels.
    """

    def __init__(self, paths: list[str], image_size: int, channels: int, encoding: str,
                 labelled: bool):  # fmt: skip
        self.paths = list(paths)
        self.image_size = image_size
        self.channels = channels
        self.encoding = encoding
        self.labelled = labelled
        self._shape = (image_size, image_size, channels)
        self._records = array_record_data_source.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self._records)

    def _decode(self, record: bytes) -> dict:
        if self.encoding == "raw":
            size = int(np.prod(self._shape))
            if len(record) != _LABEL_BYTES + size:
                raise DataError(f"a record of {self.paths[0]} holds {len(record)} bytes, not "
                                f"{_LABEL_BYTES + size}; prepare the dataset again.")  # fmt: skip
            image = np.frombuffer(record, np.uint8, size, _LABEL_BYTES).reshape(self._shape)
        else:
            image = decode.decode(record[_LABEL_BYTES:], self.image_size, self.channels)
        if not self.labelled:
            return {"image": image}
        return {"image": image, "label": int.from_bytes(record[:_LABEL_BYTES], "little",
                                                         signed=True)}  # fmt: skip

    def __getitem__(self, index: int) -> dict:
        """Example `index`: `image` uint8 [S, S, C] (read-only) and, if labelled, `label`."""
        return self._decode(self._records[int(index)])

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        """Several examples in one read (Grain's batched access)."""
        return [self._decode(r) for r in self._records.__getitems__([int(i) for i in indices])]


class SplitWriter:
    """Writes the records of one split: `with SplitWriter(dir, split) as w: w.write(rec)`."""

    def __init__(self, directory: str, split: str):
        self.path = os.path.join(directory, split_file(split))
        self._writer = array_record_module.ArrayRecordWriter(self.path, WRITER_OPTIONS)
        self.count = 0

    def write(self, record: bytes) -> None:
        """Appends one record (from `encode`)."""
        self._writer.write(record)
        self.count += 1

    def __enter__(self) -> SplitWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._writer.close()


def read_info(path: str) -> dict:
    """The `info.json` of a prepared directory.

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: `path` is not a directory `prepare` wrote (of this format version).
    """
    if not os.path.exists(path):
        raise DataNotFoundError(
            f"config.data.path={path!r} does not exist; config.data.source='arrayrecord' "
            "reads a directory written by `ddpm-jax-data prepare --out=DIR`."
        )
    file = os.path.join(path, INFO_FILE)
    try:
        with open(file, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(
            f"config.data.path={path!r} is not a dataset prepared by `ddpm-jax-data "
            "prepare` ({INFO_FILE}: {e}); prepare one there, or set config.data.source."
        ) from e
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise DataError(f"{file} is not a ddpm_jax prepared-dataset description.")
    if info.get("version") != VERSION:
        raise DataError(f"{file} has format version {info.get('version')}, this ddpm_jax reads "
                        f"version {VERSION}; prepare the dataset again.")  # fmt: skip
    return info


def open_arrayrecord(data: DataConfig, split: str, field: str) -> OpenedSplit:
    """Opens split `split` of the prepared directory `data.path`.

    Raises:
      FileNotFoundError: `data.path` or a split file does not exist.
      ValueError: not a prepared directory, an unknown split, or an image size / channel
        count other than the one it was prepared with.
    """
    path = os.path.abspath(data.path)
    info = read_info(path)
    if split not in info["splits"]:
        raise DataError(f"{field}={split!r} is not a split of the prepared dataset {path}; "
                        f"its splits are {sorted(info['splits'])}.")  # fmt: skip
    for key in ("image_size", "channels"):
        if info[key] != getattr(data, key):
            raise DataError(
                f"config.data.{key}={getattr(data, key)} but {path} was prepared with "
                f"{key}={info[key]}; set config.data.{key}={info[key]}, or prepare it again "
                f"with --{key}={getattr(data, key)}."
            )
    entry = info["splits"][split]
    paths = [os.path.join(path, f) for f in entry["files"]]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise DataNotFoundError(f"{missing[0]} (split {split!r} of {path}) does not exist; "
                                "prepare the dataset again.")  # fmt: skip
    if entry["num_examples"] == 0:
        return OpenedSplit([], f"arrayrecord:{path}", int(info["num_classes"]))
    source = ArrayRecordSource(paths, info["image_size"], info["channels"], info["encoding"],
                               bool(info["num_classes"]))  # fmt: skip
    if len(source) != entry["num_examples"]:
        raise DataError(f"split {split!r} of {path} holds {len(source)} records, {INFO_FILE} "
                        f"says {entry['num_examples']}; prepare the dataset again.")  # fmt: skip
    note = f" (it was prepared from {info.get('prepared_from', {}).get('path')})"
    return OpenedSplit(source, f"arrayrecord:{path}", int(info["num_classes"]), note)
