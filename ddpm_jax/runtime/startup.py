"""The phases of a command's start, timed: wall and CPU seconds, written as JSON when asked.

    timer = StartupTimer("/tmp/startup.json")        # StartupTimer() records, writes nothing
    with timer.phase("restore"):
        state = restore(...)
    timer.event("first_step")                          # an instant, e.g. the first step's row
    timer.write()

A command creates one timer and passes it down to what it runs (`train.loop.train(...,
timer=...)`, `TrainedModel.from_config(..., timer=...)`); nothing reads it from global state.
`ddpm-jax --startup_json=PATH` writes the file, which `ddpm-jax-restart` reads to put each
phase of a start in its table. Every phase records its start as a Unix time (so that a parent
process can place it after its own launch time), its wall seconds and the CPU seconds of the
whole process during it (user + system, all threads: on a loaded machine the wall time
grows with the load, the CPU time much less). Phases of the same name add up (the train
step's lowering and the bound estimate's each count in `lower`), and they may nest.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from ddpm_jax import files

T = TypeVar("T")

# The phase names the commands use, in the order of a start (`ddpm-jax-restart` orders its
# columns by this; other names follow in the order they first occur).
PHASES = (
    "imports",  # the interpreter, the command's imports and its flags (parent-measured)
    "config",  # the config parsed and checked, the workdir checked
    "jax_init",  # XLA flags, the compilation cache, JAX's backend and devices
    "imports_mode",  # the mode's own imports (training: flax, optax, orbax, grain, ...)
    "data",  # the dataset opened, the input pipeline built, the first batch
    "init",  # the network and its state's shapes and shardings (traced, not run)
    "restore",  # the checkpoint restored (or a fresh state initialised)
    "trace",  # jit tracing of the compiled programs
    "lower",  # lowering them to StableHLO
    "compile",  # XLA compilation, or loading from JAX's persistent compilation cache
    "load_executable",  # a serialized executable loaded from the executable cache
    "save_executable",  # a compiled executable written to the executable cache
    "run",  # the programs' first runs (one step, the bound estimate; a sample chunk)
    "write",  # the outputs of a sampling or evaluation command written
)


class StartupTimer:
    """Wall and CPU seconds of named phases, and named events, of one process's start.

    Args:
      path: where `write` puts the JSON (atomically); None: record only.
    """

    def __init__(self, path: str | None = None):
        self.path = path
        self.created = time.time()
        self.phases: dict[str, dict[str, float]] = {}
        self.events: dict[str, float] = {}
        self.snapshots: dict[str, dict[str, dict[str, float]]] = {}
        # Per compiled program: where its executable came from and its phases' wall seconds.
        self.programs: dict[str, dict[str, Any]] = {}
        self._open: list[str] = []

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Times the block as phase `name` (added to earlier phases of that name).

        A phase inside another of the same name counts once (the outer one).
        """
        if name in self._open:
            yield
            return
        self._open.append(name)
        start, wall, cpu = time.time(), time.perf_counter(), _cpu_seconds()
        try:
            yield
        finally:
            self._open.remove(name)
            entry = self.phases.setdefault(name, {"start": start, "wall_s": 0.0, "cpu_s": 0.0})
            entry["wall_s"] += time.perf_counter() - wall
            entry["cpu_s"] += _cpu_seconds() - cpu

    def call(self, name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)`, timed as phase `name`."""
        with self.phase(name):
            return fn(*args, **kwargs)

    def program(self, name: str, **values: Any) -> None:
        """Records facts of the compiled program `name` (e.g. source="cache", run_s=0.4);
        seconds of a phase add up."""
        entry = self.programs.setdefault(name, {})
        for k, v in values.items():
            entry[k] = entry.get(k, 0.0) + v if k.endswith("_s") else v

    def event(self, name: str) -> None:
        """Records the Unix time of `name` (the first time only), and the phases so far
        (`snapshots[name]`: what the start spent before it)."""
        if name not in self.events:
            self.events[name] = time.time()
            self.snapshots[name] = {k: dict(v) for k, v in self.phases.items()}

    def as_dict(self) -> dict[str, Any]:
        """{"pid", "created", "phases": {name: {"start", "wall_s", "cpu_s"}}, "events":
        {name: time}, "snapshots": {event: phases then}, "programs": {program: {"source",
        "<phase>_s", ...}}}."""
        return {"pid": os.getpid(), "created": self.created,
                "phases": {k: dict(v) for k, v in self.phases.items()},
                "events": dict(self.events), "snapshots": self.snapshots,
                "programs": {k: dict(v) for k, v in self.programs.items()}}  # fmt: skip

    def write(self) -> None:
        """Writes `as_dict()` to `path` (nothing when `path` is None)."""
        if self.path:
            files.write_json(self.path, self.as_dict(), sort_keys=False)


class TimedFirst:
    """An iterator whose first `next` is timed as phase `name` of `timer` (the first batch of
    an input pipeline: its workers start then); `close` closes the wrapped one."""

    def __init__(self, iterator: Any, timer: StartupTimer, name: str):
        self._it, self._timer, self._name, self._first = iterator, timer, name, True

    def __iter__(self) -> TimedFirst:
        return self

    def __next__(self) -> Any:
        if self._first:
            self._first = False
            return self._timer.call(self._name, next, self._it)
        return next(self._it)

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process, all threads (XLA compiles on several)."""
    t = os.times()
    return t.user + t.system
