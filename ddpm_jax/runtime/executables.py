"""Compiled executables kept on disk, so that a restart neither traces, lowers nor compiles.

    cache = ExecutableCache.default()           # beside JAX's compilation cache; None if off
    step = cached_jit(jax.jit(train_step, ...), "train_step", {"config": ...}, cache, timer)
    state, metrics = step(state, batch)         # 1st call: load from disk, or compile + save

JAX's persistent compilation cache (`runtime.compilation_cache`) saves XLA's compilation only:
every start still traces the Python function and lowers it to StableHLO to compute that
cache's key, seconds for a U-Net's train step. This cache keys a program by what it is made
from instead, known before any tracing:

- `name`, and the caller's `key`: every config field that can change the program
  (`experiment.programs.config_key`) and whatever else the function closes over;
- the signature of the arguments: their pytree structure, shapes, dtypes, weak types and
  shardings (with the mesh's device ids);
- the environment (`environment()`): the versions of jax, jaxlib, flax, optax and numpy, a
  hash of this package's source, the backend, its platform version, the devices, the CPU,
  `XLA_FLAGS` and JAX's configuration options.

An entry is one file, `<directory>/<name>-<hash>.jaxexec`, holding that whole description and
the SHA-256 of its payload (`jax.experimental.serialize_executable`): a file whose description
differs from the expected one (a hash collision), or that is truncated, corrupt or unreadable,
is ignored with a warning and the program compiled again (and the entry rewritten), so that a
bad file never crashes a run nor gives it another program. Files are written atomically; the
oldest are deleted when the directory grows past `MAX_BYTES`.

It lives in `<compilation cache>/ddpm_jax_executables/` and follows that cache's setting
(`--compilation_cache_dir`, `$DDPM_JAX_COMPILATION_CACHE`; off is off). It is off for
multi-process runs (each process would need the others' programs at once; the compilation
cache is off there on CPUs anyway) and for remote cache directories.

What is trusted (`runtime.cache_files`): the cache directory of the user who runs the
command, owned by them and writable by no one else (created with mode 0700). A directory
that is not is neither read nor written (one warning). The cache's own layer is unpickled
with a restricted unpickler (shapes, dtypes, pytree structures); only the executable itself
goes through JAX's own deserialization, a pickle that JAX documents as unsafe for untrusted
input.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import pickle
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax

from ddpm_jax.runtime import compilation_cache
from ddpm_jax.runtime.cache_files import (
    pack,
    read_owned,
    restricted_loads,
    trusted_directory,
    unpack,
    write_file,
)
from ddpm_jax.runtime.program_keys import describe_signature, environment, signature
from ddpm_jax.runtime.startup import StartupTimer

# `resolve(DEFAULT)`: `ExecutableCache.default()`.
DEFAULT = "default"
SUBDIR = "ddpm_jax_executables"
SUFFIX = ".jaxexec"
# The directory's size past which the least recently used entries are deleted.
MAX_BYTES = 2 << 30


class ExecutableCache:
    """A directory of serialized executables, keyed by what the programs are made from.

    An entry's file name hashes (name, key, environment), known before anything is traced,
    so that `prefetch` can load it in a thread while the caller restores its state; the
    arguments' signature, known at the first call, is checked against the one the file
    holds. Saves are written in the same background thread (waited for at exit, or by
    `wait`), so that the first step does not wait for them.

    Args:
      directory: where the entries live (created on the first save).
      env: the environment part of every key; default `environment()` (computed once here).
    """

    def __init__(self, directory: str, env: Mapping[str, Any] | None = None):
        self.directory = directory
        self.env = dict(environment() if env is None else env)
        self._pending: dict[str, concurrent.futures.Future] = {}
        self._saves: list[concurrent.futures.Future] = []
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        # Why the directory is not trusted (then neither read nor written), or None.
        self.untrusted = trusted_directory(directory)
        if self.untrusted:
            logging.warning("Executable cache: not using %s (%s); compiling every program.",
                            directory, self.untrusted)  # fmt: skip

    @classmethod
    def default(cls) -> ExecutableCache | None:
        """The cache beside JAX's persistent compilation cache now in use; None when that is
        off, remote, or this is a multi-process run."""
        base = compilation_cache.current_dir()
        if base is None or "://" in base or jax.process_count() > 1:
            return None
        return cls(os.path.join(base, SUBDIR))

    def entry(self, name: str, key: Mapping[str, Any]) -> str:
        """The text an entry's file name hashes: name, key and environment, as JSON."""
        return json.dumps({"name": name, "key": key, "environment": self.env}, sort_keys=True,
                          default=repr)  # fmt: skip

    def path(self, name: str, key: Mapping[str, Any]) -> str:
        """`<directory>/<name>-<hash of entry()>.jaxexec`."""
        digest = hashlib.sha256(self.entry(name, key).encode()).hexdigest()[:40]
        return os.path.join(self.directory, f"{name}-{digest}{SUFFIX}")

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, "ddpm_jax_executables")
        return self._pool

    def prefetch(self, name: str, key: Mapping[str, Any]) -> None:
        """Starts loading the entry of (name, key), if there is one, in a background thread;
        the `load` of the first call then only waits for what is left."""
        path = self.path(name, key)
        if not self.untrusted and path not in self._pending and os.path.exists(path):
            entry = self.entry(name, key)
            self._pending[path] = self._executor().submit(_read_and_load, path, entry)

    def load(self, name: str, key: Mapping[str, Any], sig: tuple) -> jax.stages.Compiled | None:
        """The executable of (name, key) for arguments of signature `sig`, or None: absent,
        of another signature, or unreadable, corrupt or stale (with a warning)."""
        if self.untrusted:
            return None
        path = self.path(name, key)
        future = self._pending.pop(path, None)
        try:
            header, compiled = (
                future.result() if future else _read_and_load(path, self.entry(name, key))
            )
        except FileNotFoundError:
            return None
        except Exception as e:  # a bad file is a cache miss, never a failed run.
            logging.warning("Executable cache: ignoring %s (%s); compiling again.", path,
                            str(e).splitlines()[0] if str(e) else type(e).__name__)  # fmt: skip
            return None
        if header.get("signature") != describe_signature(sig):
            logging.info("Executable cache: %s was compiled for other arguments; compiling.", path)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: kept when the directory is pruned.
        return compiled

    def save(
        self, name: str, key: Mapping[str, Any], sig: tuple, compiled: jax.stages.Compiled
    ) -> None:
        """Writes `compiled` as the entry of (name, key) for signature `sig`, in the background
        (a program that cannot be serialized, or a directory that cannot be written, is
        logged and skipped)."""
        if self.untrusted:
            return
        header = {"entry": self.entry(name, key), "signature": describe_signature(sig),
                  "devices": _device_ids(compiled)}  # fmt: skip
        path = self.path(name, key)
        self._saves.append(self._executor().submit(self._write, path, header, compiled))

    def save_recompiled(
        self, name: str, key: Mapping[str, Any], sig: tuple, lowered: jax.stages.Lowered
    ) -> None:
        """As `save`, for a program whose executable came from JAX's persistent cache: it is
        compiled again in the background, bypassing that cache, and that copy saved."""
        if self.untrusted:
            return
        header = {"entry": self.entry(name, key), "signature": describe_signature(sig)}
        path = self.path(name, key)
        self._saves.append(self._executor().submit(self._recompile_and_write, path, header,
                                                   lowered))  # fmt: skip

    def _recompile_and_write(self, path: str, header: dict, lowered: jax.stages.Lowered) -> None:
        # An option at its default value: the same program under another key of JAX's cache,
        # which this compilation is not written to, so that XLA compiles it every time.
        options = {"xla_embed_ir_in_executable": False}
        try:
            with _no_persistent_cache_writes(), PersistentCacheHits() as hits:
                compiled = lowered.compile(compiler_options=options)
        except Exception as e:
            logging.info("Executable cache: cannot compile %s again (%s).", path, e)
            return
        if hits.hit:  # where the write could not be prevented: never save a loaded copy.
            logging.info("Executable cache: %s not saved (JAX's cache had its copy).", path)
            return
        self._write(path, {**header, "devices": _device_ids(compiled)}, compiled)

    def wait(self) -> None:
        """Waits for the background saves queued so far."""
        saves, self._saves = self._saves, []
        for future in saves:
            future.result()

    def _write(self, path: str, header: dict, compiled: jax.stages.Compiled) -> None:
        try:
            from jax.experimental import serialize_executable

            serialized, in_tree, out_tree = serialize_executable.serialize(compiled)
            payload = pickle.dumps((serialized, in_tree, out_tree))
        except Exception as e:  # e.g. programs with closed-over constants or host callbacks.
            logging.info("Executable cache: %s cannot be serialized (%s).", path, e)
            return
        if write_file(path, pack(header, payload)):
            self.prune()

    def prune(self, max_bytes: int = MAX_BYTES) -> None:
        """Deletes the least recently used entries while the directory holds over `max_bytes`
        (and the temporary files of writers killed over an hour ago)."""
        try:
            entries = list(os.scandir(self.directory))
            stats = sorted((e.stat().st_mtime, e.stat().st_size, e.path) for e in entries
                           if e.name.endswith(SUFFIX))  # fmt: skip
            stale = [e.path for e in entries if e.name.endswith(".tmp")
                     and e.stat().st_mtime < time.time() - 3600]  # fmt: skip
        except OSError:
            return
        total = sum(size for _, size, _ in stats)
        for _, size, path in stats:
            if total <= max_bytes:
                break
            with contextlib.suppress(OSError):
                os.remove(path)
                total -= size
        for path in stale:
            with contextlib.suppress(OSError):
                os.remove(path)


def _read_entry(path: str, entry: str) -> tuple[bytes, dict]:
    """(payload, header) of the file at `path`, checked whole and holding `entry`; raises
    FileNotFoundError, or ValueError for a file of another entry or a bad one."""
    payload, header = unpack(read_owned(path))
    if header.get("entry") != entry:  # a hash collision, or a file put there by hand.
        raise ValueError("it holds another program")
    return payload, header


def _read_and_load(path: str, entry: str) -> tuple[dict, jax.stages.Compiled]:
    """(header, executable) of the file at `path`, checked whole and of `entry` before it is
    deserialized; raises FileNotFoundError, or ValueError and the like for a bad file."""
    payload, header = _read_entry(path, entry)
    serialized, in_tree, out_tree = restricted_loads(payload)
    by_id = {d.id: d for d in jax.devices()}
    devices = [by_id[i] for i in header["devices"]] if header.get("devices") else None
    from jax.experimental import serialize_executable

    compiled = serialize_executable.deserialize_and_load(
        serialized, in_tree, out_tree, backend=jax.devices()[0].client,
        execution_devices=devices,
    )  # fmt: skip
    return header, compiled


class PersistentCacheHits:
    """Within the block, `hit` turns True when this thread loads an executable from JAX's
    persistent compilation cache (its `cache_hits` monitoring event)."""

    _EVENT = "/jax/compilation_cache/cache_hits"

    def __init__(self):
        self.hit = False
        self._thread = threading.get_ident()

    def _listen(self, event: str, **kwargs: Any) -> None:
        if event == self._EVENT and threading.get_ident() == self._thread:
            self.hit = True

    def __enter__(self) -> PersistentCacheHits:
        self._thread = threading.get_ident()
        jax.monitoring.register_event_listener(self._listen)
        return self

    def __exit__(self, *exc: Any) -> None:
        jax.monitoring.unregister_event_listener(self._listen)


def _no_persistent_cache_writes() -> contextlib.AbstractContextManager:
    """This thread's compilations are not written to JAX's persistent cache (a no-op where
    jax has no thread-local form of the option)."""
    try:
        from jax._src import config as jax_config

        return jax_config.persistent_cache_min_compile_time_secs(1e12)
    except Exception:
        return contextlib.nullcontext()


def resolve(cache: ExecutableCache | str | None) -> ExecutableCache | None:
    """`cache` itself, `ExecutableCache.default()` for `DEFAULT`, or None."""
    if isinstance(cache, str):
        if cache != DEFAULT:
            raise ValueError(f"executable_cache must be an ExecutableCache, None or {DEFAULT!r}.")
        return ExecutableCache.default()
    return cache


def _device_ids(compiled: jax.stages.Compiled) -> list[int] | None:
    """The devices the executable runs on, in its order (None: the backend's, all of them)."""
    unloaded = getattr(compiled._executable, "_unloaded_executable", None)
    devices = getattr(unloaded, "device_list", None)
    return None if devices is None else [d.id for d in devices]


class CachedJit:
    """A jitted function whose executables come from an `ExecutableCache` when they can.

    Called like the function. The first call with a new signature (pytree, shapes, dtypes,
    shardings) loads its executable from the cache, or traces, lowers and compiles it (the
    compilation itself may come from JAX's persistent cache) and saves it; later calls with
    that signature run the executable directly. The phases are timed in `timer`.

    Args:
      fn: a `jax.jit`-wrapped function (its shardings and donations are the executable's).
      name: the program's name in the cache and in logs (letters, digits, `_`).
      key: everything besides the arguments that the program depends on (JSON-able): the
        config's program fields, options the function closes over.
      cache: where executables are kept; None: compile, keep nothing on disk.
      timer: phases `trace`, `lower`, `compile`, `load_executable`, `save_executable`.
    """

    def __init__(
        self,
        fn: Callable,
        name: str,
        key: Mapping[str, Any],
        cache: ExecutableCache | None,
        timer: StartupTimer | None = None,
    ):
        self.fn, self.name, self.key, self.cache = fn, name, dict(key), cache
        self.timer = StartupTimer() if timer is None else timer
        self._compiled: dict[tuple, jax.stages.Compiled] = {}
        # Where each signature's executable came from: "cache" or "compiled" (for tests).
        self.sources: dict[tuple, str] = {}

    def __call__(self, *args):
        sig = signature(args)
        compiled = self._compiled.get(sig)
        if compiled is not None:
            return compiled(*args)
        compiled = self._compiled[sig] = self._get(sig, args)
        start = time.perf_counter()
        with self.timer.phase("run"):  # the first run, waited for, so that it is timed.
            out = jax.block_until_ready(compiled(*args))
        self.timer.program(self.name, run_s=time.perf_counter() - start)
        return out

    def _phase(self, phase: str, fn: Callable, *args: Any) -> Any:
        start = time.perf_counter()
        with self.timer.phase(phase):
            out = fn(*args)
        self.timer.program(self.name, **{f"{phase}_s": time.perf_counter() - start})
        return out

    def _get(self, sig: tuple, args: tuple) -> jax.stages.Compiled:
        if self.cache is not None:
            compiled = self._phase("load_executable", self.cache.load, self.name, self.key, sig)
            if compiled is not None:
                self.sources[sig] = "cache"
                self.timer.program(self.name, source="cache")
                return compiled
        traced = self._phase("trace", self.fn.trace, *args)
        lowered = self._phase("lower", traced.lower)
        with PersistentCacheHits() as hits:
            compiled = self._phase("compile", lowered.compile)
        self.sources[sig] = "compiled"
        self.timer.program(self.name, source="compiled", persistent_cache_hit=hits.hit)
        if self.cache is not None:
            # An executable that JAX's persistent cache loaded serializes without some of its
            # kernels (jaxlib 0.10: "Function ... not found" when the copy runs): only a
            # fresh compilation is saved, made in the background if this one was loaded.
            save = self.cache.save_recompiled if hits.hit else self.cache.save
            self._phase("save_executable", save, self.name, self.key, sig,
                        lowered if hits.hit else compiled)  # fmt: skip
        return compiled


def cached_jit(
    fn: Callable,
    name: str,
    key: Mapping[str, Any],
    cache: ExecutableCache | None,
    timer: StartupTimer | None = None,
) -> Callable:
    """`CachedJit(fn, ...)`, or `fn` itself when there is neither a cache nor a timer."""
    if cache is None and timer is None:
        return fn
    return CachedJit(fn, name, key, cache, timer)


def cached_eval_shape(
    cache: ExecutableCache | None, name: str, key: Mapping[str, Any]
) -> Callable[..., Any]:
    """An `eval_shape(fn, *args)` that keeps its result (shapes and dtypes) in `cache`.

    `jax.eval_shape` traces `fn` (for a train state: the network's initialisation and the
    optimizer's, about a second for a U-Net); this reads the shapes back from an entry keyed
    like an executable's (name, key, environment, the arguments' signature) instead. A bad
    entry is ignored (with a warning) and the shapes traced again. None: `jax.eval_shape`.
    """
    if cache is None or cache.untrusted:
        return jax.eval_shape

    def eval_shape(fn: Callable[..., Any], *args: Any) -> Any:
        path = cache.path(name, key)
        sig = describe_signature(signature(args))
        try:
            payload, header = _read_entry(path, cache.entry(name, key))
            if header.get("signature") != sig:
                raise ValueError("it holds other shapes")
            treedef, leaves = restricted_loads(payload)
            return jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in leaves])
        except FileNotFoundError:
            pass
        except Exception as e:
            logging.warning("Executable cache: ignoring %s (%s); tracing again.", path, e)
        out = jax.eval_shape(fn, *args)
        leaves, treedef = jax.tree.flatten(out)
        try:
            payload = pickle.dumps((treedef, [(tuple(x.shape), x.dtype) for x in leaves]))
        except Exception as e:  # a structure that does not pickle: traced every time.
            logging.info("Executable cache: the shapes of %s cannot be kept (%s).", name, e)
            return out
        write_file(path, pack({"entry": cache.entry(name, key), "signature": sig}, payload))
        return out

    return eval_shape
