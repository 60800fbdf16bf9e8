"""Tests for ddpm_jax.runtime.distributed (cluster detection) and the launch/ scripts.

Detection runs on synthetic environments, with JAX's own SLURM/Open MPI detection as the
oracle for coordinator addresses. Every script's dry run must print the expected commands
while fake `gcloud`/`srun`/`sbatch`/`scontrol`/`ssh` that fail loudly sit first on PATH.
One real run starts two JAX processes on CPU and all-reduces across them.
"""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import pytest

from ddpm_jax.runtime import distributed
from ddpm_jax.runtime.distributed import ClusterSpec, detect_cluster

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])
FAKED = ("gcloud", "srun", "sbatch", "scontrol", "ssh")
# Variables of an enclosing cluster job that must not leak into the scripts under test.
PREFIXES = ("SLURM_", "OMPI_", "JAX_", "DDPM_JAX_", "TPU_", "MEGASCALE_")

# ---------------------------------------------------------------------------------------
# detect_cluster on synthetic environments.

EXPLICIT = {
    "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
    "JAX_NUM_PROCESSES": "4",
    "JAX_PROCESS_ID": "3",
}


def slurm_env(ntasks=2, procid=1, localid=0, nodelist="node[007-008]", **extra):
    """Environment of one srun task of job 4242, one task per node unless told."""
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": str(ntasks),
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(localid),
        "SLURM_STEP_NODELIST": nodelist,
        "SLURM_NODEID": str(procid),
        "SLURM_STEP_TASKS_PER_NODE": f"1(x{ntasks})",
    }
    env.update(extra)
    return env


def test_no_cluster_is_single_process():
    assert detect_cluster({}) is None
    assert detect_cluster({"HOME": "/root", "PATH": "/bin", "XLA_FLAGS": "--x"}) is None


def test_explicit_contract():
    spec = detect_cluster(EXPLICIT)
    assert spec == ClusterSpec("explicit", "10.0.0.1:1234", 4, 3, None)
    assert spec.initialize_kwargs() == dict(
        coordinator_address="10.0.0.1:1234",
        num_processes=4,
        process_id=3,
        local_device_ids=None,
        cluster_detection_method="deactivate",
    )
    spec = detect_cluster({**EXPLICIT, "JAX_LOCAL_DEVICE_IDS": "2,3"})
    assert spec.local_device_ids == (2, 3)
    assert spec.initialize_kwargs()["local_device_ids"] == [2, 3]
    # IPv6 coordinators keep their brackets.
    assert detect_cluster({**EXPLICIT, "JAX_COORDINATOR_ADDRESS": "[fe80::1]:99"}) is not None
    # One process needs no coordinator and initializes nothing.
    assert detect_cluster({"JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}) is None


@pytest.mark.parametrize(
    "env, variable",
    [
        ({**EXPLICIT, "JAX_PROCESS_ID": "4"}, "JAX_PROCESS_ID"),
        ({**EXPLICIT, "JAX_PROCESS_ID": "-1"}, "JAX_PROCESS_ID"),
        ({**EXPLICIT, "JAX_PROCESS_ID": "one"}, "JAX_PROCESS_ID"),
        ({**EXPLICIT, "JAX_NUM_PROCESSES": "0"}, "JAX_NUM_PROCESSES"),
        ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "JAX_COORDINATOR_ADDRESS"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID"),
        ({**EXPLICIT, "JAX_COORDINATOR_ADDRESS": "10.0.0.1"}, "JAX_COORDINATOR_ADDRESS"),
        ({**EXPLICIT, "JAX_COORDINATOR_ADDRESS": "h:99999"}, "JAX_COORDINATOR_ADDRESS"),
        ({**EXPLICIT, "JAX_LOCAL_DEVICE_IDS": "0,x"}, "JAX_LOCAL_DEVICE_IDS"),
        ({**EXPLICIT, "JAX_LOCAL_DEVICE_IDS": "1,1"}, "JAX_LOCAL_DEVICE_IDS"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "JAX_NUM_PROCESSES"),
        ({"DDPM_JAX_DISTRIBUTED": "yes"}, "DDPM_JAX_DISTRIBUTED"),
        (slurm_env(ntasks=2, procid=2), "SLURM_PROCID"),
        (slurm_env(JAX_COORDINATOR_PORT="http"), "JAX_COORDINATOR_PORT"),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_RANK"),
        ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}, "JAX_COORDINATOR_ADDRESS"),
    ],
)
def test_inconsistent_environment_names_the_variable(env, variable):
    with pytest.raises(ValueError, match=variable):
        detect_cluster(env)


def test_slurm_single_task_and_batch_shell_are_single_process():
    assert detect_cluster(slurm_env(ntasks=1, procid=0)) is None
    # The batch script itself (no srun step: no SLURM_STEP_NODELIST) is one process.
    batch = slurm_env(ntasks=4, procid=0)
    del batch["SLURM_STEP_NODELIST"]
    assert detect_cluster(batch) is None


def test_slurm_one_task_per_node_keeps_all_gpus():
    spec = detect_cluster(slurm_env(ntasks=2, procid=1))
    # Port rule shared with JAX: 4242 % 4096 + 61440.
    assert spec == ClusterSpec("slurm", "node007:61586", 2, 1, None)
    spec = detect_cluster(slurm_env(JAX_COORDINATOR_PORT="5555"))
    assert spec.coordinator_address == "node007:5555"
    spec = detect_cluster(slurm_env(JAX_COORDINATOR_ADDRESS="10.1.1.1:77"))
    assert spec.coordinator_address == "10.1.1.1:77"


def test_slurm_several_tasks_per_node_take_one_gpu_each():
    # 2 nodes x 8 tasks; task 13 is local rank 5 on node 1.
    env = slurm_env(ntasks=16, procid=13, localid=5, SLURM_NODEID="1")
    env["SLURM_STEP_TASKS_PER_NODE"] = "8(x2)"
    assert detect_cluster(env).local_device_ids == (5,)
    # --gpus-per-task=1: each task already sees exactly its own GPU.
    assert detect_cluster({**env, "CUDA_VISIBLE_DEVICES": "5"}).local_device_ids is None
    # Uneven layout "3,1": node 1 holds a single task, which keeps every GPU.
    env = slurm_env(ntasks=4, procid=3, localid=0, SLURM_NODEID="1")
    env["SLURM_STEP_TASKS_PER_NODE"] = "3,1"
    assert detect_cluster(env).local_device_ids is None
    # An explicit JAX_LOCAL_DEVICE_IDS wins.
    assert detect_cluster({**env, "JAX_LOCAL_DEVICE_IDS": "1"}).local_device_ids == (1,)


@pytest.mark.parametrize(
    "nodelist, first",
    [
        ("node001", "node001"),
        ("node001,host2", "node001"),
        ("node[001-0015],host2", "node001"),
        ("node[001,007-015],host2", "node001"),
        ("gpu-a[3,5]", "gpu-a3"),
    ],
)
def test_slurm_coordinator_matches_jax(monkeypatch, nodelist, first):
    from jax._src.clusters import SlurmCluster

    env = slurm_env(ntasks=3, procid=2, nodelist=nodelist)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("JAX_COORDINATOR_PORT", raising=False)
    assert SlurmCluster.is_env_present()
    spec = detect_cluster(env)
    assert distributed.slurm_first_host(nodelist) == first
    assert spec.coordinator_address == SlurmCluster.get_coordinator_address(None, None)
    assert spec.num_processes == SlurmCluster.get_process_count()
    assert spec.process_id == SlurmCluster.get_process_id()


@pytest.mark.parametrize(
    "uri",
    [
        "1531576320.0;tcp://10.96.0.1,10.148.0.1,10.108.0.1:34911",
        "1314521088.0;tcp6://[fe80::b9b:ac5d:9cf0:b858,2620:10d:c083:150e::3000:2]:43370",
    ],
)
def test_ompi_matches_jax(monkeypatch, uri):
    from jax._src.clusters import OmpiCluster

    env = {
        "OMPI_MCA_orte_hnp_uri": uri,
        "OMPI_COMM_WORLD_SIZE": "4",
        "OMPI_COMM_WORLD_RANK": "2",
        "OMPI_COMM_WORLD_LOCAL_RANK": "0",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("JAX_COORDINATOR_PORT", raising=False)
    spec = detect_cluster(env)
    assert spec == ClusterSpec("ompi", OmpiCluster.get_coordinator_address(None, None), 4, 2)
    assert detect_cluster({**env, "OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"}) is None
    # Two ranks on a node that sees 2 GPUs: one each.
    two = {**env, "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    assert detect_cluster(two).local_device_ids == (1,)


def test_ompi5_with_explicit_coordinator():
    env = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}
    spec = detect_cluster({**env, "JAX_COORDINATOR_ADDRESS": "n0:4000"})
    assert spec == ClusterSpec("ompi", "n0:4000", 2, 0, (0,))


def test_tpu_and_mode_switch():
    gke = {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3", "TPU_WORKER_ID": "1"}
    spec = detect_cluster(gke)
    assert spec == ClusterSpec("tpu") and not spec.resolved
    assert spec.initialize_kwargs() == {}  # JAX's TPU detection fills everything in.
    assert detect_cluster({"TPU_WORKER_HOSTNAMES": "w0", "TPU_WORKER_ID": "0"}) is None
    assert detect_cluster({"MEGASCALE_NUM_SLICES": "2"}) == ClusterSpec("tpu")
    assert detect_cluster({"DDPM_JAX_DISTRIBUTED": "auto"}) == ClusterSpec("auto")
    assert detect_cluster({**slurm_env(), "DDPM_JAX_DISTRIBUTED": "off"}) is None
    # The explicit contract beats the scheduler's variables.
    assert detect_cluster({**slurm_env(), **EXPLICIT}).source == "explicit"


# ---------------------------------------------------------------------------------------
# initialize_if_needed, with jax.distributed.initialize replaced by a recorder.


@pytest.fixture
def fake_initialize(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: bool(calls))
    saved = jax.config.jax_cpu_collectives_implementation
    yield calls
    jax.config.update("jax_cpu_collectives_implementation", saved)


def test_initialize_if_needed(fake_initialize):
    assert distributed.initialize_if_needed({}) is None
    assert fake_initialize == []
    jax.config.update("jax_cpu_collectives_implementation", None)
    env = {**EXPLICIT, "JAX_PLATFORMS": "cpu"}
    spec = distributed.initialize_if_needed(env)
    assert fake_initialize == [spec.initialize_kwargs()]
    assert jax.config.jax_cpu_collectives_implementation == "gloo"
    # Once only.
    assert distributed.initialize_if_needed(env) == spec
    assert len(fake_initialize) == 1


def test_initialize_auto_without_cluster_is_a_clear_error(monkeypatch):
    def no_cluster(**kwargs):
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(jax.distributed, "initialize", no_cluster)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    with pytest.raises(ValueError, match="DDPM_JAX_DISTRIBUTED"):
        distributed.initialize_if_needed({"DDPM_JAX_DISTRIBUTED": "auto"})


# ---------------------------------------------------------------------------------------
# The scripts.


@pytest.fixture
def fake_bin(tmp_path):
    """A PATH whose gcloud/srun/sbatch/scontrol/ssh leave a marker and fail."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "executed"
    for name in FAKED:
        tool = bin_dir / name
        tool.write_text(
            f'#!/bin/sh\necho "{name} $*" >> "{marker}"\necho "FAKE {name}" >&2\nexit 99\n'
        )
        tool.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(PREFIXES)}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=sys.executable)
    return env, marker


def run_script(name, args, env, **kwargs):
    return subprocess.run(
        ["bash", str(LAUNCH / name), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        **kwargs,
    )


def test_every_script_parses():
    assert {p.name for p in SCRIPTS} >= {
        "tpu_vm_pod.sh",
        "slurm_gpu.sbatch",
        "multinode_gpu.sh",
        "local_multiprocess.sh",
    }
    for script in SCRIPTS:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, (script.name, result.stderr)
        assert "resume" in script.read_text().lower(), f"{script.name} must document resume"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck():
    # -x follows `source launch/lib.bash`, the helpers the .sh scripts share.
    result = subprocess.run(
        ["shellcheck", "-x", *map(str, SCRIPTS)], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stdout


TRAIN_ARGS = [
    "--config=configs/cifar10.py",
    "--workdir=gs://bucket/ddpm/c10",
    "--config.a.b=(1, 2)",
]
MAIN = "-m ddpm_jax.main --config=configs/cifar10.py --workdir=gs://bucket/ddpm/c10"


def test_tpu_vm_pod_dry_run(fake_bin):
    env, marker = fake_bin
    env.update(TPU_NAME="ddpm-pod", ZONE="us-central2-b", ACCELERATOR_TYPE="v4-128")
    result = run_script("tpu_vm_pod.sh", ["--dry-run", "--", *TRAIN_ARGS], env)
    assert result.returncode == 0, result.stderr
    assert not marker.exists()
    lines = result.stdout.splitlines()
    assert len(lines) == 5
    describe, pack, scp, install, train = lines
    assert describe.startswith("gcloud compute tpus tpu-vm describe ddpm-pod --zone=us-central2-b")
    assert "|| gcloud compute tpus tpu-vm create ddpm-pod --zone=us-central2-b" in describe
    assert "--accelerator-type=v4-128 --version=tpu-ubuntu2204-base" in describe
    assert pack.startswith("git -C ") and "tar -C" in pack
    for line in (scp, install, train):
        assert "--worker=all" in line and line.startswith("gcloud compute tpus tpu-vm ")
    assert "pip install" in install and '"jax[tpu]"' in install
    assert f"DDPM_JAX_DISTRIBUTED=auto python3 {MAIN}" in train
    assert '"--config.a.b=(1, 2)"' in train  # quoted for the remote shell
    # DRY_RUN=1 works the same; a local workdir is refused before anything runs.
    assert run_script("tpu_vm_pod.sh", ["--", *TRAIN_ARGS], {**env, "DRY_RUN": "1"}).stdout == (
        result.stdout
    )
    bad = run_script("tpu_vm_pod.sh", ["--dry-run", "--", TRAIN_ARGS[0], "--workdir=/tmp/w"], env)
    assert bad.returncode == 2 and "gs://" in bad.stderr and bad.stdout == ""
    assert not marker.exists()


def test_slurm_dry_run(fake_bin):
    env, marker = fake_bin
    args = ["--config=configs/cifar10.py", "--workdir=/shared/w"]
    srun = f"srun --ntasks-per-node=1 --kill-on-bad-exit=1 {sys.executable} -m ddpm_jax.main"
    outside = run_script("slurm_gpu.sbatch", ["--dry-run", *args], env)
    assert outside.returncode == 0, outside.stderr
    lines = [line for line in outside.stdout.splitlines() if not line.startswith("#")]
    assert lines[0].startswith("sbatch ") and lines[0].endswith(" ".join(args))
    assert lines[1] == f"{srun} {' '.join(args)}"
    inside = run_script("slurm_gpu.sbatch", args, {**env, "DRY_RUN": "1", "SLURM_JOB_ID": "7"})
    assert inside.returncode == 0 and inside.stdout.splitlines() == [lines[1]]
    missing = run_script("slurm_gpu.sbatch", ["--dry-run", args[0]], env)
    assert missing.returncode == 2 and "--workdir" in missing.stderr
    assert not marker.exists()
    header = (LAUNCH / "slurm_gpu.sbatch").read_text()
    for directive in ("--ntasks-per-node=1", "--gpus-per-node=", "--requeue", "--signal=B:USR1@"):
        assert f"#SBATCH {directive}" in header


def test_slurm_time_limit_checkpoints_then_requeues(tmp_path, fake_bin):
    """USR1 near the time limit: SIGTERM reaches the step, then the job is requeued."""
    env, _ = fake_bin
    log = tmp_path / "calls"
    bin_dir = tmp_path / "bin"
    (bin_dir / "srun").write_text(
        textwrap.dedent(f"""\
        #!/usr/bin/env bash
        trap 'echo "srun TERM" >> {log}; kill $pid; exit 0' TERM
        sleep 30 >/dev/null 2>&1 &
        pid=$!
        echo "srun $*" >> {log}
        wait $pid
        """)
    )
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "scontrol $*" >> {log}\n')
    env.update(SLURM_JOB_ID="4242")
    proc = subprocess.Popen(
        ["bash", str(LAUNCH / "slurm_gpu.sbatch"), "--config=c.py", "--workdir=/w"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 20
    while not (log.exists() and log.read_text().startswith("srun")):
        assert time.monotonic() < deadline, "srun was never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    calls = log.read_text().splitlines()
    assert calls[0].startswith("srun --ntasks-per-node=1 --kill-on-bad-exit=1")
    assert calls[1:] == ["srun TERM", "scontrol requeue 4242"]


def test_multinode_dry_run(fake_bin):
    env, marker = fake_bin
    args = ["--config=configs/cifar10.py", "--workdir=/shared/w"]
    fan_out = run_script("multinode_gpu.sh", ["--dry-run", "--hosts", "n0,n1,n2", "--", *args], env)
    assert fan_out.returncode == 0, fan_out.stderr
    ssh_lines = [line for line in fan_out.stdout.splitlines() if line.startswith("ssh ")]
    assert len(ssh_lines) == 3
    for rank, (host, line) in enumerate(zip(["n0", "n1", "n2"], ssh_lines, strict=True)):
        assert line.startswith(f"ssh -o BatchMode=yes {host} ")
        assert "JAX_COORDINATOR_ADDRESS=n0:12345 JAX_NUM_PROCESSES=3" in line
        assert f"JAX_PROCESS_ID={rank} {sys.executable} -m ddpm_jax.main {' '.join(args)}" in line
    node = {**env, "JAX_COORDINATOR_ADDRESS": "n0:1", "JAX_NUM_PROCESSES": "2", "DRY_RUN": "1"}
    one = run_script("multinode_gpu.sh", ["--", *args], {**node, "JAX_PROCESS_ID": "1"})
    assert one.returncode == 0
    assert one.stdout.strip() == (
        f"env JAX_COORDINATOR_ADDRESS=n0:1 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 "
        f"{sys.executable} -m ddpm_jax.main {' '.join(args)}"
    )
    bad = run_script("multinode_gpu.sh", ["--", *args], {**node, "JAX_PROCESS_ID": "2"})
    assert bad.returncode != 0 and "JAX_PROCESS_ID" in bad.stderr
    assert not marker.exists()


def test_local_multiprocess_dry_run(fake_bin, tmp_path):
    env, marker = fake_bin
    args = ["--config=configs/cifar10.py", "--workdir=/tmp/w"]
    result = run_script(
        "local_multiprocess.sh",
        ["--dry-run", "-n", "3", "-d", "2", "--port", "23456", "--logdir", "/tmp/L", "--", *args],
        {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_foo"},
    )
    assert result.returncode == 0, result.stderr
    procs = [line for line in result.stdout.splitlines() if "JAX_PROCESS_ID=" in line]
    assert len(procs) == 3
    for i, line in enumerate(procs):
        assert line.startswith("env JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo")
        assert '"XLA_FLAGS=--xla_foo --xla_force_host_platform_device_count=2"' in line
        assert "JAX_COORDINATOR_ADDRESS=127.0.0.1:23456 JAX_NUM_PROCESSES=3" in line
        assert f"JAX_PROCESS_ID={i} {sys.executable} -m ddpm_jax.main {' '.join(args)}" in line
        assert line.endswith(f"> /tmp/L/process_{i}.log 2>&1 &")
    assert not marker.exists() and not Path("/tmp/L").exists()
    # A command that is not main's arguments runs as given.
    other = run_script("local_multiprocess.sh", ["--dry-run", "--", "echo", "hi"], env)
    assert other.stdout.count("JAX_PROCESS_ID=") == 2 and " echo hi > " in other.stdout


@pytest.mark.parametrize(
    "script, args",
    [
        ("local_multiprocess.sh", ["--dry-run", "--"]),
        ("multinode_gpu.sh", ["--dry-run", "--hosts", "a,b", "--"]),
        ("slurm_gpu.sbatch", ["--dry-run"]),
    ],
)
def test_a_relative_workdir_reaches_every_process_absolute(fake_bin, tmp_path, script, args):
    """Each process may start elsewhere (ssh, srun): the workdir leaves the script absolute."""
    env, _ = fake_bin
    result = run_script(script, [*args, "--config=configs/tiny.py", "--workdir=runs/r1"], env)
    assert result.returncode == 0, result.stderr
    assert f"--workdir={REPO}/runs/r1" in result.stdout, result.stdout
    assert "--workdir=runs/r1" not in result.stdout
    home = run_script(script, [*args, "--config=c.py", "--workdir=~/w"], env)
    assert f"--workdir={os.path.expanduser('~')}/w" in home.stdout, home.stdout


def test_local_multiprocess_runs_all_and_propagates_failure(fake_bin, tmp_path):
    env, _ = fake_bin
    ok = run_script(
        "local_multiprocess.sh",
        ["-n", "3", "--logdir", str(tmp_path / "ok"), "--", "sh", "-c", "echo $JAX_PROCESS_ID"],
        env,
    )
    assert ok.returncode == 0, ok.stderr
    assert [(tmp_path / "ok" / f"process_{i}.log").read_text() for i in range(3)] == [
        "0\n",
        "1\n",
        "2\n",
    ]
    start = time.monotonic()
    fail = run_script(
        "local_multiprocess.sh",
        [
            *("-n", "3", "--logdir", str(tmp_path / "fail"), "--"),
            *("sh", "-c", '[ "$JAX_PROCESS_ID" = 1 ] && { echo boom; exit 7; }; exec sleep 30'),
        ],
        env,
    )
    assert fail.returncode == 7
    assert time.monotonic() - start < 15, "the surviving processes were not stopped"
    assert "process 1 exited with status 7" in fail.stderr and "boom" in fail.stderr


CHECK_ALL_REDUCE = """
import numpy as np
from ddpm_jax.runtime.distributed import initialize_if_needed
spec = initialize_if_needed()
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = jax.make_mesh((jax.device_count(),), ("data",))
local = np.full((jax.local_device_count(),), jax.process_index() + 1.0, np.float32)
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
print("RESULT", spec.source, jax.process_count(), jax.device_count(), float(total))
"""


def test_two_cpu_processes_all_reduce(fake_bin, tmp_path):
    """Two real JAX processes x 2 CPU devices each: a sum over all 4 devices."""
    env, _ = fake_bin
    script = tmp_path / "check.py"
    script.write_text(CHECK_ALL_REDUCE)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    logdir = tmp_path / "logs"
    result = run_script(
        "local_multiprocess.sh",
        [
            *("-n", "2", "-d", "2", "--timeout", "50", "--logdir", str(logdir), "--"),
            *(sys.executable, str(script)),
        ],
        env,
    )
    logs = [(logdir / f"process_{i}.log").read_text() for i in range(2)]
    assert result.returncode == 0, result.stderr + "".join(logs)
    for log in logs:
        # Process p contributes (p + 1) on each of its 2 devices: 2 * 1 + 2 * 2 = 6.
        assert "RESULT explicit 2 4 6.0" in log
