"""Input pipeline: TFDS ArrayRecord data sources → Grain → per-process NumPy batches.

Reading is random access (`tfds.data_source`, no TensorFlow runtime), so every training batch
is a pure function of (seed, step) and a resumed run needs nothing but the step number:

    global index  g = step · B + row,            row ∈ [0, B), B = global batch size
    example       = source[π_{seed, g // N}(g mod N)]   (a fresh permutation every epoch of N)
    flip          ~ Bernoulli(1/2), drawn from (seed, g) alone

Process p of P reads only rows [p·B/P, (p+1)·B/P) of each global batch. Images leave as
float32 NHWC in [-1, 1] (uint8 x ↦ x / 127.5 − 1) with int32 labels; turning the per-process
arrays into global `jax.Array`s is `ddpm_jax.runtime.sharding`'s job.

Opening and checking the split (`get_dataset_info`, `open_split`) is
`ddpm_jax.data.sources`' job; the typed `config.data` (`DataConfig`, `DatasetInfo`) is in
`ddpm_jax.data.config`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from ddpm_jax.data.config import DatasetInfo
from ddpm_jax.data.decode import center_crop_resize as _center_crop_resize
from ddpm_jax.data.sources import data_and_classes, open_split

__all__ = [
    "BatchIterator",
    "EvalData",
    "TrainData",
    "eval_batches",
    "make_eval_data",
    "make_train_data",
    "train_batches",
]

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class _ToModelInput:
    """Example → model input: float32 [H, W, C] in [-1, 1] and an int32 label.

    A module-level callable (not a lambda) so that Grain worker processes can pickle it.
    Called by `map(example)` or, to flip, by `random_map(example, rng)`.
    """

    image_size: int

    def __call__(self, example: Mapping, rng: np.random.Generator | None = None) -> Batch:
        image = np.asarray(example["image"])
        if image.shape[:2] != (self.image_size, self.image_size):
            image = _center_crop_resize(image, self.image_size)
        if rng is not None and rng.random() < 0.5:
            image = image[:, ::-1]
        return {
            "image": image.astype(np.float32) / 127.5 - 1.0,
            "label": np.int32(example.get("label", 0)),
        }


@dataclasses.dataclass(frozen=True)
class _MarkValid:
    """(index, example) → example plus `mask` = index < num_examples (False on padding)."""

    num_examples: int

    def __call__(self, index: int, example: Batch) -> Batch:
        return {**example, "mask": np.bool_(index < self.num_examples)}


def _check_sharding(global_batch_size: int, process_index: int, process_count: int) -> int:
    """Returns the per-process batch size after checking the sharding arguments."""
    if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int):
        raise ValueError(f"global_batch_size must be an int, got {global_batch_size!r}.")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} must lie in [0, process_count={process_count})."
        )
    if global_batch_size < 1 or global_batch_size % process_count:
        suggestion = max(1, global_batch_size // process_count) * process_count
        raise ValueError(
            f"global_batch_size={global_batch_size} (config.training.batch_size or "
            f"config.eval.batch_size) must be a positive multiple of process_count="
            f"{process_count}; use e.g. {suggestion}."
        )
    return global_batch_size // process_count


def train_batches(
    source: Sequence[Mapping],
    *,
    image_size: int,
    global_batch_size: int,
    process_index: int,
    process_count: int,
    seed: int,
    random_flip: bool,
) -> grain.MapDataset:
    """The endless, shuffled training stream of one process, as a random-access dataset.

    Element `step` of the result is this process's share of global batch `step`: rows
    [p·b, (p+1)·b) with b = global_batch_size / process_count, as a dict of `image` float32
    [b, image_size, image_size, C] in [-1, 1] and `label` int32 [b]. It is a pure function
    of (source, seed, step): each epoch of len(source) examples is a fresh permutation
    seeded by (seed, epoch), and the flip of global row g is drawn from (seed, g).

    Args:
      source: random-access examples (dicts with uint8 `image` [H, W, C], optional `label`).
      image_size: output height = width; other sizes are centre-cropped and resized.
      global_batch_size: B, the batch over all processes.
      process_index: p, this process.
      process_count: P; must divide B.
      seed: non-negative int; the data order and flips depend on it alone.
      random_flip: flip each image horizontally with probability 1/2.
    """
    local = _check_sharding(global_batch_size, process_index, process_count)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed (config.training.seed) must be an int ≥ 0, got {seed!r}.")
    if len(source) == 0:
        raise ValueError("source is empty.")
    # Grain derives the shuffle and flip seeds from `seed`; shuffle folds in the epoch.
    ds = grain.MapDataset.source(source).seed(int(seed)).shuffle().repeat()
    transform = _ToModelInput(image_size)
    ds = ds.random_map(transform) if random_flip else ds.map(transform)
    # Mini-batch k holds global rows [k·b, (k+1)·b); global batch s is mini-batches
    # s·P … s·P + P − 1, so this process's share of it is mini-batch s·P + p.
    return ds.batch(local, drop_remainder=True)[process_index::process_count]


def eval_batches(
    source: Sequence[Mapping],
    *,
    image_size: int,
    global_batch_size: int,
    process_index: int,
    process_count: int,
    num_examples: int = 0,
) -> grain.MapDataset:
    """One pass over a split, in order, in fixed-size batches with a padding mask.

    The first n = num_examples (0: all) examples are cut into ceil(n / B) global batches;
    the last is padded to B with wrapped-around examples whose `mask` is False. Element k
    of the result is this process's rows [p·b, (p+1)·b) of global batch k: `image` float32
    [b, H, W, C] in [-1, 1], `label` int32 [b], `mask` bool [b]. Every process gets the
    same number of batches, so collective operations stay in step.
    """
    local = _check_sharding(global_batch_size, process_index, process_count)
    n = len(source) if num_examples <= 0 else min(num_examples, len(source))
    if n == 0:
        raise ValueError("source is empty.")
    padded = math.ceil(n / global_batch_size) * global_batch_size
    # A MapDataset source wraps indices past its end around, which provides the padding.
    ds = grain.MapDataset.source(source)[:n].repeat()[:padded]
    ds = ds.map(_ToModelInput(image_size)).map_with_index(_MarkValid(n))
    return ds.batch(local, drop_remainder=True)[process_index::process_count]


class BatchIterator(Iterator[Batch]):
    """Iterates training batches from a start step, reading ahead in background threads.

    Its whole state is `step`, the step of the next batch it returns: a checkpoint stores
    the step and a resumed run makes a new iterator there.
    """

    def __init__(self, dataset: grain.MapDataset, start_step: int, prefetch: int, workers: int):
        if start_step < 0:
            raise ValueError(f"start_step must be ≥ 0, got {start_step}.")
        if prefetch < 0:
            raise ValueError(f"prefetch must be ≥ 0, got {prefetch}.")
        options = grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch)
        stream = dataset[start_step:].to_iter_dataset(options)
        if workers > 0:
            stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
        self._iterator = iter(stream)
        self.step = start_step

    def __next__(self) -> Batch:
        batch = next(self._iterator)
        self.step += 1
        return batch

    def close(self) -> None:
        """Stops the read-ahead threads / worker processes."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()


class TrainData:
    """One process's training batches; batch `step` is a pure function of (seed, step).

    Attributes:
      info: the checked `DatasetInfo` of the training split.
      dataset: the random-access Grain dataset (element s = batch of step s).
      local_batch_size: rows per batch on this process.
    """

    def __init__(
        self,
        dataset: grain.MapDataset,
        info: DatasetInfo | None,
        local_batch_size: int,
        num_workers: int = 0,
    ):
        self.dataset = dataset
        self.info = info
        self.local_batch_size = local_batch_size
        self._num_workers = num_workers

    def get_batch(self, step: int) -> Batch:
        """Returns `image` float32 [b, H, W, C] in [-1, 1] and `label` int32 [b] of `step`."""
        if step < 0:
            raise ValueError(f"step must be ≥ 0, got {step}.")
        return self.dataset[step]

    def iterator(self, start_step: int = 0, *, prefetch: int = 2) -> BatchIterator:
        """Batches of steps start_step, start_step + 1, …, `prefetch` of them read ahead.

        With config.data.num_workers > 0 the batches come from that many worker processes
        (started with multiprocessing's "spawn": the main module needs the usual
        `if __name__ == "__main__":` guard, and absl flags must be parsed).
        """
        return BatchIterator(self.dataset, start_step, prefetch, self._num_workers)


class EvalData:
    """One process's share of one ordered pass over a split (see `eval_batches`).

    Attributes:
      info: the checked `DatasetInfo` of the split.
      dataset: the random-access Grain dataset of this process's batches.
      num_examples: real (unpadded) examples in the pass, over all processes.
      local_batch_size: rows per batch on this process.
    """

    def __init__(
        self, dataset: grain.MapDataset, info: DatasetInfo, num_examples: int, local_batch_size: int
    ):
        self.dataset = dataset
        self.info = info
        self.num_examples = num_examples
        self.local_batch_size = local_batch_size

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[Batch]:
        yield from self.iterator()

    def iterator(self, *, prefetch: int = 2) -> Iterator[Batch]:
        """Yields the batches in order, `prefetch` of them read ahead in threads."""
        options = grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch)
        return iter(self.dataset.to_iter_dataset(options))


def make_train_data(
    config: Any,
    *,
    global_batch_size: int,
    process_index: int,
    process_count: int,
    seed: int,
    num_classes: int | None = None,
) -> TrainData:
    """Training batches of `config.data.split` for process `process_index`.

    Args:
      config: a `DataConfig`, or an experiment config (its `data` group).
      global_batch_size: batch size over all processes (config.training.batch_size).
      process_index: this process (jax.process_index()).
      process_count: number of processes (jax.process_count()); must divide the batch.
      seed: data seed (e.g. config.training.seed).
      num_classes: the model's classes, checked against the labels (see `open_split`).

    Raises:
      ValueError, FileNotFoundError: as `get_dataset_info`, or for bad batch arguments.
    """
    data, num_classes = data_and_classes(config, num_classes)
    local = _check_sharding(global_batch_size, process_index, process_count)
    source, info = open_split(data, num_classes=num_classes, global_batch_size=global_batch_size)
    dataset = train_batches(
        source,
        image_size=data.image_size,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
        seed=seed,
        random_flip=data.random_flip,
    )
    return TrainData(dataset, info, local, data.num_workers)


def make_eval_data(
    config: Any,
    *,
    global_batch_size: int,
    process_index: int,
    process_count: int,
    split: str,
    num_examples: int = 0,
    num_classes: int | None = None,
) -> EvalData:
    """Ordered, padded, masked evaluation batches of a split for process `process_index`.

    Args:
      config: a `DataConfig`, or an experiment config (its `data` group).
      global_batch_size: batch size over all processes (config.eval.batch_size).
      process_index: this process.
      process_count: number of processes; must divide the batch.
      split: the split to read (`config.eval.split`, or `config.data.split` for FID's
        reference statistics).
      num_examples: evaluate the first this many examples; 0 means the whole split.
      num_classes: the model's classes, checked against the labels (see `open_split`).
    """
    data, num_classes = data_and_classes(config, num_classes)
    local = _check_sharding(global_batch_size, process_index, process_count)
    source, info = open_split(data, split, num_classes=num_classes)
    n = info.num_examples if num_examples <= 0 else min(num_examples, info.num_examples)
    dataset = eval_batches(
        source,
        image_size=data.image_size,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
        num_examples=n,
    )
    return EvalData(dataset, info, n, local)
