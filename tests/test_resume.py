"""Resume hazards: changed configs, damaged checkpoints, rollbacks, two trainers, Ctrl-C."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import ddpm_jax
from configs import tiny
from ddpm_jax import errors, train
from ddpm_jax.evaluation import evaluate
from ddpm_jax.experiment import changes
from ddpm_jax.runtime import checkpointing, preemption
from ddpm_jax.runtime import sharding as shd
from ddpm_jax.runtime import workdir as wd
from ddpm_jax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(**training):
    c = tiny.get_config()
    c.training.update(num_train_steps=4, checkpoint_every_steps=2, keep_checkpoints=5,
                      sample_every_steps=0, log_every_steps=2)  # fmt: skip
    c.training.update(training)
    return c


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """4 steps in one go, checkpoints at 2 and 4: the run every test below starts from."""
    workdir = str(tmp_path_factory.mktemp("base") / "w")
    state = loop.train(config(), workdir)
    return workdir, state


@pytest.fixture
def workdir(base, tmp_path):
    path = str(tmp_path / "w")
    shutil.copytree(base[0], path)
    return path


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def snapshot(workdir):
    """Every file under the workdir (except the lock) with its content."""
    out = {}
    for root, _, files in os.walk(workdir):
        for f in files:
            path = os.path.join(root, f)
            if f != wd.LOCK_FILE:
                out[os.path.relpath(path, workdir)] = open(path, "rb").read()
    return out


def metrics_steps(workdir):
    return [json.loads(line)["step"] for line in open(os.path.join(workdir, wd.METRICS_FILE))]


def test_a_changed_model_is_refused_before_anything_is_written(workdir):
    before = snapshot(workdir)
    c = config(num_train_steps=6)
    c.model.ch = 64
    c.diffusion.num_timesteps = 50
    start = time.perf_counter()
    with pytest.raises(errors.ConfigError) as info:
        loop.train(c, workdir)
    assert time.perf_counter() - start < 30
    message = str(info.value)
    assert "model.ch (32 -> 64)" in message and "diffusion.num_timesteps (100 -> 50)" in message
    assert "allow_config_change" in message
    assert snapshot(workdir) == before  # config.json included: the workdir still loads.
    assert ddpm_jax.load_sampler(workdir).step == 4


def test_a_changed_batch_size_needs_the_escape_hatch_and_is_recorded(workdir, caplog):
    c = config(num_train_steps=6, batch_size=16)
    with pytest.raises(errors.ConfigError, match=r"training\.batch_size \(8 -> 16\)"):
        loop.train(c, workdir)
    c.training.allow_config_change = True
    c.optim.learning_rate = 5e-4
    with caplog.at_level(logging.WARNING):
        state = loop.train(c, workdir)
    assert int(state.step) == 6
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "training.batch_size (8 -> 16)" in warned and "optim.learning_rate" in warned
    history = [json.loads(line) for line in open(os.path.join(workdir, wd.CONFIG_HISTORY_FILE))]
    assert history[-1]["resumed_at_step"] == 4
    assert history[-1]["changes"]["training.batch_size"] == [8, 16]
    assert history[-1]["changes"]["optim.learning_rate"] == [1e-3, 5e-4]
    assert changes.read_config(workdir).training.batch_size == 16


def test_a_different_network_is_refused_naming_the_parameters(workdir):
    c = config(num_train_steps=6, allow_config_change=True)
    c.model.ch = 64
    with pytest.raises(errors.WorkdirError, match=r"holds another model .* differ in shape"):
        loop.train(c, workdir)


def test_a_truncated_newest_checkpoint_is_moved_aside_and_the_older_one_used(base, workdir, caplog):
    data = os.path.join(workdir, "checkpoints", "4", "state", "ocdbt.process_0", "d")
    for name in os.listdir(data):
        with open(os.path.join(data, name), "r+b") as f:
            f.truncate(max(1, os.path.getsize(f.name) // 3))
    with caplog.at_level(logging.WARNING):
        state = loop.train(config(), workdir)  # resumes at 2, runs to 4 again.
    warnings = [r.getMessage() for r in caplog.records if "cannot be restored" in r.getMessage()]
    assert len(warnings) == 1 and "step 4" in warnings[0] and "trying step 2" in warnings[0]
    quarantine = os.path.join(workdir, "checkpoints", "_quarantine")
    (moved,) = os.listdir(quarantine)
    assert moved.startswith("4-")
    assert (
        "cannot be restored"
        in open(os.path.join(quarantine, moved, "QUARANTINE_REASON.txt")).read()
    )
    assert_trees_equal(state, base[1])  # from step 2, bit-identical to the run that did it once.
    assert metrics_steps(workdir) == [2, 4]  # the lost step's row is not left twice.


def test_empty_and_itemless_step_directories_are_incomplete(workdir):
    os.makedirs(os.path.join(workdir, "checkpoints", "8"))
    shutil.copytree(
        os.path.join(workdir, "checkpoints", "4", "extra"),
        os.path.join(workdir, "checkpoints", "6", "extra"),
    )
    assert checkpointing.latest_step(workdir) == 4  # reading skips them ...
    state = loop.train(config(num_train_steps=6), workdir)  # ... training too.
    assert int(state.step) == 6
    moved = sorted(os.listdir(os.path.join(workdir, "checkpoints", "_quarantine")))
    assert [m.split("-")[0] for m in moved] == ["6", "8"]


def test_resume_step_rolls_back_once(base, workdir):
    state = loop.train(config(resume_step=2), workdir)
    assert_trees_equal(state, base[1])
    assert checkpointing.complete_steps(workdir) == [2, 4]
    (moved,) = os.listdir(os.path.join(workdir, "checkpoints", "_quarantine"))
    assert moved.startswith("4-")
    # The same command again (say after a crash) continues from the newest checkpoint.
    again = loop.train(config(resume_step=2, num_train_steps=6), workdir)
    assert int(again.step) == 6
    assert len(os.listdir(os.path.join(workdir, "checkpoints", "_quarantine"))) == 1
    with pytest.raises(errors.WorkdirNotFoundError, match=r"kept steps: \[2, 4, 6\]"):
        loop.train(config(resume_step=3, num_train_steps=6), workdir)


def test_a_missing_config_json_beside_checkpoints_is_explained(workdir):
    os.remove(os.path.join(workdir, wd.CONFIG_FILE))
    with pytest.raises(errors.WorkdirError, match=r"has checkpoints but no config\.json"):
        loop.train(config(num_train_steps=6), workdir)
    with pytest.raises(errors.WorkdirNotFoundError, match=r"config\.json is missing but .* holds"):
        ddpm_jax.load_sampler(workdir)


def test_a_failed_asynchronous_save_stops_the_run_at_once(workdir, monkeypatch):
    calls = {"n": 0}
    real = ocp.CheckpointManager.check_for_errors

    def failing(self):
        calls["n"] += 1
        if calls["n"] == 3:  # step 7: the first check after this run's first save (step 6).
            raise OSError("No space left on device")
        return real(self)

    monkeypatch.setattr(ocp.CheckpointManager, "check_for_errors", failing)
    with pytest.raises(checkpointing.CheckpointSaveError, match="No space left on device"):
        loop.train(config(num_train_steps=40, checkpoint_every_steps=6), workdir)
    # It stopped at step 7, the first check that saw the failure, not at the next save (12).
    assert metrics_steps(workdir)[-1] == 6
    assert checkpointing.complete_steps(workdir) == [2, 4, 6]


def test_a_stale_lock_is_reported_and_taken(workdir, caplog):
    with open(os.path.join(workdir, wd.LOCK_FILE), "w") as f:
        json.dump({"host": "gone", "pid": 1, "since": "2026-01-01T00:00:00+00:00"}, f)
    with caplog.at_level(logging.WARNING):
        loop.train(config(num_train_steps=6), workdir)
    assert any("stale" in r.getMessage() and "host gone" in r.getMessage() for r in caplog.records)
    assert open(os.path.join(workdir, wd.LOCK_FILE)).read() == ""


def test_a_workdir_held_by_a_run_is_refused_at_once(workdir):
    with wd.WorkdirLock(workdir):
        start = time.perf_counter()
        with pytest.raises(
            errors.WorkdirError,
            match=rf"in use by another training run \(host .*, pid {os.getpid()}",
        ):
            loop.train(config(num_train_steps=6), workdir)
        assert time.perf_counter() - start < 30


def test_a_second_interrupt_exits_at_once(monkeypatch):
    exits = []

    def fake_exit(code):
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", fake_exit)
    with preemption.catch_termination() as flag:
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.monotonic() + 5
        while not flag.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert flag.is_set() and flag.signum == signal.SIGINT and not exits
        with pytest.raises(SystemExit):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert exits == [128 + signal.SIGINT]


def test_ctrl_c_saves_and_a_second_trainer_is_refused(tmp_path):
    """A real run: the second trainer stops in seconds naming the first; Ctrl-C saves."""
    workdir = str(tmp_path / "w")
    cmd = [
        sys.executable, "-m", "ddpm_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
        "--config.training.num_train_steps=100000", "--config.training.sample_every_steps=0",
        "--config.training.checkpoint_every_steps=1000", "--config.training.log_every_steps=1",
    ]  # fmt: skip
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        metrics = os.path.join(workdir, wd.METRICS_FILE)
        deadline = time.time() + 240
        while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
            assert first.poll() is None, first.stderr.read().decode()[-3000:]
            assert time.time() < deadline
            time.sleep(0.2)
        start = time.perf_counter()
        second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert time.perf_counter() - start < 60
        assert second.returncode == 2, second.stderr
        assert "in use by another training run (host" in second.stderr
        assert f"pid {first.pid}" in second.stderr and first.poll() is None
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
    finally:
        first.kill()
        first.wait()
    assert first.returncode == 0, err.decode()[-3000:]
    last = checkpointing.latest_step(workdir)
    assert last is not None and last >= 1  # saved although not a multiple of 1000.


def test_eval_checks_the_inception_weights_before_the_bound_and_keeps_the_bound(
    workdir, tmp_path, monkeypatch
):
    bad = tmp_path / "inception.npz"
    np.savez(bad, nothing=np.zeros(3))
    c = config()
    c.eval.update(num_examples=8, batch_size=8, fid_num_samples=8, inception_weights=str(bad),
                  inception_sha256="0" * 64)  # fmt: skip
    start = time.perf_counter()
    with pytest.raises(errors.ConfigError, match=r"config\.eval\.inception_weights"):
        evaluate.evaluate(c, workdir)
    assert time.perf_counter() - start < 60
    assert not os.path.exists(os.path.join(workdir, wd.EVAL_SUBDIR))  # no bound pass ran.

    c.eval.update(inception_weights=None, inception_sha256=None)

    def fid_fails(*args, **kwargs):
        raise RuntimeError("FID broke")

    monkeypatch.setattr(evaluate.fid_lib, "fid_score", fid_fails)
    with pytest.raises(RuntimeError, match="FID broke"):
        evaluate.evaluate(c, workdir)
    saved = json.load(open(os.path.join(workdir, wd.EVAL_SUBDIR, "bpd_step4.json")))
    assert saved["num_examples"] == 8 and np.isfinite(saved["bpd"])


def test_non_finite_logged_metrics_stop_the_run_naming_them():
    with pytest.raises(errors.NonFiniteError, match=r"Non-finite bpd_estimate at step 7") as e:
        train.step.check_finite(
            {"finite": True, "loss": 0.1, "bpd_estimate": float("nan")}, 7, [4, 6]
        )
    assert "resume_step=N (kept: [4, 6])" in str(e.value)


def test_a_sampler_loads_without_building_an_optimizer(workdir, monkeypatch):
    import optax

    def no_optimizer(*args, **kwargs):
        raise AssertionError("sampling built an optimizer")

    monkeypatch.setattr(optax, "adam", no_optimizer)
    monkeypatch.setattr(train.state, "make_optimizer", no_optimizer)
    sampler = ddpm_jax.load_sampler(workdir)
    assert sampler.step == 4 and sampler.sample(2, seed=0, num_steps=3).shape == (2, 8, 8, 1)
    restored, _ = checkpointing.restore_subtree(
        workdir, "ema_params", sharding=shd.replicated(sampler.mesh)
    )
    assert_trees_equal(sampler.params, restored)


def test_sampling_and_evaluation_never_import_training():
    code = (
        "import sys, ddpm_jax\n"
        "from ddpm_jax import main\n"
        "from ddpm_jax.inference import trained_model, write_samples\n"
        "from ddpm_jax.evaluation import evaluate\n"
        "ddpm_jax.load_sampler\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[:2] == ['ddpm_jax', 'train'])\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
