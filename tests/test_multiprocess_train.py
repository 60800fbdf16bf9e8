"""Two processes x 4 CPU devices train like one process x 8, and survive losing a process.

`launch/local_multiprocess.sh` starts two `ddpm_jax.main` processes joined by
`jax.distributed` (gloo CPU collectives). One module fixture runs the whole scenario, shared
by the tests below:

1. a long two-process run, SIGKILLed in one process once a checkpoint exists;
2. the same command relaunched with `num_train_steps` two steps past the last checkpoint:
   both processes resume there and finish;
3. a one-process, 8-device run of the same length in this process (the oracle).

The model is the tiny config's U-Net cut to one level without attention, to compile faster.

The global batch, its split into per-device rows and every random key are the same in both
layouts, so the two-process run computes the same numbers up to the order in which
cross-device sums are reduced (gloo across processes, XLA in-process within one).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import tiny
from ddpm_jax import train
from ddpm_jax.runtime import checkpointing
from ddpm_jax.runtime import sharding as shd
from ddpm_jax.train import loop

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch" / "local_multiprocess.sh"
CHECKPOINT_EVERY = 2
WAIT_S = 420  # generous: each launch compiles for ~1-2 min on a busy 2-core machine.
# Every launch compiles in both processes (the persistent cache is off in multi-process CPU
# runs): the tiny U-Net cut to one level without attention compiles ~40% faster, and the
# equivalence under test does not depend on the architecture.
MODEL = {"ch_mult": (1,), "attn_resolutions": ()}


def tiny_config(num_train_steps):
    config = tiny.get_config()
    config.model.update(MODEL)
    config.training.num_train_steps = num_train_steps
    config.training.checkpoint_every_steps = CHECKPOINT_EVERY
    config.training.log_every_steps = 1
    config.training.sample_every_steps = 0
    return config


def launch_command(workdir, logdir, num_train_steps):
    return [
        "bash", str(LAUNCH), "-n", "2", "-d", "4", "--timeout", str(WAIT_S),
        "--logdir", str(logdir), "--",
        "--config=configs/tiny.py", f"--workdir={workdir}",
        f"--config.training.num_train_steps={num_train_steps}",
        f"--config.training.checkpoint_every_steps={CHECKPOINT_EVERY}",
        "--config.training.log_every_steps=1", "--config.training.sample_every_steps=0",
        *(f"--config.model.{k}={v!r}" for k, v in MODEL.items()),
    ]  # fmt: skip


def launch_env():
    # The test set-up's XLA_FLAGS (device count aside, which the script replaces) and
    # compilation-cache variables are inherited, so the processes run the same XLA options
    # as the in-process oracle.
    return dict(os.environ, PYTHON=sys.executable)


def run_processes(workdir):
    """{pid: (JAX_PROCESS_ID, argv[0])} of the live processes of the run in `workdir`
    (python and its `timeout` wrapper), found by the unique workdir in their command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            env = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # exited meanwhile.
            continue
        if state == "Z" or f"--workdir={workdir}".encode() not in argv:
            continue
        ids = [v.split(b"=", 1)[1] for v in env if v.startswith(b"JAX_PROCESS_ID=")]
        found[int(entry.name)] = (int(ids[0]) if ids else None, argv[0].decode())
    return found


def kill_run(launcher, workdir):
    """SIGKILLs the launcher's process group and every process left of the run."""
    if launcher is not None and launcher.poll() is None:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
    for pid in run_processes(workdir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def log_tails(logdir, lines=25):
    out = []
    for path in sorted(Path(logdir).glob("process_*.log")):
        text = path.read_text(errors="replace").splitlines()
        out.append(f"----- {path} (last {lines} lines) -----\n" + "\n".join(text[-lines:]))
    return "\n".join(out)


def read_metrics(workdir):
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    workdir, logs_killed, logs_resumed = root / "run", root / "logs_killed", root / "logs_resumed"
    launcher = None
    try:
        # 1. A run far longer than the test, killed in one process after its first checkpoint.
        launcher = subprocess.Popen(
            launch_command(workdir, logs_killed, 100_000),
            cwd=REPO, env=launch_env(), start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + WAIT_S
        while (checkpointing.latest_step(workdir) or 0) < CHECKPOINT_EVERY:
            assert launcher.poll() is None, (
                f"the two-process run exited with status {launcher.returncode} before its "
                f"first checkpoint:\n{launcher.stderr.read()}\n{log_tails(logs_killed)}"
            )
            assert time.monotonic() < deadline, (
                f"no checkpoint within {WAIT_S} s:\n{log_tails(logs_killed)}"
            )
            time.sleep(1.0)
        victims = [pid for pid, (i, exe) in run_processes(workdir).items()
                   if i == 1 and exe == sys.executable]  # fmt: skip
        assert len(victims) == 1, f"process 1 of the run not found: {run_processes(workdir)}"
        os.kill(victims[0], signal.SIGKILL)
        # The script sees process 1 die and stops process 0, which would otherwise wait in
        # a collective for a peer that is gone.
        try:
            _, launcher_err = launcher.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the launcher did not stop after a process was killed:\n"
                        f"{log_tails(logs_killed)}")  # fmt: skip
        killed_status = launcher.returncode
        deadline = time.monotonic() + 60
        while run_processes(workdir) and time.monotonic() < deadline:
            time.sleep(0.2)
        leftovers = run_processes(workdir)
        killed_metrics = read_metrics(workdir)
        last = checkpointing.latest_step(workdir)
        assert last is not None, f"no complete checkpoint after the kill:\n{log_tails(logs_killed)}"

        # 2. The same command, to two steps past the last complete checkpoint.
        end = last + 2
        launcher = subprocess.Popen(
            launch_command(workdir, logs_resumed, end),
            cwd=REPO, env=launch_env(), start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            _, resumed_err = launcher.communicate(timeout=WAIT_S + 30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the relaunched run did not finish:\n{log_tails(logs_resumed)}")
        assert launcher.returncode == 0, (
            f"the relaunched run failed ({launcher.returncode}):\n{resumed_err}\n"
            f"{log_tails(logs_resumed)}"
        )
    finally:
        kill_run(launcher, workdir)

    # 3. The oracle: one process, 8 devices, the same steps, checkpoints and metrics.
    config = tiny_config(end)
    reference_dir = root / "reference"
    reference = loop.train(config, str(reference_dir))
    return dict(
        workdir=workdir, logs_killed=logs_killed, logs_resumed=logs_resumed,
        killed_err=launcher_err, killed_status=killed_status,
        leftovers=leftovers, killed_metrics=killed_metrics, last=last, end=end,
        config=config, reference=reference, reference_dir=reference_dir,
    )  # fmt: skip


def restore(workdir, config, step):
    """The TrainState saved at `step`, restored onto this process's 8-device mesh."""
    abstract = train.build(config, shd.make_mesh()).abstract
    ckpt = checkpointing.Checkpointer(str(workdir), save_every_steps=CHECKPOINT_EVERY)
    try:
        return ckpt.restore(abstract, step)[0]
    finally:
        ckpt.close()


def assert_states_close(got, want, what):
    # The two layouts differ only in the order of floating-point sums (the gradient
    # all-reduce runs through gloo across processes), so the losses agree to a few float32
    # ulps. Adam divides by sqrt(v), which amplifies ulp-level differences in near-zero
    # gradients into update differences of up to ~1% of the learning rate (1e-3) per step:
    # parameters are compared to 2e-5 absolute, far below one step's update, which a
    # missing or wrong all-reduce, a wrong data shard or a skipped step would exceed.
    assert int(got.step) == int(want.step), what
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True
    ):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5,
            err_msg=f"{what}: {jax.tree_util.keystr(path)}",
        )  # fmt: skip


def test_killed_process_stops_the_run_and_leaves_nothing_behind(scenario):
    assert scenario["last"] is not None and scenario["last"] >= CHECKPOINT_EVERY
    assert scenario["last"] % CHECKPOINT_EVERY == 0
    # The launcher reports the failure (process 0 may fail first once its peer is gone).
    assert scenario["killed_status"] != 0, scenario["killed_err"]
    err = scenario["killed_err"]
    assert re.search(r"process [01] exited with status [1-9]", err), err
    assert not scenario["leftovers"], (
        f"processes of the killed run still alive after 60 s: {scenario['leftovers']}"
    )


def test_both_processes_resume_from_the_last_checkpoint(scenario):
    last, end = scenario["last"], scenario["end"]
    for i in range(2):
        log = (scenario["logs_resumed"] / f"process_{i}.log").read_text(errors="replace")
        assert f"Resumed from step {last} of" in log, log_tails(scenario["logs_resumed"])
        # The mesh spans both processes' devices.
        assert f"process {i} of 2, 4 local / 8 global devices (cpu)" in log
    steps = [r["step"] for r in read_metrics(scenario["workdir"])]
    before = [r["step"] for r in scenario["killed_metrics"]]
    # Only process 0 writes metrics; the relaunch drops the rows the killed run logged after
    # `last` and logs exactly the steps after `last`: every step appears once.
    assert before == list(range(1, len(before) + 1)) and len(before) >= last, before
    assert steps == list(range(1, end + 1)), steps
    assert checkpointing.latest_step(scenario["workdir"]) == end


def test_gloo_collectives_were_used_without_the_compilation_cache(scenario):
    log = (scenario["logs_resumed"] / "process_0.log").read_text(errors="replace")
    # XLA's gloo communicator reports its rendezvous over all 8 devices of both processes, one
    # line per local device (process 0 has ranks 0-3). Its threads write to stderr unlocked,
    # so a line's "[Gloo] Rank N" prefix can be split from the rest: match only the rest.
    assert "is connected to 7 peer ranks" in log, log_tails(scenario["logs_resumed"])
    # With the cache on, the first launch would leave process 0's entries on disk (JAX keys
    # them per process): at the relaunch process 0 would skip compiling while process 1
    # compiles, and the first collective's 30 s gloo rendezvous would time out.
    assert "the persistent compilation cache is disabled" in log


def test_loss_curve_equals_one_process(scenario):
    want = {r["step"]: r for r in read_metrics(scenario["reference_dir"])}
    assert sorted(want) == list(range(1, scenario["end"] + 1))
    # Every logged step, also those of the killed run past its last checkpoint.
    for got in read_metrics(scenario["workdir"]):
        ref = want.get(got["step"])
        if ref is None:  # the killed run went beyond `end`.
            continue
        for key in ("loss", "grad_norm", "learning_rate"):
            np.testing.assert_allclose(
                got[key], ref[key], rtol=1e-5, err_msg=f"{key} at step {got['step']}"
            )


def test_final_parameters_equal_one_process(scenario):
    config, reference = scenario["config"], scenario["reference"]
    final = restore(scenario["workdir"], config, scenario["end"])
    assert_states_close(final, reference, "final state after the relaunch")


def test_checkpoint_written_before_the_kill_equals_one_process(scenario):
    config, last = scenario["config"], scenario["last"]
    got = restore(scenario["workdir"], config, last)
    want = restore(scenario["reference_dir"], config, last)
    assert_states_close(got, want, f"checkpoint at step {last} of the killed run")
