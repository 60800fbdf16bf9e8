"""The "train" / "test" split of a folder (or a single Hugging Face dataset) by a stable hash.

A source without splits of its own has two: "test" holds the examples whose key (a file's
path relative to `config.data.path`, or a row's index) hashes into the lowest
`config.data.eval_fraction` of the hash range, "train" the rest. Membership depends on the
key alone, so adding or removing files never moves another file between the splits, and it
is the same on every machine and process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from ddpm_jax.errors import DataError

SPLITS = ("train", "test")
_SCALE = float(2**64)


def held_out(key: str, fraction: float) -> bool:
    """True if `key` belongs to the held-out split "test" for `fraction` ∈ [0, 1)."""
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / _SCALE < fraction


def select(keys: Sequence[str], split: str, fraction: float, field: str) -> np.ndarray:
    """Positions (int64, ascending) of the examples of `split` among `keys`.

    Args:
      keys: the examples' stable keys, in the source's fixed order.
      split: "train" or "test".
      fraction: config.data.eval_fraction.
      field: the config field that named the split, for the error message.

    Raises:
      DataError: for another split name.
    """
    if split not in SPLITS:
        raise DataError(
            f"{field}={split!r}: this source has the splits {list(SPLITS)} ('test' holds the "
            "config.data.eval_fraction of the examples held out by a hash of their path)."
        )
    if fraction <= 0.0:
        return np.arange(len(keys), dtype=np.int64) if split == "train" else np.zeros(0, np.int64)
    test = np.fromiter((held_out(k, fraction) for k in keys), bool, len(keys))
    return np.flatnonzero(test if split == "test" else ~test).astype(np.int64)
