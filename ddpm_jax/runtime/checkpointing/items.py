"""The two items of a checkpoint, their handlers, and the checks a state passes on the way.

`"state"` is the whole training state pytree (step, params, ema_params, opt_state, ...) and
`"extra"` a JSON dict of host-side state (the data position, ...). A state with NaN/Inf is
never written; a target whose structure or shapes differ from the saved state is refused with
the leaves named, before orbax is asked to restore it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from ddpm_jax.errors import WorkdirError
from ddpm_jax.runtime import sharding as sharding_lib

PyTree = Any

STATE_ITEM = "state"
EXTRA_ITEM = "extra"

cpm = ocp.checkpoint_managers  # the save-decision and preservation policies


class CheckpointSaveError(WorkdirError):
    """An asynchronous save failed (a full disk, a lost mount, ...); the run must stop."""


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


def to_json(extra: Mapping[str, Any] | None, step: int) -> dict[str, Any]:
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


def handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
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


def restore_target(abstract_state: PyTree) -> PyTree:
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


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def sync_processes(name: str) -> None:
    """A barrier between the processes of a multi-process run (nothing in a single one)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _key_name(entry: Any) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _shapes_by_path(tree: PyTree) -> dict[str, tuple[int, ...] | None]:
    """{"params/conv_in/kernel": shape} of a state, of its target, or of its saved metadata.

    Typed PRNG keys map to None: they are saved as their raw data, of another shape.
    """
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
    out = {}
    for path, leaf in leaves:
        dtype = getattr(leaf, "dtype", None)
        is_key = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
        shape = None if is_key else tuple(getattr(leaf, "shape", ()))
        out["/".join(_key_name(k) for k in path)] = shape
    return out


def check_structure(target: PyTree, saved: PyTree, step: int, directory: str) -> None:
    """Raises `WorkdirError` naming the leaves where `target` and the checkpoint differ."""
    want, have = _shapes_by_path(target), _shapes_by_path(saved)
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    shapes = sorted(
        k for k in set(want) & set(have) if None not in (want[k], have[k]) and want[k] != have[k]
    )
    if not (missing or extra or shapes):
        return
    parts = []
    if shapes:
        shown = ", ".join(f"{k} {have[k]} saved, {want[k]} now" for k in shapes[:4])
        parts.append(
            f"{len(shapes)} leaves differ in shape ({shown}{', ...' if len(shapes) > 4 else ''})"
        )
    for what, keys in (("missing from the checkpoint", missing), ("not in this model", extra)):
        if keys:
            parts.append(
                f"{len(keys)} {what} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})"
            )
    raise WorkdirError(
        f"The checkpoint at step {step} in {directory} holds another model than this config "
        f"builds: {'; '.join(parts)}. Use the config it was trained with, or another --workdir."
    )
