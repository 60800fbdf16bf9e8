"""End-to-end training on the tiny offline config: resume, kill -9, sharding, bad configs, NaNs."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import tiny
from ddpm_jax import errors, train
from ddpm_jax.experiment import ExperimentConfig
from ddpm_jax.runtime import checkpointing
from ddpm_jax.runtime import sharding as shd
from ddpm_jax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**training):
    config = tiny.get_config()
    config.training.sample_every_steps = 0
    config.training.log_every_steps = 2
    for k, v in training.items():
        config.training[k] = v
    return config


def _optim(config):
    return ExperimentConfig.from_config(config).optim


def assert_trees_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """6 steps in one go: the reference that resumed runs must equal bit for bit."""
    workdir = str(tmp_path_factory.mktemp("full"))
    config = tiny_config(num_train_steps=6, checkpoint_every_steps=3, sample_every_steps=6)
    return loop.train(config, workdir), workdir


def test_run_writes_checkpoints_metrics_config_and_samples(uninterrupted):
    state, workdir = uninterrupted
    assert int(state.step) == 6
    assert checkpointing.latest_step(workdir) == 6
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [2, 4, 6]
    for key in ("loss", "grad_norm", "learning_rate", "bpd_estimate", "steps_per_sec"):
        assert all(np.isfinite(r[key]) for r in records), key
    assert os.path.exists(os.path.join(workdir, "samples_00000006.png"))
    assert json.load(open(os.path.join(workdir, "config.json")))["model"]["ch"] == 32
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))


def test_resume_is_bit_identical(uninterrupted, tmp_path):
    reference, _ = uninterrupted
    workdir = str(tmp_path)
    first = loop.train(tiny_config(num_train_steps=3, checkpoint_every_steps=3), workdir)
    assert int(first.step) == 3
    resumed = loop.train(tiny_config(num_train_steps=6, checkpoint_every_steps=3), workdir)
    assert_trees_equal(resumed, reference)


def test_kill_9_then_resume_is_bit_identical(uninterrupted, tmp_path):
    """A run killed with SIGKILL mid-way resumes from its last complete checkpoint."""
    reference, _ = uninterrupted
    workdir = str(tmp_path / "run")
    cmd = [
        sys.executable, "-m", "ddpm_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
        "--config.training.num_train_steps=100000", "--config.training.checkpoint_every_steps=3",
        "--config.training.sample_every_steps=0", "--config.training.log_every_steps=2",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while (checkpointing.latest_step(workdir) or 0) < 3:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    last = checkpointing.latest_step(workdir)
    assert last is not None and last >= 3 and last % 3 == 0
    # Continue from the last complete checkpoint up to a later multiple of 3, then compare
    # with an uninterrupted run of the same length.
    end = last + 3
    resumed = loop.train(tiny_config(num_train_steps=end, checkpoint_every_steps=3), workdir)
    if end == 6:
        expected = reference
    else:
        expected = loop.train(
            tiny_config(num_train_steps=end, checkpoint_every_steps=3), str(tmp_path / "ref")
        )
    assert_trees_equal(resumed, expected)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    workdir = str(tmp_path)
    cmd = [
        sys.executable, "-m", "ddpm_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
        "--config.training.num_train_steps=100000", "--config.training.checkpoint_every_steps=1000",
        "--config.training.sample_every_steps=0", "--config.training.log_every_steps=1",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 240
    while not (os.path.exists(metrics_path) and os.path.getsize(metrics_path) > 0):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-3000:]
    # The step it stopped at was saved although it is not a multiple of 1000.
    last = checkpointing.latest_step(workdir)
    assert last is not None and last >= 1


def test_sharded_step_equals_single_device_step():
    config = tiny_config()
    batch_np = {
        "image": np.random.default_rng(0).uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32),
        "label": np.arange(8, dtype=np.int32),
    }
    results = {}
    for name, devices in [("one", jax.devices()[:1]), ("eight", jax.devices()[:8])]:
        mesh = shd.make_mesh(devices=devices)
        setup = train.build(config, mesh)
        state = shd.init_sharded(setup.init_fn, setup.abstract, jax.random.PRNGKey(0))
        step = jax.jit(
            train.make_train_step(setup.experiment, setup.optimizer),
            in_shardings=(shd.shardings_of(setup.abstract), shd.batch_sharding(mesh)),
            out_shardings=(shd.shardings_of(setup.abstract), shd.replicated(mesh)),
        )
        batch = shd.host_to_global(batch_np, mesh)
        losses = []
        for _ in range(3):
            state, m = step(state, batch)
            losses.append(float(m["loss"]))
        if name == "eight":
            assert state.params["conv_in"]["kernel"].sharding.mesh.devices.size == 8
        results[name] = (state, losses)
    np.testing.assert_allclose(results["one"][1], results["eight"][1], rtol=1e-5)
    for a, b in zip(
        jax.tree.leaves(results["one"][0]), jax.tree.leaves(results["eight"][0]), strict=True
    ):
        # Adam divides by sqrt(v): float rounding in near-zero gradients moves an update by
        # up to a few % of lr, so compare to a fraction of the step size (lr = 1e-3 here).
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5)


def test_fsdp_and_grad_accumulation_match_the_plain_step():
    """FSDP shards big leaves; k micro-batches give the same update as one full batch."""
    batch_np = {
        "image": np.random.default_rng(1).uniform(-1, 1, (16, 8, 8, 1)).astype(np.float32),
        "label": np.zeros(16, np.int32),
    }
    config = tiny_config(batch_size=16)
    config.model.dropout = 0.0  # so that micro-batching cannot change the dropout masks.
    outs = {}
    for name, fsdp, accum in [("plain", False, 1), ("fsdp", True, 1), ("accum", False, 2)]:
        config.mesh.fsdp = fsdp
        config.mesh.fsdp_min_size = 1024  # the tiny model's leaves are small.
        config.training.grad_accum_steps = accum
        mesh = shd.make_mesh()
        setup = train.build(config, mesh)
        state = shd.init_sharded(setup.init_fn, setup.abstract, jax.random.PRNGKey(0))
        step = jax.jit(
            train.make_train_step(setup.experiment, setup.optimizer),
            in_shardings=(shd.shardings_of(setup.abstract), shd.batch_sharding(mesh)),
            out_shardings=(shd.shardings_of(setup.abstract), shd.replicated(mesh)),
        )
        state, m = step(state, shd.host_to_global(batch_np, mesh))
        outs[name] = (state, float(m["loss"]))
        if fsdp:
            specs = {str(x.sharding.spec) for x in jax.tree.leaves(state.params)}
            assert any("data" in s for s in specs), specs
    np.testing.assert_allclose(outs["fsdp"][1], outs["plain"][1], rtol=1e-5)
    for a, b in zip(
        jax.tree.leaves(outs["plain"][0]), jax.tree.leaves(outs["fsdp"][0]), strict=True
    ):
        # Adam divides by sqrt(v): float rounding in near-zero gradients moves an update by
        # up to a few % of lr, so compare to a fraction of the step size (lr = 1e-3 here).
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5)
    # Micro-batches draw their own t and noise, so the loss differs; the update is still a
    # finite, proper step of the same size.
    assert np.isfinite(outs["accum"][1])
    assert int(outs["accum"][0].step) == 1


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    config = tiny_config(num_train_steps=50, checkpoint_every_steps=2)
    config.optim.learning_rate = 1e30  # parameters blow up within a few steps.
    config.optim.warmup_steps = 0
    with pytest.raises(errors.NonFiniteError, match=r"Non-finite loss or gradient at step \d+"):
        loop.train(config, str(tmp_path))
    for step in checkpointing.Checkpointer(str(tmp_path), save_every_steps=2).all_steps():
        abstract = train.build(config, shd.make_mesh()).abstract
        state, _ = checkpointing.Checkpointer(str(tmp_path), save_every_steps=2).restore(
            abstract, step
        )
        assert checkpointing.all_finite(state), f"checkpoint {step} holds NaN/Inf"


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c.training.update(batch_size=12), r"training.batch_size = 12 .*divisible"),
        (lambda c: c.data.update(name="no_such_dataset"), "no_such_dataset"),
        (lambda c: c.data.update(channels=3), "channels"),
        (lambda c: c.data.update(image_size=7), "image_size"),
        (lambda c: c.diffusion.update(weighting="snr"), "weighting"),
        (lambda c: c.sampling.update(num_steps=1000), "sampling.num_steps"),
        (lambda c: c.training.__delattr__("seed"), r"missing field\(s\) \['seed'\]"),
    ],
)
def test_bad_configs_fail_before_compiling(edit, match, tmp_path):
    config = tiny_config()
    edit(config)
    start = time.time()
    with pytest.raises(ValueError, match=match):
        loop.train(config, str(tmp_path))
    assert time.time() - start < 30
    assert checkpointing.latest_step(str(tmp_path)) is None


def test_ema_decay_warms_up_and_the_step_applies_it():
    config = tiny_config()
    config.optim.ema_decay = 0.99
    decay = train.make_ema_decay_fn(_optim(config))
    np.testing.assert_allclose(
        [float(decay(s)) for s in (0, 8, 80, 10_000)], [0.1, 0.5, 0.9, 0.99], rtol=1e-6
    )
    config.optim.ema_warmup = False
    assert float(train.make_ema_decay_fn(_optim(config))(0)) == np.float32(0.99)
    config.optim.ema_warmup = True
    # One step from the initial state: EMA = 0.1 · initial + 0.9 · updated parameters.
    mesh = shd.make_mesh(devices=jax.devices()[:1])
    setup = train.build(config, mesh)
    state = shd.init_sharded(setup.init_fn, setup.abstract, jax.random.PRNGKey(0))
    initial = jax.device_get(state.params)
    batch = {
        "image": np.random.default_rng(2).uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32),
        "label": np.zeros(8, np.int32),
    }
    new, _ = jax.jit(train.make_train_step(setup.experiment, setup.optimizer))(state, batch)
    expected = jax.tree.map(lambda a, b: 0.1 * a + 0.9 * b, initial, jax.device_get(new.params))
    for a, b in zip(jax.tree.leaves(new.ema_params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6, atol=1e-7)
