"""`DataConfig`: the typed, frozen, checked `config.data` group, and `DatasetInfo`.

The ConfigDict stops here for the input pipeline: `DataConfig.from_config(config)` reads
`config.data`, checks every field, and the pipeline only ever sees the frozen dataclass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ddpm_jax import fields

# Values of config.data.source (see `DataConfig.source`).
SOURCES = ("tfds", "folder", "huggingface", "arrayrecord")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The `config.data` group (`ddpm_jax/experiment/defaults.py` documents each field).

    Attributes:
      name: with source "tfds": "digits" (embedded, offline) or a TFDS catalog name, e.g.
        "cifar10"; with the other sources a free label.
      split: the split to train on. TFDS: e.g. "train" or "train[:90%]"; "folder" and a
        single Hugging Face `Dataset`: "train" (the files not held out) or "test" (the
        `eval_fraction` held out); a Hugging Face `DatasetDict` and "arrayrecord": the
        name of one of its splits.
      image_size: height = width of the images fed to the model, in pixels.
      channels: image channels (1 grey, 3 RGB; 2 and 4 keep alpha for "folder" and
        "huggingface").
      random_flip: flip training images horizontally with probability 1/2.
      data_dir: TFDS data_dir, an absolute path once the entry point has resolved it; None
        means TFDS' default (`$TFDS_DATA_DIR` or `~/tensorflow_datasets`). With source
        "huggingface" and a Hub name, the `datasets` cache directory (None: its default).
      num_workers: Grain worker processes for training batches (0: threads in this process).
      source: where the examples come from, one of `SOURCES`: "tfds" (`name` in `data_dir`),
        "folder" (image files under `path`), "huggingface" (a dataset saved with
        `save_to_disk` at `path`, or `path` = "hf://NAME" from the `datasets` cache),
        "arrayrecord" (what `ddpm-jax-data prepare` wrote to `path`).
      path: the folder, saved dataset or prepared directory of the non-TFDS sources (an
        absolute path once the entry point has resolved it); None for "tfds".
      labels_from_folders: "folder" only: label each image with the index of its
        first-level sub-folder among the sorted sub-folder names.
      eval_fraction: "folder" and a single Hugging Face `Dataset` only: the fraction of the
        files (rows) held out as split "test", chosen by a hash of each file's path
        relative to `path` (each row's index), so that adding files moves none between
        the splits. 0: "train" is everything and "test" is empty.
      image_key: "huggingface" only: the column holding the images.
      label_key: "huggingface" only: the column holding integer class labels; None, or a
        column the dataset does not have, means unlabelled.
    """

    name: str
    split: str
    image_size: int
    channels: int
    random_flip: bool
    data_dir: str | None
    num_workers: int
    source: str
    path: str | None
    labels_from_folders: bool
    eval_fraction: float
    image_key: str
    label_key: str | None

    def __post_init__(self):
        for field in ("name", "split"):
            fields.string(f"data.{field}", getattr(self, field))
        fields.integer("data.image_size", self.image_size, 1)
        fields.integer("data.channels", self.channels, 1, 4)
        fields.boolean("data.random_flip", self.random_flip)
        fields.string("data.data_dir", self.data_dir, none_ok=True)
        fields.integer("data.num_workers", self.num_workers, 0)
        fields.choice("data.source", self.source, SOURCES)
        fields.string("data.path", self.path, none_ok=True)
        fields.boolean("data.labels_from_folders", self.labels_from_folders)
        fields.number("data.eval_fraction", self.eval_fraction, 0.0, 1.0, high_open=True)
        fields.string("data.image_key", self.image_key)
        fields.string("data.label_key", self.label_key, none_ok=True)
        self._check_source_fields()

    def _check_source_fields(self) -> None:
        """The fields that only some sources read must fit `source`."""
        if self.source == "tfds":
            if self.path is not None:
                raise fields.fail(
                    "data.path",
                    self.path,
                    "applies to config.data.source = 'folder', 'huggingface' or "
                    "'arrayrecord'; with source 'tfds' the dataset is config.data.name in "
                    "config.data.data_dir. Set config.data.source, or data.path to None.",
                )
        elif self.path is None:
            what = {
                "folder": "the directory of the image files",
                "huggingface": "a directory written by datasets' save_to_disk, or hf://NAME "
                "for a dataset in the datasets cache",
                "arrayrecord": "the directory `ddpm-jax-data prepare` wrote",
            }[self.source]
            raise fields.fail(
                "data.path", None, f"config.data.source = {self.source!r} needs {what}."
            )
        if self.labels_from_folders and self.source != "folder":
            raise fields.fail(
                "data.labels_from_folders",
                True,
                f"applies to config.data.source = 'folder' only, not {self.source!r}.",
            )
        if self.eval_fraction and self.source in ("tfds", "arrayrecord"):
            why = (
                "TFDS names its splits (e.g. config.data.split = 'train[:90%]')"
                if self.source == "tfds"
                else "the splits of a prepared dataset are those `prepare` wrote"
            )
            raise fields.fail(
                "data.eval_fraction",
                self.eval_fraction,
                f"must be 0 with config.data.source = {self.source!r}: {why}.",
            )

    @classmethod
    def from_config(cls, config: Any) -> DataConfig:
        """Reads `config.data` of an experiment config (or accepts a `DataConfig`)."""
        if isinstance(config, DataConfig):
            return config
        return cls.from_dict(fields.group_values(config, "data"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataConfig:
        """Builds from the fields of `config.data` as a mapping; every field is required."""
        return fields.view_of_group(cls, "data", data)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the rest of the library needs to know about one split.

    Attributes:
      name: the dataset: `config.data.name` for TFDS, "<source>:<path>" for the others.
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


@dataclasses.dataclass(frozen=True)
class OpenedSplit:
    """What a source module returns for one split, before `sources.open_split` checks it.

    Attributes:
      source: random access to the examples: index → dict with `image` uint8
        [image_size, image_size, channels] and, when labelled, an int `label`.
      name: the dataset's name in logs and `DatasetInfo` ("<source>:<path>").
      num_classes: label classes; 0 if unlabelled.
      label_note: why the labels are what they are, added to a num_classes mismatch error.
      class_names: the name of each class, when the source has them.
    """

    source: Any
    name: str
    num_classes: int
    label_note: str = ""
    class_names: tuple[str, ...] = ()
