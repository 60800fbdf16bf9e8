"""Device mesh, shardings, and host-local <-> global arrays.

One code path for every scale: `jax.jit` with `NamedSharding`s over a 1-D device `Mesh` whose
single axis `"data"` spans every device of every process. The batch is sharded on its leading
dimension over that axis. The training state is replicated, or, with FSDP, each large leaf is
sharded along one of its dimensions over the same axis (XLA inserts the all-gathers and
reduce-scatters).

A train loop uses this module as::

    mesh = sharding.make_mesh(config.mesh)
    sharding.validate_batch_size(config.training.batch_size, mesh)
    abstract = sharding.sharded_abstract(init_fn, mesh, key, fsdp=config.mesh.fsdp)
    state = sharding.init_sharded(init_fn, abstract, key)   # born sharded, never on one device
    step_fn = jax.jit(train_step,
                      in_shardings=(sharding.shardings_of(abstract), sharding.batch_sharding(mesh)),
                      out_shardings=(sharding.shardings_of(abstract), sharding.replicated(mesh)),
                      donate_argnums=0)
    batch = sharding.host_to_global(local_numpy_batch, mesh)   # each process feeds its own shard
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
# Leaves with fewer elements than this stay replicated under FSDP: gathering many tiny arrays
# costs more in collective latency than their replicas cost in memory (2**18 float32 = 1 MiB).
DEFAULT_FSDP_MIN_SIZE = 2**18

PyTree = Any


def make_mesh(config_mesh: Any = None, devices: Sequence[Any] | None = None) -> Mesh:
    """Builds the 1-D device mesh with axis `"data"` over all devices of all processes.

    The axis is `AxisType.Auto`: shardings are given at the `jax.jit` boundary and XLA
    propagates them through the computation, so model code needs no sharding annotations.

    Args:
      config_mesh: the `config.mesh` group (a ConfigDict or mapping) or None. The mesh is 1-D
        whatever it holds (`fsdp` decides parameter placement, see `state_shardings`); the
        argument keeps the call site stable if model-parallel axes are added.
      devices: devices to use, in mesh order; default `jax.devices()` (every process's devices).

    Returns:
      A `jax.sharding.Mesh` of shape `(num_devices,)` with axis name `"data"`.
    """
    del config_mesh  # Read by `state_shardings` callers (`fsdp`), not by the mesh itself.
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices is empty; pass None to use jax.devices().")
    return jax.make_mesh((len(devices),), (DATA_AXIS,), (AxisType.Auto,), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch: leading dimension split over `"data"`, other dimensions whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of an array with a full copy on every device of `mesh`."""
    return NamedSharding(mesh, P())


def fsdp_spec(shape: Sequence[int], num_shards: int, min_size: int = DEFAULT_FSDP_MIN_SIZE) -> P:
    """PartitionSpec that shards one dimension of an array of `shape` over `"data"`.

    The dimension is the largest one divisible by `num_shards` (the last of equal sizes, which
    for dense `(in, out)` and conv `(h, w, in, out)` kernels is the output features). Arrays
    with fewer than `min_size` elements, scalars, and arrays with no divisible dimension are
    replicated (`P()`).
    """
    if num_shards <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    best = None
    for axis, size in enumerate(shape):
        if size % num_shards == 0 and (best is None or size >= shape[best]):
            best = axis
    if best is None:
        return P()
    return P(*([None] * best), DATA_AXIS)


def state_shardings(
    mesh: Mesh, abstract_state: PyTree, fsdp: bool = False, min_size: int = DEFAULT_FSDP_MIN_SIZE
) -> PyTree:
    """`NamedSharding` for every leaf of a state pytree.

    Args:
      mesh: the mesh from `make_mesh`.
      abstract_state: pytree whose leaves have `.shape` (`jax.ShapeDtypeStruct` from
        `jax.eval_shape`, or arrays); leaves without a shape (Python scalars) are replicated.
      fsdp: if False every leaf is replicated. If True each leaf with at least `min_size`
        elements is sharded along its largest dimension divisible by the mesh size (see
        `fsdp_spec`); parameters and their optimizer moments get the same layout.
      min_size: FSDP threshold in elements.

    Returns:
      A pytree of `NamedSharding` with the structure of `abstract_state`.
    """
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}.")
    n = mesh.shape[DATA_AXIS]

    def leaf_sharding(leaf):
        shape = getattr(leaf, "shape", None)
        if not fsdp or shape is None:
            return replicated(mesh)
        return NamedSharding(mesh, fsdp_spec(tuple(shape), n, min_size))

    return jax.tree.map(leaf_sharding, abstract_state)


def with_shardings(abstract_state: PyTree, shardings: PyTree) -> PyTree:
    """Attaches `shardings` to an abstract state: a pytree of `ShapeDtypeStruct(..., sharding=)`.

    This is the target that `checkpointing.Checkpointer.restore` restores onto. `shardings`
    is a pytree of shardings matching `abstract_state`, or one sharding for every leaf.
    """
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, abstract_state)
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )


def sharded_abstract(
    init_fn: Callable[..., PyTree],
    mesh: Mesh,
    *args: Any,
    fsdp: bool = False,
    min_size: int = DEFAULT_FSDP_MIN_SIZE,
    eval_shape: Callable[..., PyTree] = jax.eval_shape,
) -> PyTree:
    """Shapes, dtypes and target shardings of `init_fn(*args)`, computed without running it.

    `eval_shape(init_fn, *args)` gives the shapes (`runtime.executables.cached_eval_shape`
    reads them from disk instead of tracing).

    Returns:
      A pytree of `jax.ShapeDtypeStruct` with `.sharding` set (see `state_shardings`).
    """
    abstract = eval_shape(init_fn, *args)
    return with_shardings(abstract, state_shardings(mesh, abstract, fsdp=fsdp, min_size=min_size))


def shardings_of(tree: PyTree) -> PyTree:
    """The `.sharding` of every leaf (of a `sharded_abstract` tree or of `jax.Array`s)."""
    return jax.tree.map(lambda x: x.sharding, tree)


def init_sharded(init_fn: Callable[..., PyTree], abstract: PyTree, *args: Any) -> PyTree:
    """Runs `init_fn(*args)` under jit so that each leaf is created directly in its sharding.

    A large model is never materialised on one device. `abstract` is from `sharded_abstract`.
    """
    return jax.jit(init_fn, out_shardings=shardings_of(abstract))(*args)


def host_to_global(batch_local: PyTree, mesh: Mesh) -> PyTree:
    """Assembles each process's local batch into global arrays sharded over `"data"`.

    Every process calls this with its own shard; the global batch is the concatenation of the
    process-local batches in process order.

    Args:
      batch_local: pytree of numpy arrays of shape `[local_batch, ...]`, where `local_batch`
        is this process's share of the global batch and divisible by its local device count.
      mesh: the mesh from `make_mesh`.

    Returns:
      A pytree of `jax.Array` of shape `[local_batch * process_count, ...]` with
      `batch_sharding(mesh)`.
    """
    sharding = batch_sharding(mesh)
    num_local = len(mesh.local_devices)

    def to_global(x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] % num_local:
            raise ValueError(
                f"host_to_global: local batch leaf of shape {x.shape} must have a leading "
                f"dimension divisible by this process's {num_local} devices; choose "
                "training.batch_size divisible by the device count (see validate_batch_size)."
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(to_global, batch_local)


def global_to_host(tree: PyTree) -> PyTree:
    """Gathers (possibly multi-process) global arrays into full numpy arrays on every process.

    Collective when any leaf spans processes: every process must call it with the same tree.
    Use it for samples and metrics, never for per-step training state.

    Returns:
      A pytree of `np.ndarray` holding the full global values.
    """

    def to_host(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(to_host, tree)


def global_replicated(tree: PyTree, mesh: Mesh) -> PyTree:
    """Host values identical on every process -> global arrays replicated over `mesh`."""

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, replicated(mesh), lambda idx: x[idx])

    return jax.tree.map(put, tree)


def from_process_0(value: np.ndarray) -> np.ndarray:
    """Process 0's `value` on every process (a collective in multi-process runs)."""
    if jax.process_count() == 1:
        return value
    return np.asarray(multihost_utils.broadcast_one_to_all(value))


def validate_batch_size(
    global_batch: int,
    mesh_or_num_devices: Mesh | int,
    process_count: int | None = None,
    field: str = "training.batch_size",
) -> int:
    """Checks that a global batch splits evenly over devices and processes.

    Args:
      global_batch: the global batch size (over all devices and processes).
      mesh_or_num_devices: the mesh, or the total number of devices.
      process_count: number of processes; default `jax.process_count()`.
      field: config field named in the error message.

    Returns:
      The per-process batch size, `global_batch // process_count`.

    Raises:
      ValueError: naming `field` and a valid value when the batch does not divide evenly.
    """
    if isinstance(mesh_or_num_devices, Mesh):
        num_devices = mesh_or_num_devices.devices.size
    else:
        num_devices = int(mesh_or_num_devices)
    process_count = jax.process_count() if process_count is None else int(process_count)
    if num_devices < 1 or process_count < 1:
        raise ValueError(
            f"num_devices ({num_devices}) and process_count ({process_count}) must be >= 1."
        )
    if isinstance(global_batch, bool) or not isinstance(global_batch, int | np.integer):
        raise ValueError(f"{field} must be an integer, got {global_batch!r}.")
    multiple = int(np.lcm(num_devices, process_count))
    if global_batch < 1 or global_batch % multiple:
        lower = max(multiple, global_batch // multiple * multiple)
        upper = (max(global_batch, 0) // multiple + 1) * multiple
        hint = f"{lower}" if lower == upper else f"{lower} or {upper}"
        raise ValueError(
            f"{field}={global_batch} must be a positive multiple of {multiple} to split evenly "
            f"over {num_devices} devices in {process_count} process(es); set {field} to a "
            f"multiple of {multiple}, e.g. {hint}."
        )
    return global_batch // process_count
