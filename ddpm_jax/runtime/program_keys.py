"""What a compiled program is made from besides its own code: the keys of the executable cache.

- `environment()`: the versions of jax, jaxlib, flax, optax and numpy, a hash of this
  package's source, the backend and its platform version, the devices, the CPU's model and
  instruction set, `XLA_FLAGS` and JAX's configuration options;
- `signature(args)`: the arguments' pytree structure, shapes, dtypes, weak types and
  shardings, and `describe_signature` as text (with each mesh's device ids).

`runtime.executables` keys every entry by these and by the caller's key (the config's
program fields, `experiment.programs.config_key`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from typing import Any

import jax
import numpy as np

_VERSIONED = ("jax", "jaxlib", "flax", "optax", "numpy")
# JAX options that change no program (where its caches live, what it logs).
_IGNORED_JAX_OPTIONS = (
    "jax_compilation_cache_dir", "jax_enable_compilation_cache", "jax_log_compiles",
    "jax_logging_level", "jax_explain_cache_misses", "jax_pprint_use_color",
    "jax_traceback_filtering", "jax_raise_persistent_cache_errors", "jax_debug_log_modules",
    "jax_persistent_cache_min_compile_time_secs", "jax_persistent_cache_min_entry_size_bytes",
    "jax_compilation_cache_max_size",
)  # fmt: skip
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def source_hash(package_dir: str = _PACKAGE_DIR) -> str:
    """SHA-256 of every `.py` file of the package (paths and contents): a changed line of the
    network or of a loss is another program."""
    digest = hashlib.sha256()
    for root, dirs, names in os.walk(package_dir):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(n for n in names if n.endswith(".py")):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, package_dir).encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(f.read())
            digest.update(b"\0")
    return digest.hexdigest()


def _cpu_description() -> str:
    """The CPU's model and instruction-set flags (an executable uses the ISA it was built for)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().split("\n\n", 1)[0].splitlines()
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    keep = ("model name", "flags", "Features", "CPU implementer", "CPU part")
    return "\n".join(line for line in lines if line.split(":")[0].strip() in keep)


def _jax_options() -> dict[str, Any]:
    options = {}
    for name in sorted(n for n in dir(jax.config) if n.startswith("jax_")):
        if name in _IGNORED_JAX_OPTIONS:
            continue
        try:
            value = getattr(jax.config, name)
        except Exception:  # an option that cannot be read now is not part of the key.
            continue
        options[name] = (
            value if isinstance(value, bool | int | float | str | None) else repr(type(value))
        )
    return options


def environment() -> dict[str, Any]:
    """Everything besides a program's own key that its executable depends on (see the module
    docstring)."""
    versions = {}
    for package in _VERSIONED:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    devices = jax.devices()
    return {
        "versions": versions,
        "source": source_hash(),
        "backend": jax.default_backend(),
        "platform_version": devices[0].client.platform_version,
        "devices": [[d.id, d.device_kind, d.process_index] for d in devices],
        "process_count": jax.process_count(),
        "cpu": hashlib.sha256(_cpu_description().encode()).hexdigest(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax_options": _jax_options(),
    }


def _leaf_signature(x: Any) -> tuple:
    """(dtype, shape, weak type, sharding or None) of one argument leaf, hashable."""
    if isinstance(x, jax.Array):
        return (str(x.dtype), tuple(x.shape), bool(x.weak_type), x.sharding)
    if isinstance(x, bool | int | float | complex):  # Python scalars are weakly typed.
        return (type(x).__name__, (), True, None)
    a = np.asarray(x)
    return (str(a.dtype), a.shape, False, None)


def signature(args: tuple) -> tuple:
    """The arguments' pytree structure and each leaf's `_leaf_signature` (a dict key)."""
    leaves, treedef = jax.tree.flatten(args)
    return (treedef, tuple(_leaf_signature(x) for x in leaves))


def describe_signature(sig: tuple) -> list[str]:
    """`signature(args)` as text, for the key on disk (shardings with their mesh's devices)."""
    treedef, leaves = sig
    out = [str(treedef)]
    for dtype, shape, weak, sharding in leaves:
        text = f"{dtype}{list(shape)}{'~' if weak else ''}"
        if sharding is not None:
            mesh = getattr(sharding, "mesh", None)
            ids = getattr(mesh, "device_ids", None)
            devices = (
                np.asarray(ids).tolist()
                if ids is not None
                else sorted(d.id for d in sharding.device_set)
            )
            text += f" {sharding!r} devices={devices}"
        out.append(text)
    return out
