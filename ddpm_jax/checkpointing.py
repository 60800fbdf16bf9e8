"""Checkpoints in a workdir: async saves, keep-last-K plus periodic keepers, resume, preemption.

Layout: `<workdir>/checkpoints/<step>/` holds two orbax items,

- `"state"`: the whole training state pytree (step, params, ema_params, opt_state, ...), saved
  with `StandardSave` and restored onto the caller's target shardings;
- `"extra"`: a JSON dict for host-side state (data-iterator position, numpy RNG state, config
  hash, ...).

A subtree of `"state"` (e.g. `ema_params`) can be restored alone with `load_subtree`, without
building the optimizer: a sampling or evaluation job needs only the model.

Atomicity: orbax writes each step into `<step>.orbax-checkpoint-tmp` and renames it to `<step>`
only once every file is written; old steps leave by an atomic rename into
`<workdir>/checkpoints/_deleted/` (removed from there in a background thread), never by an
in-place recursive delete. So a process killed at any moment (even `kill -9`) leaves only
complete step directories visible. Leftover tmp and `_deleted` directories are ignored when
listing steps and removed when the next `Checkpointer` opens the workdir.

A train loop uses this module as::

    ckpt = checkpointing.Checkpointer.from_config(workdir, config.training)
    if ckpt.latest_step() is not None:
        state, extra = ckpt.restore(abstract_state)   # arrays come back in their shardings
    with checkpointing.catch_termination() as term:
        for step in range(first_step, num_steps + 1):
            state, metrics = train_step(state, next(batches))
            stop = ckpt.preempted(step, term)
            ckpt.save(step, state, {"data": iterator_state}, force=stop or step == num_steps)
            if stop:
                break
    ckpt.close()   # waits for the last async save
"""

import concurrent.futures
import contextlib
import json
import logging
import math
import os
import signal
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm_jax import sharding as sharding_lib

CHECKPOINT_SUBDIR = "checkpoints"
STATE_ITEM = "state"
EXTRA_ITEM = "extra"
# Steps to delete are renamed here first: a step directory half removed by a killed
# `rmtree` would otherwise stay visible as a step.
TRASH_SUBDIR = "_deleted"
# Orbax's marker for a step still being written (`<step>.orbax-checkpoint-tmp`).
_TMP_MARKER = ".orbax-checkpoint-tmp"

PyTree = Any

_cpm = ocp.checkpoint_managers


class NonFiniteStateError(ValueError):
    """Raised instead of writing a checkpoint whose state holds NaN or Inf."""


def checkpoint_dir(workdir: str | os.PathLike) -> str:
    """The directory under `workdir` that holds the step directories."""
    return os.fspath(epath.Path(workdir) / CHECKPOINT_SUBDIR)


def _remove(paths: list[epath.Path]) -> None:
    for path in paths:
        try:
            path.rmtree() if path.is_dir() else path.unlink()
        except OSError as e:  # best effort: retried at the next save or restart.
            logging.warning("Could not remove %s: %s", path, e)


def _empty_trash(directory: str) -> None:
    """Removes the steps renamed into the trash subdirectory (primary process only)."""
    trash = epath.Path(directory) / TRASH_SUBDIR
    if jax.process_index() == 0 and trash.exists():
        _remove(list(trash.iterdir()))


def _remove_partial_writes(directory: str) -> None:
    """Removes step directories a killed process left half-written (primary process only).

    Runs before the manager can start a save. Orbax's own clean-up option is not used: it runs
    asynchronously and nothing waits for it when no save follows.
    """
    if jax.process_index() == 0:
        _remove([p for p in epath.Path(directory).iterdir() if _TMP_MARKER in p.name])


def _is_inexact(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    if dtype is None or jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return False
    return jnp.issubdtype(dtype, jnp.inexact)


@jax.jit
def _finite_flags(leaves: list[jax.Array]) -> jax.Array:
    # One fused reduction per leaf and a single small transfer for the whole tree.
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def nonfinite_leaves(tree: PyTree) -> list[str]:
    """Paths (`jax.tree_util.keystr`) of floating-point leaves holding NaN or Inf.

    Integer, boolean and PRNG-key leaves are skipped. Works on sharded (also multi-process)
    `jax.Array`s: the check runs on device and only one boolean per leaf reaches the host.
    """
    paths, device_leaves = [], []
    bad = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if isinstance(leaf, float):
            if not math.isfinite(leaf):
                bad.append(jax.tree_util.keystr(path))
        elif _is_inexact(leaf):
            if isinstance(leaf, jax.Array):
                paths.append(jax.tree_util.keystr(path))
                device_leaves.append(leaf)
            elif not np.all(np.isfinite(np.asarray(leaf, dtype=np.float64))):
                bad.append(jax.tree_util.keystr(path))
    if device_leaves:
        flags = sharding_lib.global_to_host(_finite_flags(device_leaves))
        bad += [p for p, ok in zip(paths, flags, strict=True) if not ok]
    return bad


def all_finite(tree: PyTree) -> bool:
    """True if no floating-point leaf of `tree` holds NaN or Inf."""
    return not nonfinite_leaves(tree)


def _to_json(extra: Mapping[str, Any] | None, step: int) -> dict[str, Any]:
    """Returns `extra` as plain JSON types (numpy scalars and arrays converted)."""
    if extra is None:
        return {}
    if not isinstance(extra, Mapping):
        raise ValueError(f"extra must be a dict of JSON values, got {type(extra).__name__}.")

    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        raise TypeError(f"{type(o).__name__} is not JSON serializable")

    try:
        return json.loads(json.dumps(dict(extra), default=default, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"extra for the checkpoint at step {step} must hold only JSON values (dict, list, "
            f"str, int, finite float, bool, None, numpy scalars/arrays): {e}"
        ) from e


# Orbax splits the write of each replicated array across its replicas. Each split costs an XLA
# compile per leaf shape (about 10 s of a small model's first save on 8 CPU devices) and pays
# off only for large slices, so arrays whose per-replica slice would be smaller are written
# whole by one replica.
_REPLICA_PARALLEL_MIN_BYTES = 4 << 20


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """Handlers of the two items: the state (a pytree of jax.Arrays) and the JSON `extra`."""
    types = ocp.type_handlers.create_type_handler_registry(
        (
            jax.Array,
            ocp.type_handlers.ArrayHandler(
                min_slice_bytes_for_replica_parallel=_REPLICA_PARALLEL_MIN_BYTES
            ),
        ),
        (np.ndarray, ocp.type_handlers.NumpyHandler()),
        (int, ocp.type_handlers.ScalarHandler()),
        (float, ocp.type_handlers.ScalarHandler()),
        (np.number, ocp.type_handlers.ScalarHandler()),
    )
    state_handler = ocp.handlers.PyTreeCheckpointHandler(type_handler_registry=types)
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(STATE_ITEM, ocp.args.PyTreeSave, state_handler)
    registry.add(STATE_ITEM, ocp.args.PyTreeRestore, state_handler)
    registry.add(EXTRA_ITEM, ocp.args.JsonSave, ocp.handlers.JsonCheckpointHandler())
    registry.add(EXTRA_ITEM, ocp.args.JsonRestore, ocp.handlers.JsonCheckpointHandler())
    return registry


def _restore_target(abstract_state: PyTree) -> PyTree:
    """ShapeDtypeStructs with shardings from ShapeDtypeStructs or arrays; errors if unsharded."""

    def to_struct(path, x):
        sharding = getattr(x, "sharding", None)
        if sharding is None:
            raise ValueError(
                f"abstract_state leaf {jax.tree_util.keystr(path)} has no sharding; build the "
                "target with sharding.sharded_abstract(...) or sharding.with_shardings(...) so "
                "that restored arrays land on the mesh."
            )
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(to_struct, abstract_state)


class Checkpointer:
    """An orbax `CheckpointManager` over `<workdir>/checkpoints` with this project's policy.

    Saves are asynchronous: `save` returns once the arrays are copied to host memory (so the
    state may be donated to the next step) and files are written in a background thread. It
    is collective: in a multi-process run every process makes the same calls.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        save_every_steps: int,
        keep_last: int = 3,
        keep_period: int | None = None,
        async_save: bool = True,
    ):
        """Opens (creating if needed) the checkpoint directory of `workdir`.

        Args:
          workdir: the run's workdir; checkpoints go to `<workdir>/checkpoints`.
          save_every_steps: `save` writes at steps divisible by this (and when forced, or at a
            preemption sync point).
          keep_last: how many of the most recent checkpoints to keep.
          keep_period: also keep forever every checkpoint whose step is divisible by this;
            None or 0 disables.
          async_save: write in a background thread (False: `save` blocks until written).
        """
        if not isinstance(save_every_steps, int) or save_every_steps < 1:
            raise ValueError(
                f"save_every_steps (training.checkpoint_every_steps) must be an int >= 1, got "
                f"{save_every_steps!r}."
            )
        if not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(
                f"keep_last (training.keep_checkpoints) must be an int >= 1, got {keep_last!r}."
            )
        if keep_period is not None and (not isinstance(keep_period, int) or keep_period < 0):
            raise ValueError(
                f"keep_period (training.keep_period) must be None or an int >= 0, got "
                f"{keep_period!r}."
            )
        self.directory = checkpoint_dir(workdir)
        preserve = [_cpm.LatestN(keep_last)]
        if keep_period:
            preserve.append(_cpm.EveryNSteps(keep_period))
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=_cpm.AnySavePolicy(
                [_cpm.FixedIntervalPolicy(save_every_steps), _cpm.PreemptionCheckpointingPolicy()]
            ),
            preservation_policy=_cpm.AnyPreservationPolicy(preserve),
            todelete_subdir=TRASH_SUBDIR,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, handler_registry=_handler_registry()
        )
        # Synchronous, before any save: no new write or rename can race with a stale entry.
        _remove_partial_writes(self.directory)
        _empty_trash(self.directory)
        self._trash_pool = concurrent.futures.ThreadPoolExecutor(1, "ckpt_trash")
        self._trash_job: concurrent.futures.Future | None = None

    @classmethod
    def from_config(cls, workdir: str | os.PathLike, training_config: Any) -> "Checkpointer":
        """Builds from `config.training` (`checkpoint_every_steps`, `keep_checkpoints`,
        `keep_period`)."""
        return cls(
            workdir,
            save_every_steps=int(training_config.checkpoint_every_steps),
            keep_last=int(training_config.keep_checkpoints),
            keep_period=training_config.get("keep_period", None),
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None if there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints kept, ascending."""
        return sorted(self._manager.all_steps())

    def reached_preemption(self, step: int) -> bool:
        """True when all processes reached the JAX preemption sync point at `step`.

        Only fires in multi-process runs under `jax.distributed` (its preemption service
        watches SIGTERM there); every process must call it at every step.
        """
        return self._manager.reached_preemption(step)

    def preempted(self, step: int, flag: "TerminationFlag | None" = None) -> bool:
        """True if the run should save and stop now: a local termination signal was caught
        (`flag` from `catch_termination`), or the multi-process preemption sync point is
        reached."""
        return (flag is not None and flag.is_set()) or self.reached_preemption(step)

    def should_save(self, step: int) -> bool:
        """True if `save(step, ...)` without `force` would write a checkpoint."""
        latest = self._manager.latest_step()
        if latest is not None and step <= latest:
            return False
        return self._manager.should_save(step)

    def save(
        self,
        step: int,
        state: PyTree,
        extra: Mapping[str, Any] | None = None,
        *,
        force: bool = False,
    ) -> bool:
        """Starts an async save of `state` and `extra` at `step` if the policy says so.

        Args:
          step: the training step the state belongs to (the number of updates applied).
          state: pytree of `jax.Array`s (any sharding) and numpy arrays.
          extra: JSON-able dict of host-side state; numpy scalars/arrays are converted.
          force: save even if `step` is not on the save interval (final step, preemption).

        Returns:
          True if a save was started; False if the policy skipped the step or a checkpoint at
          `step` or later already exists.

        Raises:
          NonFiniteStateError: if a floating-point leaf holds NaN or Inf (nothing is written).
          ValueError: if `extra` is not JSON-able.
        """
        step = int(step)
        latest = self._manager.latest_step()
        if latest is not None and step <= latest:
            if force:
                logging.info("Checkpoint at step %d skipped: step %d exists.", step, latest)
            return False
        if not force and not self._manager.should_save(step):
            return False
        extra_json = _to_json(extra, step)
        bad = nonfinite_leaves(state)
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise NonFiniteStateError(
                f"Refusing to save the checkpoint at step {step}: non-finite values (NaN/Inf) in "
                f"{shown}. The last good checkpoint is step {latest}."
            )
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    STATE_ITEM: ocp.args.PyTreeSave(state),
                    EXTRA_ITEM: ocp.args.JsonSave(extra_json),
                }
            ),
            force=True,
        )
        if saved:
            logging.info("Saving checkpoint at step %d to %s.", step, self.directory)
        # The previous save's finalization (which moves old steps to the trash) is done by now.
        if self._trash_job is None or self._trash_job.done():
            self._trash_job = self._trash_pool.submit(_empty_trash, self.directory)
        return saved

    def restore(
        self, abstract_state: PyTree, step: int | None = None
    ) -> tuple[PyTree, dict[str, Any]]:
        """Restores the state at `step` (default: the latest) onto the target's shardings.

        Args:
          abstract_state: the target: a pytree of `jax.ShapeDtypeStruct` with `.sharding`
            (from `sharding.sharded_abstract`), or of `jax.Array`s whose shardings are used.
            Its structure, shapes and dtypes must match the saved state.
          step: the step to restore; None for the latest.

        Returns:
          `(state, extra)`: the state with the structure and shardings of `abstract_state`,
          and the `extra` dict saved with it.

        Raises:
          FileNotFoundError: if there is no complete checkpoint (or none at `step`).
        """
        step = self._resolve_step(step)
        target = _restore_target(abstract_state)
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    STATE_ITEM: ocp.args.PyTreeRestore(
                        item=target,
                        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    ),
                    EXTRA_ITEM: ocp.args.JsonRestore(),
                }
            ),
        )
        return out[STATE_ITEM], dict(out[EXTRA_ITEM] or {})

    def _resolve_step(self, step: int | None) -> int:
        steps = self._manager.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"No complete checkpoint in {self.directory}.")
            return max(steps)
        if step not in steps:
            raise FileNotFoundError(
                f"No checkpoint at step {step} in {self.directory}; kept steps: {sorted(steps)}."
            )
        return int(step)

    def wait_until_finished(self) -> None:
        """Blocks until pending async saves and removals of old steps are done."""
        self._manager.wait_until_finished()
        if self._trash_job is not None:
            self._trash_job.result()
        _empty_trash(self.directory)

    def close(self) -> None:
        """Waits for pending saves and removals, and releases the manager's threads."""
        self._manager.close()
        self._trash_pool.shutdown(wait=True)
        _empty_trash(self.directory)

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def latest_step(workdir: str | os.PathLike) -> int | None:
    """The newest complete checkpoint step in `workdir`, or None (reads only)."""
    directory = checkpoint_dir(workdir)
    if not epath.Path(directory).exists():
        return None
    manager = _read_only_manager(directory)
    try:
        return manager.latest_step()
    finally:
        manager.close()


def _read_only_manager(
    directory: str, registry: ocp.handlers.CheckpointHandlerRegistry | None = None
) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    return ocp.CheckpointManager(directory, options=options, handler_registry=registry)


def load_subtree(
    workdir: str | os.PathLike,
    key: str = "ema_params",
    abstract: PyTree | None = None,
    *,
    step: int | None = None,
    sharding: jax.sharding.Sharding | None = None,
) -> PyTree:
    """Restores one top-level field of the saved state (e.g. `ema_params`) and nothing else.

    No optimizer or train state needs to be built: a sampling job calls
    `load_subtree(workdir, "ema_params")` and gets the parameter pytree.

    Args:
      workdir: the training run's workdir.
      key: the field of the saved state: an attribute of a dataclass state or a dict key.
      abstract: optional target for the subtree (ShapeDtypeStructs or arrays); leaves without
        a sharding get `sharding`. Default: shapes and dtypes from the checkpoint's metadata.
      step: which checkpoint; default the latest.
      sharding: sharding for leaves that have none; default replicated over all devices.

    Returns:
      The subtree, as saved (nested dicts of `jax.Array`), on `sharding`.

    Raises:
      FileNotFoundError: no checkpoint in `workdir` (or none at `step`).
      KeyError: `key` is not a top-level field of the saved state.
    """
    directory = checkpoint_dir(workdir)
    if not epath.Path(directory).exists():
        raise FileNotFoundError(f"No checkpoint directory {directory}.")
    if sharding is None:
        sharding = NamedSharding(sharding_lib.make_mesh(), P())
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(STATE_ITEM, ocp.args.PyTreeRestore, ocp.handlers.PyTreeCheckpointHandler)
    registry.add(EXTRA_ITEM, ocp.args.JsonRestore, ocp.handlers.JsonCheckpointHandler)
    manager = _read_only_manager(directory, registry)
    try:
        steps = sorted(manager.all_steps())
        step = (steps[-1] if steps else None) if step is None else int(step)
        if step is None or step not in steps:
            raise FileNotFoundError(
                f"No checkpoint {'' if step is None else f'at step {step} '}in {directory}; "
                f"kept steps: {steps}."
            )
        if abstract is None:
            tree = manager.item_metadata(step)[STATE_ITEM].tree
            if not isinstance(tree, Mapping) or key not in tree:
                fields = sorted(tree) if isinstance(tree, Mapping) else []
                raise KeyError(f"{key!r} is not a field of the saved state; fields: {fields}.")
            abstract = tree[key]

        def to_struct(x):
            s = getattr(x, "sharding", None)
            s = s if isinstance(s, jax.sharding.Sharding) else sharding
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

        target = {key: jax.tree.map(to_struct, abstract)}
        out = manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    STATE_ITEM: ocp.args.PyTreeRestore(
                        item=target,
                        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                        partial_restore=True,
                    )
                }
            ),
        )
    finally:
        manager.close()
    return out[STATE_ITEM][key]


class TerminationFlag:
    """Set by `catch_termination`'s signal handler; read by the train loop."""

    def __init__(self):
        self._event = threading.Event()
        self.signum: int | None = None

    def set(self, signum: int | None = None) -> None:
        """Marks termination as requested (the signal handler's action; also for tests)."""
        self.signum = signum
        self._event.set()

    def is_set(self) -> bool:
        """True once a watched signal has arrived."""
        return self._event.is_set()


@contextlib.contextmanager
def catch_termination(
    signals: Sequence[int] = (signal.SIGTERM,),
) -> Iterator[TerminationFlag]:
    """Turns termination signals into a flag the train loop polls, for a clean save-and-exit.

    Inside the context, a watched signal no longer kills the process: it sets the yielded
    `TerminationFlag`, and the loop saves a final checkpoint and returns. On exit the previous
    handlers are restored. The only global state touched is the process's signal disposition,
    which the context owns while it is open; the flag lives in the handler's closure.

    In a multi-process run (`jax.process_count() > 1`) nothing is installed and the flag never
    sets: processes must stop at the same step, and JAX's preemption service (which owns
    SIGTERM under `jax.distributed`) provides that step through
    `Checkpointer.reached_preemption`.

    Must be entered from the main thread (a Python rule for signal handlers).
    """
    flag = TerminationFlag()
    if jax.process_count() > 1:
        yield flag
        return
    if threading.current_thread() is not threading.main_thread():
        raise ValueError("catch_termination must be entered from the main thread.")

    def handler(signum, frame):
        del frame
        logging.warning("Caught signal %d: saving a checkpoint and stopping.", signum)
        flag.set(signum)

    previous = {}
    try:
        for s in signals:
            previous[s] = signal.signal(s, handler)
        yield flag
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
