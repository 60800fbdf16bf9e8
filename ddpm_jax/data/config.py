"""`DataConfig`: the typed, frozen, checked `config.data` group, and `DatasetInfo`.

The ConfigDict stops here for the input pipeline: `DataConfig.from_config(config)` reads
`config.data`, checks every field, and the pipeline only ever sees the frozen dataclass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ddpm_jax import fields
from ddpm_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The `config.data` group (configs/default.py documents each field).

    Attributes:
      name: "digits" (embedded, offline) or a TFDS catalog name, e.g. "cifar10".
      split: TFDS split to train on, e.g. "train" or "train[:90%]".
      eval_split: TFDS split to evaluate on.
      image_size: height = width of the images fed to the model, in pixels.
      channels: image channels (1 grey, 3 RGB).
      random_flip: flip training images horizontally with probability 1/2.
      data_dir: TFDS data_dir, an absolute path once the entry point has resolved it; None
        means TFDS' default (`$TFDS_DATA_DIR` or `~/tensorflow_datasets`).
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
            fields.string(f"data.{field}", getattr(self, field))
        fields.integer("data.image_size", self.image_size, 1)
        fields.integer("data.channels", self.channels, 1, 4)
        fields.boolean("data.random_flip", self.random_flip)
        fields.string("data.data_dir", self.data_dir, none_ok=True)
        fields.integer("data.num_workers", self.num_workers, 0)

    @classmethod
    def from_config(cls, config: Any) -> DataConfig:
        """Reads `config.data` of an experiment config (or accepts a `DataConfig`)."""
        if isinstance(config, DataConfig):
            return config
        data = config.data
        data = dict(data.to_dict() if hasattr(data, "to_dict") else data)
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataConfig:
        """Builds from the fields of `config.data` as a mapping; every field is required."""
        known = [f.name for f in dataclasses.fields(cls)]
        fields.unknown_fields("data", list(data), known)
        missing = [k for k in known if k not in data]
        if missing:
            raise ConfigError(
                f"config.data is missing field(s) {missing}; start from configs/default.py."
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
