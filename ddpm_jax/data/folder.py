"""`config.data.source = "folder"`: every image file under `config.data.path`, recursively.

    source, name, num_classes = open_folder(data, "train", "config.data.split")

The file list is fixed when the split is opened: every file whose name ends in one of
`decode.IMAGE_SUFFIXES` (any case), found by walking the folder in sorted order (hidden
files and folders, whose names start with ".", are skipped; other files are ignored; both
are counted in the log). Paths are sorted as strings relative to `config.data.path`, so index
i is the same file on every machine and in every process, and batch s of the pipeline stays a
pure function of (seed, s).

Corrupt files: every file's header is read when the split is opened (Pillow identifies the
format and size without decoding the pixels). If any cannot be read, opening fails naming
them, before anything compiles: a file is never skipped, because skipping one later would
change every following batch. A file whose header reads but whose pixels do not (a
truncated JPEG) stops the run when a batch first needs it, naming the file; `python -m
ddpm_jax.data prepare` decodes every file once and finds those before training.

Labels (`config.data.labels_from_folders`): the index of a file's first-level sub-folder
among the sorted names of the sub-folders that hold images; every image must then lie in one.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from ddpm_jax.data import decode, splits
from ddpm_jax.data.config import DataConfig, OpenedSplit
from ddpm_jax.errors import DataError, DataNotFoundError

# (absolute path, size, mtime_ns) → (width, height), or the reason the header cannot be read.
_HEADERS: dict[tuple[str, int, int], tuple[int, int] | str] = {}


@dataclasses.dataclass(frozen=True, eq=False)
class FolderSource(Sequence):
    """Random access to decoded images of a fixed list of files (picklable, for Grain workers).

    Attributes:
      root: the absolute folder the paths are relative to.
      files: the image files, as POSIX paths relative to `root`, in the source's order.
      labels: int32 [len(files)] class indices, or None when unlabelled.
      image_size: output height = width, in pixels.
      channels: output channels (`images.MODES`).
    """

    root: str
    files: tuple[str, ...]
    labels: np.ndarray | None
    image_size: int
    channels: int

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        """Example `index`: `image` uint8 [S, S, C] and, when labelled, `label` int."""
        path = os.path.join(self.root, self.files[int(index)])
        try:
            image = decode.decode(path, self.image_size, self.channels)
        except decode.DECODE_ERRORS as e:
            raise DataError(
                f"cannot decode image file {path}: {e}; its header read when the run started, "
                "but its pixels do not. Replace it (same name) and run again to resume, or "
                "remove it and start a new run (`ddpm-jax-data prepare` decodes "
                "every file once and finds such files before training)."
            ) from e
        if self.labels is None:
            return {"image": image}
        return {"image": image, "label": int(self.labels[int(index)])}


def scan(root: str) -> tuple[list[tuple[str, int, int]], list[str]]:
    """The image files under `root`, sorted, and the other files.

    Returns:
      ([(relative POSIX path, size in bytes, mtime_ns)] of the image files, sorted by path;
       [relative paths of the ignored files and hidden entries]).
    """
    found, ignored, seen = [], [], set()
    for top, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:  # a symbolic link back up the tree
            dirs[:] = []
            continue
        seen.add(real)
        rel_top = os.path.relpath(top, root)
        rel_top = "" if rel_top == "." else rel_top.replace(os.sep, "/") + "/"
        ignored += [rel_top + d + "/" for d in dirs if d.startswith(".")]
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            rel = rel_top + name
            if name.startswith(".") or not name.lower().endswith(decode.IMAGE_SUFFIXES):
                ignored.append(rel)
                continue
            try:
                st = os.stat(os.path.join(top, name))
            except OSError:  # a dangling link: reported by the header check
                st = os.stat_result((0,) * 10)
            found.append((rel, st.st_size, st.st_mtime_ns))
    found.sort()
    return found, sorted(ignored)


def _header(path: str) -> tuple[int, int] | str:
    """(width, height) from the file's header, or why it cannot be read."""
    try:
        with Image.open(path) as image:
            return image.size
    except decode.DECODE_ERRORS as e:
        return str(e) or type(e).__name__


def check_headers(root: str, files: list[tuple[str, int, int]]) -> list[tuple[int, int]]:
    """Reads every file's header (cached per path, size and mtime); [(width, height)].

    Raises:
      DataError: naming the files whose header cannot be read.
    """
    keys = [(os.path.join(root, rel), size, mtime) for rel, size, mtime in files]
    todo = [k for k in keys if k not in _HEADERS]
    if todo:
        # Pillow reads a header in tens of µs; threads overlap the file system's latency.
        workers = min(16, max(1, len(todo) // 256))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for key, header in zip(todo, pool.map(_header, [k[0] for k in todo]), strict=True):
                _HEADERS[key] = header
    headers = [_HEADERS[k] for k in keys]
    bad = [(k[0], h) for k, h in zip(keys, headers, strict=True) if isinstance(h, str)]
    if bad:
        shown = "; ".join(f"{path} ({why})" for path, why in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        what = (
            "holds no readable image:"
            if len(bad) == len(files)
            else f"holds {len(bad)} unreadable image file(s) among {len(files)}:"
        )
        raise DataError(
            f"config.data.path={root!r} {what} {shown}{more}. Fix or remove them: a file "
            "is never skipped, since that would change which images every later batch holds."
        )
    return headers  # type: ignore[return-value]


def _labels(root: str, paths: list[str]) -> tuple[np.ndarray, list[str]]:
    """(int32 label per path, sorted class names) from the first-level sub-folders."""
    loose = [p for p in paths if "/" not in p]
    if loose:
        raise DataError(
            f"config.data.labels_from_folders=True but config.data.path={root!r} has "
            f"{len(loose)} image file(s) directly in it, e.g. {loose[0]!r}; put every image in "
            "a class sub-folder, or set config.data.labels_from_folders=False."
        )
    classes = sorted({p.split("/", 1)[0] for p in paths})
    index = {name: i for i, name in enumerate(classes)}
    return np.array([index[p.split("/", 1)[0]] for p in paths], np.int32), classes


def open_folder(data: DataConfig, split: str, field: str) -> OpenedSplit:
    """Opens split `split` ("train" or "test") of the folder `data.path`.

    Args:
      data: the checked `config.data` (source "folder").
      split: "train" or "test" (the `data.eval_fraction` held out, see `splits`).
      field: the config field that named the split, for error messages.

    Raises:
      FileNotFoundError: `data.path` does not exist.
      ValueError: not a folder, no image files, unreadable files, an unknown split, or
        images outside class folders with `labels_from_folders`.
    """
    root = os.path.abspath(data.path)
    if not os.path.exists(root):
        raise DataNotFoundError(
            f"config.data.path={data.path!r} does not exist; config.data.source='folder' "
            "reads the image files under this directory."
        )
    if not os.path.isdir(root):
        raise DataError(
            f"config.data.path={data.path!r} is a file, not a directory of image files "
            "(config.data.source='folder')."
        )
    found, ignored = scan(root)
    if not found:
        example = f", e.g. {ignored[0]!r}" if ignored else ""
        raise DataError(
            f"config.data.path={data.path!r} holds no image files (names ending in "
            f"{', '.join(decode.IMAGE_SUFFIXES)}); {len(ignored)} other file(s) ignored"
            f"{example}."
        )
    paths = [rel for rel, _, _ in found]
    labels, classes = _labels(data.path, paths) if data.labels_from_folders else (None, [])
    # Every file is checked, whichever split is asked for: the split is fixed by the list.
    sizes = check_headers(root, found)
    chosen = splits.select(paths, split, data.eval_fraction, field)
    small = sum(min(sizes[i]) < data.image_size for i in chosen)
    logging.info(
        "Folder %s: %d image files (%d in split %r), %d other files ignored%s%s.",
        root, len(found), len(chosen), split, len(ignored),
        f", {len(classes)} classes" if classes else "",
        f"; {small} smaller than {data.image_size} px are upsampled" if small else "",
    )  # fmt: skip
    source = FolderSource(
        root=root,
        files=tuple(paths[i] for i in chosen),
        labels=None if labels is None else labels[chosen],
        image_size=data.image_size,
        channels=data.channels,
    )
    note = "" if data.labels_from_folders else " (set config.data.labels_from_folders=True)"
    return OpenedSplit(source, f"folder:{root}", len(classes), note, tuple(classes))
