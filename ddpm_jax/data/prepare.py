"""Decode and resize a folder or a Hugging Face dataset once, into ArrayRecord files.

    info = prepare(DataConfig(name="mine", source="folder", path=DIR, image_size=32, ...), OUT)

then train with `config.data.source = "arrayrecord"`, `config.data.path = OUT`. Every split
of the source is written (a folder and a single Hugging Face `Dataset`: "train", and "test"
when `eval_fraction` > 0; a `DatasetDict`: each of its splits) in the source's order, with
the pixels the source itself gives (`images.to_array`), so training on the prepared copy
sees the same batches as training on the source. The record format is
`ddpm_jax.data.arrayrecord`'s. Decoding runs in `workers` processes; the output appears
under `out` only when complete (it is written to a temporary sibling and renamed).
"""

from __future__ import annotations

import collections
import concurrent.futures
import datetime
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

from ddpm_jax.data import arrayrecord, huggingface, splits
from ddpm_jax.data.config import DataConfig, OpenedSplit
from ddpm_jax.errors import DataError
from ddpm_jax.files import atomic_path

SOURCES = ("folder", "huggingface")
_CHUNK = 256  # examples per task of a worker process

_worker_source: Any = None  # the split a worker process decodes (set by its initializer)


def _init_worker(source: Sequence) -> None:
    global _worker_source
    _worker_source = source


def _encode_chunk(start: int, stop: int, encoding: str) -> list[bytes]:
    """Records [start, stop) of the worker's split."""
    return [_encode(_worker_source[i], encoding) for i in range(start, stop)]


def _encode(example: dict, encoding: str) -> bytes:
    return arrayrecord.encode(example["image"], example.get("label"), encoding)


def _records(source: Sequence, encoding: str, workers: int) -> Iterator[bytes]:
    """The records of every example of `source`, in order, decoded in `workers` processes."""
    n = len(source)
    if workers <= 0 or n <= _CHUNK:
        for i in range(n):
            yield _encode(source[i], encoding)
        return
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds threads
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_init_worker, initargs=(source,)
    ) as pool:
        starts = iter(range(0, n, _CHUNK))
        pending: collections.deque = collections.deque()
        for start in starts:  # a bounded window of chunks in flight keeps memory flat
            pending.append(pool.submit(_encode_chunk, start, min(start + _CHUNK, n), encoding))
            if len(pending) >= 2 * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


def split_names(data: DataConfig) -> list[str]:
    """The splits `prepare` writes for `data`."""
    if data.source == "huggingface":
        return huggingface.split_names(data)
    return list(splits.SPLITS) if data.eval_fraction else ["train"]


def _open(data: DataConfig, split: str) -> OpenedSplit:
    from ddpm_jax.data.sources import OPENERS  # sources imports this package's modules

    return OPENERS[data.source](data, split, "split")


def _check_out(out: str, overwrite: bool) -> None:
    if not os.path.exists(out) or (os.path.isdir(out) and not os.listdir(out)):
        return
    if overwrite and os.path.exists(os.path.join(out, arrayrecord.INFO_FILE)):
        return
    raise DataError(
        f"--out={out} exists and is not empty"
        + (
            "; --overwrite replaces only a directory prepare wrote (one with info.json)."
            if overwrite
            else "; choose another directory, or pass --overwrite to replace a prepared one."
        )
    )


def prepare(
    data: DataConfig,
    out: str,
    *,
    encoding: str = "raw",
    workers: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Writes every split of `data` (source "folder" or "huggingface") to `out`.

    Args:
      data: the source, its path, and image_size / channels / labels / eval_fraction /
        image_key / label_key as training would read it.
      out: the output directory (absolute); created; must not exist, be empty, or (with
        `overwrite`) hold an earlier prepared dataset.
      encoding: "raw" (uint8 pixels: no decode when read, the fastest) or "png" (smaller).
      workers: decoding processes; None: one per CPU; 0: in this process.
      overwrite: replace an earlier prepared dataset at `out`.

    Returns:
      The `info.json` written.

    Raises:
      ValueError, FileNotFoundError: as opening the source does (a missing or empty folder,
        unreadable files, ...), and for a file that does not decode, naming it.
    """
    if data.source not in SOURCES:
        raise DataError(f"--source={data.source!r}: prepare reads one of {list(SOURCES)}.")
    if encoding not in arrayrecord.ENCODINGS:
        raise DataError(f"--encoding={encoding!r}: must be one of {list(arrayrecord.ENCODINGS)}.")
    out = os.path.abspath(out)
    _check_out(out, overwrite)
    workers = (os.cpu_count() or 1) if workers is None else workers
    opened = {split: _open(data, split) for split in split_names(data)}
    opened = {k: v for k, v in opened.items() if len(v.source)}
    if not opened:
        raise DataError(f"--path={data.path}: every split is empty; nothing to prepare.")
    with atomic_path(out, replace_dir=True) as partial:
        os.makedirs(partial)
        info = _write(data, opened, partial, encoding, workers)
    return info


def _write(
    data: DataConfig, opened: dict[str, OpenedSplit], directory: str, encoding: str, workers: int
) -> dict:
    num_classes = max(o.num_classes for o in opened.values())
    names = next((list(o.class_names) for o in opened.values() if o.class_names), [])
    entries = {}
    for split, split_source in opened.items():
        source, n = split_source.source, len(split_source.source)
        start = last_log = time.monotonic()
        with arrayrecord.SplitWriter(directory, split) as writer:
            for record in _records(source, encoding, workers):
                writer.write(record)
                if time.monotonic() - last_log > 30:
                    last_log = time.monotonic()
                    logging.info("prepare: split %r, %d/%d images", split, writer.count, n)
        if writer.count != n:
            raise RuntimeError(f"wrote {writer.count} of the {n} records of split {split!r}.")
        took = time.monotonic() - start
        logging.info("prepare: split %r, %d images in %.1f s", split, n, took)
        entries[split] = {"num_examples": n, "files": [os.path.basename(writer.path)]}
    info = {
        "format": arrayrecord.FORMAT,
        "version": arrayrecord.VERSION,
        "image_size": data.image_size,
        "channels": data.channels,
        "encoding": encoding,
        "num_classes": num_classes,
        "class_names": names,
        "splits": entries,
        "prepared_from": {
            "source": data.source,
            "path": data.path,
            "name": next(iter(opened.values())).name,
            "eval_fraction": data.eval_fraction,
            "labels_from_folders": data.labels_from_folders,
            "image_key": data.image_key,
            "label_key": data.label_key,
        },
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    with open(os.path.join(directory, arrayrecord.INFO_FILE), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    return info
