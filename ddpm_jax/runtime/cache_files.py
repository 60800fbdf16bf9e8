"""The files of the executable cache: their format, their atomic writes, and what is trusted.

An entry is `MAGIC`, the length of a JSON header, the header (which holds the SHA-256 and
size of the payload) and the payload. `unpack` refuses any file that is not whole.

What is trusted: a cache directory that the user running the command owns and that no one
else may write to (`trusted_directory`: owned by this uid, not group- or world-writable),
and entries in it owned by this uid. `runtime.executables` loads nothing from any other
directory (it warns once and compiles instead), and creates its own directory with mode
0700. Within a trusted directory two things are unpickled:

- the cache's own layer (`restricted_loads`): bytes, tuples, lists, shapes, dtypes and
  pytree structures only; it refuses any global outside `ALLOWED_MODULES`, any function or
  other non-class object but JAX's pytree registries, so that a tampered file cannot name, e.g.,
  `os.system`;
- the executable itself, by `jax.experimental.serialize_executable.deserialize_and_load`,
  whose format is a pickle that JAX itself documents as unsafe for untrusted input: that
  is the one unrestricted unpickling, and the reason for the ownership check.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import stat
import struct
from typing import Any

from ddpm_jax import files

MAGIC = b"ddpm_jax executable 1\n"
# The top-level packages whose classes a cache file's own layer may name (pytree node types
# of a train state: TrainState, optax's states; numpy's dtype; the pytree definition).
ALLOWED_MODULES = frozenset({"ddpm_jax", "flax", "optax", "jax", "jaxlib", "numpy", "collections"})
# The pytree registries a PyTreeDef names.
_ALLOWED_OBJECTS = frozenset(
    ("jax._src.tree_util", r)
    for r in ("default_registry", "tracing_registry", "none_leaf_registry")
)


def trusted_directory(directory: str) -> str | None:
    """None if `directory` may be loaded from (absent, or owned by this uid and writable by
    no one else); else why not, in a few words."""
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"cannot stat it ({e})"
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"it is owned by uid {st.st_uid}, not by this user"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"others may write to it (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def read_owned(path: str) -> bytes:
    """The bytes of `path`; ValueError if this user does not own it."""
    with open(path, "rb") as f:
        if hasattr(os, "getuid") and os.fstat(f.fileno()).st_uid != os.getuid():
            raise ValueError("the file is owned by another user")
        return f.read()


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module.split(".")[0] not in ALLOWED_MODULES:
            raise pickle.UnpicklingError(f"refusing {module}.{name}")
        obj = super().find_class(module, name)
        if not isinstance(obj, type) and (module, name) not in _ALLOWED_OBJECTS:
            raise pickle.UnpicklingError(f"refusing {module}.{name}")
        return obj


def restricted_loads(data: bytes) -> Any:
    """`pickle.loads` that only builds the cache's own layer (see the module docstring)."""
    return _RestrictedUnpickler(io.BytesIO(data)).load()


def pack(header: dict, payload: bytes) -> bytes:
    """An entry's bytes: `header` gets the payload's SHA-256 and size."""
    header = {**header, "sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}
    text = json.dumps(header, sort_keys=True).encode()
    return MAGIC + struct.pack("<Q", len(text)) + text + payload


def unpack(data: bytes) -> tuple[bytes, dict]:
    """(payload, header) of an entry's bytes; ValueError unless it is whole."""
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 8:
        raise ValueError("not an executable of this version")
    buf = io.BytesIO(data)
    buf.seek(len(MAGIC))
    (length,) = struct.unpack("<Q", buf.read(8))
    header = json.loads(buf.read(length).decode())
    payload = buf.read()
    digest = hashlib.sha256(payload).hexdigest()
    if len(payload) != header.get("size") or digest != header.get("sha256"):
        raise ValueError("its contents do not match their checksum")
    return payload, header


def write_file(path: str, data: bytes) -> bool:
    """Writes `data` to `path` atomically (`files.atomic_write` with `shared`: writers of other
    processes may race for the same entry), the directory created with mode 0700; False
    (logged) if it cannot be written."""
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        files.atomic_write(path, data, shared=True)
        return True
    except OSError as e:
        logging.warning("Executable cache: cannot write %s (%s).", path, e)
        return False
