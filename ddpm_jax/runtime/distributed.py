"""Multi-process runtime: decide whether (and how) to call `jax.distributed.initialize`.

Every process of a run executes the same command; this module turns the launcher's
environment into the arguments of `jax.distributed.initialize`. Detection order:

1. ``DDPM_JAX_DISTRIBUTED``: ``off`` never initializes (one process, whatever else is set);
   ``auto`` calls ``jax.distributed.initialize()`` with no arguments so that JAX's own
   detection runs (Cloud TPU VM pods read the GCE metadata server, which no environment
   variable mirrors; `launch/tpu_vm_pod.sh` sets it).
2. Explicit contract: ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0),
   ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` and optionally ``JAX_LOCAL_DEVICE_IDS``
   (comma-separated ordinals), as set by `launch/multinode_gpu.sh` and
   `launch/local_multiprocess.sh`.
3. Open MPI (``mpirun``): ``OMPI_COMM_WORLD_SIZE`` > 1.
4. SLURM job step (``srun``): ``SLURM_JOB_ID``, ``SLURM_NTASKS`` > 1, ``SLURM_PROCID``,
   ``SLURM_LOCALID`` and ``SLURM_STEP_NODELIST``, the variables JAX's own SLURM
   detection requires (a batch script or ``salloc`` shell without ``srun`` is one process).
5. Cloud TPU on GKE: ``TPU_WORKER_HOSTNAMES`` (or ``TPU_PROCESS_ADDRESSES``) naming more
   than one host, or ``MEGASCALE_NUM_SLICES`` > 1; JAX detects the rest.

For Open MPI and SLURM every argument is resolved here, with the same coordinator rule as
JAX (first host, port ``JAX_COORDINATOR_PORT`` or one derived from the job id), and JAX's
detection is switched off. The reason is the device assignment: JAX's SLURM/Open MPI
detection restricts each process to the one GPU numbered by its local rank, which would
leave 7 of 8 GPUs idle under the one-task-per-node layout of `launch/slurm_gpu.sbatch`.
Here a process that is alone on its node keeps all visible devices.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping

_log = logging.getLogger(__name__)

MODE_VAR = "DDPM_JAX_DISTRIBUTED"
_MODES = ("", "auto", "off")

# Port range JAX derives coordinator ports from: the top 2**12 ephemeral ports.
_PORT_SPAN = 2**12
_PORT_BASE = 65535 - _PORT_SPAN + 1


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """How this process joins a multi-process run.

    Attributes:
      source: where the spec came from: "explicit", "ompi", "slurm", "tpu" or "auto".
      coordinator_address: "host:port" of the coordinator service run by process 0; None
        leaves it (and every other None field) to JAX's cluster detection.
      num_processes: number of processes in the run (> 1), or None.
      process_id: this process's index in [0, num_processes), or None.
      local_device_ids: accelerator ordinals this process may use; None means all that
        are visible to it.
    """

    source: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None

    @property
    def resolved(self) -> bool:
        """True when every argument is known here and JAX's detection is bypassed."""
        return self.coordinator_address is not None

    def initialize_kwargs(self) -> dict:
        """Keyword arguments for `jax.distributed.initialize`."""
        if not self.resolved:
            return {}
        return dict(
            coordinator_address=self.coordinator_address,
            num_processes=self.num_processes,
            process_id=self.process_id,
            local_device_ids=list(self.local_device_ids) if self.local_device_ids else None,
            cluster_detection_method="deactivate",
        )


def _get(environ: Mapping[str, str], name: str) -> str | None:
    """Returns the stripped value of `name`, or None when unset or empty."""
    value = environ.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def _int(environ: Mapping[str, str], name: str, *, minimum: int = 0) -> int | None:
    """Parses an integer variable; raises ValueError naming it when malformed."""
    value = _get(environ, name)
    if value is None:
        return None
    try:
        parsed = int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer.") from None
    if parsed < minimum:
        raise ValueError(f"{name}={parsed} must be >= {minimum}.")
    return parsed


def _require_int(environ: Mapping[str, str], name: str, why: str, *, minimum: int = 0) -> int:
    value = _int(environ, name, minimum=minimum)
    if value is None:
        raise ValueError(f"{name} is not set, but {why}; set {name} as well.")
    return value


def _check_process_id(process_id: int, num_processes: int, id_var: str, num_var: str) -> None:
    if not 0 <= process_id < num_processes:
        raise ValueError(
            f"{id_var}={process_id} is out of range for {num_var}={num_processes}: "
            f"process ids run from 0 to {num_processes - 1}."
        )


def _check_address(address: str, name: str) -> str:
    """Validates "host:port" (IPv6 hosts in brackets)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"{name}={address!r} must be 'host:port' with a port in 1..65535, "
            "e.g. '10.0.0.1:12345' (the address of process 0)."
        )
    return address


def _local_device_ids(environ: Mapping[str, str]) -> tuple[int, ...] | None:
    value = _get(environ, "JAX_LOCAL_DEVICE_IDS")
    if value is None:
        return None
    try:
        ids = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise ValueError(
            f"JAX_LOCAL_DEVICE_IDS={value!r} must be comma-separated integers, e.g. '0,1,2,3'."
        ) from None
    if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"JAX_LOCAL_DEVICE_IDS={value!r} must list distinct ordinals >= 0.")
    return ids


def _devices_for_local_rank(
    environ: Mapping[str, str], local_rank: int, tasks_on_node: int | None
) -> tuple[int, ...] | None:
    """Device ordinals of one process among `tasks_on_node` processes on its node.

    Alone on its node, a process keeps every visible device. Several processes that all
    see the same devices take one each, by local rank (JAX's own rule). When the launcher
    already gave each process fewer devices than there are processes (SLURM
    ``--gpus-per-task``), the process keeps what it sees.
    """
    explicit = _local_device_ids(environ)
    if explicit is not None:
        return explicit
    if tasks_on_node is not None and tasks_on_node <= 1:
        return None
    for var in ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES"):
        visible = _get(environ, var)
        if visible is not None and tasks_on_node is not None:
            if len(visible.split(",")) < tasks_on_node:
                return None
    return (local_rank,)


def _explicit(environ: Mapping[str, str]) -> ClusterSpec | None:
    why = "JAX_NUM_PROCESSES or JAX_PROCESS_ID is set (the explicit multi-process contract)"
    num = _require_int(environ, "JAX_NUM_PROCESSES", why, minimum=1)
    pid = _require_int(environ, "JAX_PROCESS_ID", why)
    _check_process_id(pid, num, "JAX_PROCESS_ID", "JAX_NUM_PROCESSES")
    address = _get(environ, "JAX_COORDINATOR_ADDRESS")
    if num == 1:
        return None
    if address is None:
        raise ValueError(
            f"JAX_NUM_PROCESSES={num} but JAX_COORDINATOR_ADDRESS is not set; set it to "
            "'host:port' of process 0 (the same value on every process)."
        )
    return ClusterSpec(
        source="explicit",
        coordinator_address=_check_address(address, "JAX_COORDINATOR_ADDRESS"),
        num_processes=num,
        process_id=pid,
        local_device_ids=_local_device_ids(environ),
    )


def _coordinator_port(environ: Mapping[str, str], job_id: int) -> int:
    port = _int(environ, "JAX_COORDINATOR_PORT", minimum=1)
    return port if port is not None else job_id % _PORT_SPAN + _PORT_BASE


def ompi_coordinator_address(environ: Mapping[str, str]) -> str | None:
    """Coordinator "host:port" from Open MPI's ``OMPI_MCA_orte_hnp_uri`` (as JAX derives it).

    The variable exists under Open MPI 4's ``mpirun``; Open MPI 5 no longer exports it.

    Returns:
      The address, or None when the variable is absent.
    """
    uri = _get(environ, "OMPI_MCA_orte_hnp_uri")
    if uri is None:
        return None
    match = re.search(r"tcp://(.+?)[,:]|tcp6://\[(.+?)[,\]]", uri)
    job = uri.split(".", maxsplit=1)[0]
    if match is None or not job.isdigit():
        raise ValueError(
            f"OMPI_MCA_orte_hnp_uri={uri!r} has no parsable job id and tcp address; set "
            "JAX_COORDINATOR_ADDRESS='host:port' of rank 0 instead."
        )
    host = next(g for g in match.groups() if g is not None)
    # Open MPI job ids are multiples of 2**12; divide first so that jobs differ in port.
    return f"{host}:{_coordinator_port(environ, int(job) // _PORT_SPAN)}"


def _ompi(environ: Mapping[str, str]) -> ClusterSpec | None:
    size = _int(environ, "OMPI_COMM_WORLD_SIZE", minimum=1)
    if size is None or size == 1:
        return None
    why = f"OMPI_COMM_WORLD_SIZE={size} (an Open MPI launch)"
    rank = _require_int(environ, "OMPI_COMM_WORLD_RANK", why)
    _check_process_id(rank, size, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")
    address = _get(environ, "JAX_COORDINATOR_ADDRESS")
    if address is not None:
        address = _check_address(address, "JAX_COORDINATOR_ADDRESS")
    else:
        address = ompi_coordinator_address(environ)
    if address is None:
        raise ValueError(
            f"{why}: neither JAX_COORDINATOR_ADDRESS nor OMPI_MCA_orte_hnp_uri is set "
            "(Open MPI 5 does not export the latter); pass -x JAX_COORDINATOR_ADDRESS="
            "'host:port' of rank 0 to mpirun."
        )
    local_rank = _int(environ, "OMPI_COMM_WORLD_LOCAL_RANK") or 0
    local_size = _int(environ, "OMPI_COMM_WORLD_LOCAL_SIZE", minimum=1)
    return ClusterSpec(
        source="ompi",
        coordinator_address=address,
        num_processes=size,
        process_id=rank,
        local_device_ids=_devices_for_local_rank(environ, local_rank, local_size),
    )


def slurm_first_host(nodelist: str) -> str:
    """First host name of a SLURM hostlist ("node[001-004,007],gpu2" -> "node001")."""
    head = re.match(r"([^,\[]*)(\[([^\]]*)\])?", nodelist)
    prefix, bracket = head.group(1), head.group(3)  # type: ignore[union-attr]
    if bracket is None:
        return prefix
    return prefix + re.split(r"[,-]", bracket, maxsplit=1)[0]


def _slurm_tasks_on_node(environ: Mapping[str, str], num_tasks: int) -> int | None:
    """Tasks of this step on this node, from e.g. SLURM_STEP_TASKS_PER_NODE="2(x3),1"."""
    node_id = _int(environ, "SLURM_NODEID")
    for var in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        value = _get(environ, var)
        if value is None or node_id is None:
            continue
        counts: list[int] = []
        for item in value.split(","):
            match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
            if match is None:
                raise ValueError(f"{var}={value!r} is not a SLURM task list like '2(x3),1'.")
            counts += [int(match.group(1))] * int(match.group(2) or 1)
        if node_id < len(counts):
            return counts[node_id]
    per_node = _int(environ, "SLURM_NTASKS_PER_NODE", minimum=1)
    if per_node is not None:
        return per_node
    nodes = _int(environ, "SLURM_STEP_NUM_NODES", minimum=1) or _int(
        environ, "SLURM_JOB_NUM_NODES", minimum=1
    )
    if nodes is not None and num_tasks % nodes == 0:
        return num_tasks // nodes
    return None


def _slurm(environ: Mapping[str, str]) -> ClusterSpec | None:
    step_vars = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if not all(_get(environ, v) is not None for v in (*step_vars, "SLURM_STEP_NODELIST")):
        return None  # not inside an srun step: one process.
    num = _int(environ, "SLURM_STEP_NUM_TASKS", minimum=1) or _int(
        environ, "SLURM_NTASKS", minimum=1
    )
    assert num is not None
    if num == 1:
        return None
    pid = _int(environ, "SLURM_PROCID")
    assert pid is not None
    _check_process_id(pid, num, "SLURM_PROCID", "SLURM_NTASKS")
    address = _get(environ, "JAX_COORDINATOR_ADDRESS")
    if address is not None:
        address = _check_address(address, "JAX_COORDINATOR_ADDRESS")
    else:
        job_id = _int(environ, "SLURM_JOB_ID")
        assert job_id is not None
        host = slurm_first_host(environ["SLURM_STEP_NODELIST"].strip())
        address = f"{host}:{_coordinator_port(environ, job_id)}"
    local_rank = _int(environ, "SLURM_LOCALID")
    assert local_rank is not None
    return ClusterSpec(
        source="slurm",
        coordinator_address=address,
        num_processes=num,
        process_id=pid,
        local_device_ids=_devices_for_local_rank(
            environ, local_rank, _slurm_tasks_on_node(environ, num)
        ),
    )


def _gke_tpu(environ: Mapping[str, str]) -> ClusterSpec | None:
    hosts = _get(environ, "TPU_PROCESS_ADDRESSES") or _get(environ, "TPU_WORKER_HOSTNAMES")
    slices = _int(environ, "MEGASCALE_NUM_SLICES", minimum=1) or 1
    if (hosts is None or len(hosts.split(",")) == 1) and slices == 1:
        return None
    return ClusterSpec(source="tpu")


def detect_cluster(environ: Mapping[str, str]) -> ClusterSpec | None:
    """Reads the launcher's environment; pure (no JAX calls, no network).

    Args:
      environ: the process environment, e.g. `os.environ`.

    Returns:
      None for a single-process run, otherwise the `ClusterSpec` to initialize with.

    Raises:
      ValueError: when the environment is inconsistent (a process id out of range, a
        process count without a coordinator address, a malformed value); the message
        names the variable.
    """
    mode = (environ.get(MODE_VAR) or "").strip().lower()
    if mode not in _MODES:
        raise ValueError(f"{MODE_VAR}={mode!r} must be one of 'auto', 'off' or unset.")
    if mode == "off":
        return None
    if mode == "auto":
        return ClusterSpec(source="auto")
    if any(_get(environ, v) is not None for v in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID")):
        return _explicit(environ)
    for detect in (_ompi, _slurm, _gke_tpu):
        spec = detect(environ)
        if spec is not None:
            return spec
    if _get(environ, "JAX_COORDINATOR_ADDRESS") is not None:
        raise ValueError(
            "JAX_COORDINATOR_ADDRESS is set but JAX_NUM_PROCESSES and JAX_PROCESS_ID are "
            "not, and no SLURM/Open MPI/TPU launch was detected; set both (or unset "
            "JAX_COORDINATOR_ADDRESS for a single process)."
        )
    return None


def _platform_is_cpu(environ: Mapping[str, str]) -> bool:
    import jax

    platforms = _get(environ, "JAX_PLATFORMS") or jax.config.jax_platforms or ""
    return platforms.split(",")[0].strip().lower() == "cpu"


def initialize_if_needed(environ: Mapping[str, str] = os.environ) -> ClusterSpec | None:
    """Calls `jax.distributed.initialize` once when the environment describes several processes.

    Must run before anything touches a JAX backend (`jax.devices()`, any computation).
    On CPU it makes sure cross-process collectives are on (gloo, JAX's default), since
    without them a multi-process CPU run cannot all-reduce, and turns the persistent
    compilation cache off (it would let process 0 reach the first collective alone).

    Args:
      environ: the process environment.

    Returns:
      The `ClusterSpec` (None for a single process: nothing is initialized). With
      `source` "auto" or "tpu" its fields stay None: JAX resolved them; read them back with
      `jax.process_count()` and `jax.process_index()`.

    Raises:
      ValueError: from `detect_cluster`, or when ``DDPM_JAX_DISTRIBUTED=auto`` but JAX
        finds no cluster to join.
    """
    spec = detect_cluster(environ)
    if spec is None:
        return None
    import jax

    if jax.distributed.is_initialized():
        return spec
    if _platform_is_cpu(environ):
        if jax.config.jax_cpu_collectives_implementation is None:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if jax.config.jax_enable_compilation_cache:
            # JAX keys CPU executables in the persistent cache per process, and only process
            # 0 writes entries: with a warm cache process 0 skips compiling while the others
            # compile, and the first collective's gloo rendezvous (a fixed 30 s deadline in
            # XLA) times out. Without the cache all processes compile in step; no wall time
            # is lost, since the processes that never hit the cache set the pace anyway.
            _log.info("Multi-process CPU run: the persistent compilation cache is disabled.")
            jax.config.update("jax_enable_compilation_cache", False)
    _log.info("Initializing jax.distributed: %s", spec)
    try:
        jax.distributed.initialize(**spec.initialize_kwargs())
    except ValueError as e:
        if spec.resolved:
            raise
        raise ValueError(
            f"{MODE_VAR}={environ.get(MODE_VAR)!r} or a TPU pod environment asked for "
            f"jax.distributed, but JAX found no cluster to join ({e}); unset {MODE_VAR} "
            "or use the JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID contract."
        ) from e
    return spec
