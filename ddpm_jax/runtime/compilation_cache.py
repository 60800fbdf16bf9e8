"""JAX's persistent compilation cache, on by default, so a restart does not recompile.

Compiling the CIFAR-10 train step takes ~30 s on a CPU (and ~1 min on a GPU for the 256²
models); without a cache a resumed run, every `load_sampler` and every `--mode=eval` pay it
again. The commands (`ddpm-jax`, `ddpm-jax-benchmark`, ...) and `load_sampler` call
`enable()`; compiled programs are then written to, and read back from:

    $DDPM_JAX_COMPILATION_CACHE        if set ("off" disables the cache)
    $XDG_CACHE_HOME/ddpm_jax/jax_compilation_cache     (default ~/.cache/ddpm_jax/...)

`--compilation_cache_dir=DIR` (or `=off`) on the command line, or `load_sampler(...,
compilation_cache_dir=...)`, chooses another place. An existing setting of JAX's own
(`JAX_COMPILATION_CACHE_DIR`, `jax.config`) is never overridden. Multi-process CPU runs turn
the cache off (`runtime.distributed`): there it would let one process reach the first
collective long before the others.

Entries are keyed by the program, the compile options, the XLA flags and the jax/jaxlib
versions, so a stale entry is never used; delete the directory to reclaim the space.
"""

from __future__ import annotations

import logging
import os

import jax

ENV_VAR = "DDPM_JAX_COMPILATION_CACHE"
# `enable(DEFAULT)`: the directory from the environment variable, else `default_dir()`.
DEFAULT = "default"
_OFF = ("", "off", "none", "0", "false")
# Programs that compile faster than this are not worth a file (JAX's default is 1 s).
MIN_COMPILE_TIME_S = 1.0


def default_dir() -> str:
    """`$XDG_CACHE_HOME/ddpm_jax/jax_compilation_cache`, `~/.cache/...` when XDG is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ddpm_jax", "jax_compilation_cache")


def resolve(directory: str | None = DEFAULT) -> str | None:
    """The cache directory `enable(directory)` would use; None when the cache is off."""
    if directory == DEFAULT:
        directory = os.environ.get(ENV_VAR, default_dir())
    if directory is None or directory.strip().lower() in _OFF:
        return None
    if "://" in directory:
        return directory
    return os.path.abspath(os.path.expanduser(directory))


def current_dir() -> str | None:
    """The directory JAX's persistent cache uses now (None: off)."""
    if not jax.config.jax_enable_compilation_cache:
        return None
    return jax.config.jax_compilation_cache_dir or None


def enable(directory: str | None = DEFAULT, *, only_if_unset: bool = True) -> str | None:
    """Turns on JAX's persistent compilation cache in `directory`; returns the directory used.

    Args:
      directory: where to keep compiled programs; `DEFAULT` for the environment variable or
        `default_dir()`; None or "off" leaves the cache off.
      only_if_unset: keep a cache directory JAX already has (from `JAX_COMPILATION_CACHE_DIR`
        or an earlier call) instead of switching to `directory`.

    Returns:
      The cache directory now in use, or None if the cache is off.
    """
    path = resolve(directory)
    if path is None or (only_if_unset and jax.config.jax_compilation_cache_dir):
        return current_dir()
    jax.config.update("jax_compilation_cache_dir", path)
    if jax.config.jax_persistent_cache_min_compile_time_secs > MIN_COMPILE_TIME_S:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S)
    logging.info("Persistent compilation cache: %s", path)
    return current_dir()
