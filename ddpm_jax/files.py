"""Files the package writes and checks: paths, atomic writes, JSON and npz, SHA-256.

Every file (or directory) the package writes appears under its final name complete or not at
all: it is written beside its final name and renamed onto it (`os.replace`, atomic on POSIX)
once whole, so a reader, or a run killed mid-write, never sees a partial one. Imports nothing
from the package.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

_CHUNK = 1 << 20  # bytes read at a time when hashing.


def resolve_path(path: str | os.PathLike | None) -> str | None:
    """A user-given path as the program should use it: `~` expanded and made absolute.

    Relative paths are taken from the current directory, once, where the program starts;
    orbax, TensorStore and Grain workers all need absolute paths. URLs (`gs://...`) and None
    are returned as they are.
    """
    if path is None:
        return None
    path = os.fspath(path)
    if "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike, *, replace_dir: bool = False, shared: bool = False
) -> Iterator[str]:
    """A temporary path beside `path` to write a file or a directory to; renamed onto `path`.

        with atomic_path("out.safetensors") as tmp:
            save_file(arrays, tmp)

    The temporary name is `<path>.tmp` (one left by a killed run is replaced by the next write
    of `path`; only one process writes a given file); with `shared`, where several processes
    or threads may write `path` at once (the last rename wins), it is
    `<path>.<pid>.<thread>.tmp` and another writer's is left alone (the directory's owner
    removes those of killed writers). When the block succeeds it is renamed
    onto `path` (an existing file is replaced; an existing directory only with
    `replace_dir`); when it raises, the temporary file or directory is removed and `path`
    keeps what it held.
    """
    path = os.fspath(path)
    if shared:
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    else:
        tmp = f"{path}.tmp"
        _remove(tmp)
    try:
        yield tmp
        if replace_dir and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


@contextlib.contextmanager
def atomic_writer(
    path: str | os.PathLike, mode: str = "w", *, shared: bool = False
) -> Iterator[Any]:
    """Opens a temporary file for writing that becomes `path` once the block succeeds."""
    with atomic_path(path, shared=shared) as tmp, open(tmp, mode) as f:
        yield f


def atomic_write(path: str | os.PathLike, data: str | bytes, *, shared: bool = False) -> None:
    """Writes `data` to `path` atomically (see `atomic_path`, also for `shared`)."""
    with atomic_writer(path, "wb" if isinstance(data, bytes) else "w", shared=shared) as f:
        f.write(data)


def write_json(path: str | os.PathLike, value: Any, *, sort_keys: bool = True) -> None:
    """Writes `value` as indented JSON (keys sorted unless `sort_keys=False`), atomically."""
    atomic_write(path, json.dumps(value, indent=2, sort_keys=sort_keys) + "\n")


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Writes arrays to an `.npz` atomically (read back with `np.load(allow_pickle=False)`)."""
    with atomic_writer(path, "wb") as f:
        np.savez(f, **arrays)


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
