"""Tests for ddpm_jax.runtime.checkpointing: round trips, shardings, retention, atomicity."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm_jax import errors
from ddpm_jax.runtime import checkpointing, preemption, sharding
from ddpm_jax.runtime import workdir as workdir_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@flax.struct.dataclass
class _State:
    step: jax.Array
    params: dict
    ema_params: dict
    opt_state: optax.OptState
    key: jax.Array


def _make_state(seed: int = 0) -> _State:
    k = jax.random.key(seed)
    params = {
        "w": jax.random.normal(k, (16, 8), jnp.float32),
        "scale": jnp.asarray([1.5, -2.25, 3.0], jnp.bfloat16),
        "count": jnp.arange(5, dtype=jnp.int32) * (seed + 1),
    }
    ema = jax.tree.map(lambda x: x * 2, params)
    return _State(
        step=jnp.int32(seed),
        params=params,
        ema_params=ema,
        opt_state=optax.adam(1e-3).init(params),
        key=jax.random.key_data(jax.random.fold_in(k, 7)),  # uint32[2]
    )


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh()


def _bits(x) -> np.ndarray:
    """The raw bytes of an array as unsigned ints, so that equality is bit-exact."""
    a = np.asarray(x)
    return a.view(f"u{a.dtype.itemsize}") if a.dtype.itemsize in (1, 2, 4, 8) else a


def _assert_bit_exact(got, want):
    got_leaves, got_def = jax.tree.flatten(got)
    want_leaves, want_def = jax.tree.flatten(want)
    assert got_def == want_def
    for g, w in zip(got_leaves, want_leaves, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(_bits(g), _bits(w))


def _target(state, mesh, spec_fn=lambda x: P()):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec_fn(x))),
        state,
    )


def test_round_trip_is_bit_exact_with_extra(tmp_path, mesh):
    state = _make_state(3)
    rng = np.random.default_rng(123)
    rng.standard_normal(10)  # advance the generator so its state is not the seed's.
    extra = {"data_position": np.int64(4096), "rng": rng.bit_generator.state, "hash": "abc"}
    with checkpointing.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
        assert ckpt.save(3, state, extra)
        ckpt.wait_until_finished()
        got, got_extra = ckpt.restore(_target(state, mesh))
    assert isinstance(got, _State)
    assert isinstance(got.opt_state[0], optax.ScaleByAdamState)
    assert got.key.dtype == jnp.uint32 and got.params["scale"].dtype == jnp.bfloat16
    _assert_bit_exact(got, state)
    assert got_extra["data_position"] == 4096 and got_extra["hash"] == "abc"
    restored_rng = np.random.default_rng()
    restored_rng.bit_generator.state = got_extra["rng"]
    np.testing.assert_array_equal(restored_rng.integers(0, 2**62, 8), rng.integers(0, 2**62, 8))


def test_typed_prng_key_round_trip(tmp_path, mesh):
    state = {"key": jax.random.key(5), "x": jnp.ones((3,))}
    with checkpointing.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
        ckpt.save(1, state)
        ckpt.wait_until_finished()
        target = sharding.with_shardings(jax.eval_shape(lambda: state), sharding.replicated(mesh))
        got, extra = ckpt.restore(target)
    assert extra == {}
    np.testing.assert_array_equal(
        jax.random.key_data(got["key"]), jax.random.key_data(state["key"])
    )


def test_restore_onto_sharded_target(tmp_path, mesh):
    state = _make_state(1)
    with checkpointing.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
        ckpt.save(1, state)
    reopened = checkpointing.Checkpointer(tmp_path, save_every_steps=1)
    abstract = jax.eval_shape(lambda: state)
    target = sharding.with_shardings(
        abstract, sharding.state_shardings(mesh, abstract, fsdp=True, min_size=64)
    )
    got, _ = reopened.restore(target)
    reopened.close()
    w = got.params["w"]
    assert w.sharding.spec == P("data") or w.sharding.spec == P(None, "data")
    assert w.sharding.mesh.shape == mesh.shape
    assert w.addressable_shards[0].data.size == w.size // 8  # really split.
    assert got.params["scale"].sharding.spec == P()  # small leaf: replicated.
    for g, t in zip(jax.tree.leaves(got), jax.tree.leaves(target), strict=True):
        assert g.sharding == t.sharding
    _assert_bit_exact(got, state)


def test_restore_rejects_unsharded_target_and_missing_steps(tmp_path):
    with checkpointing.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
        with pytest.raises(FileNotFoundError, match="No complete checkpoint"):
            ckpt.restore({"x": jnp.zeros(3)})
        ckpt.save(1, {"x": jnp.zeros(3)})
        ckpt.wait_until_finished()
        with pytest.raises(ValueError, match=r"\['x'\] has no sharding"):
            ckpt.restore({"x": jax.ShapeDtypeStruct((3,), jnp.float32)})
        with pytest.raises(FileNotFoundError, match=r"step 7.*kept steps: \[1\]"):
            ckpt.restore({"x": jnp.zeros(3)}, step=7)
        # Concrete arrays are a valid target: their shardings are used.
        got, _ = ckpt.restore({"x": jnp.ones(3)})
        np.testing.assert_array_equal(got["x"], np.zeros(3))


def test_keep_last_k_plus_keep_period(tmp_path):
    state = {"x": jnp.zeros((2,))}
    with checkpointing.Checkpointer(
        tmp_path / "a", save_every_steps=1, keep_last=2, keep_period=4
    ) as ckpt:
        for step in range(1, 11):
            assert ckpt.save(step, state)
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [4, 8, 9, 10]
    with checkpointing.Checkpointer(
        tmp_path / "b", save_every_steps=2, keep_last=1, keep_period=6
    ) as ckpt:
        saved = [step for step in range(1, 14) if ckpt.save(step, state)]
        assert saved == [2, 4, 6, 8, 10, 12]
        assert not ckpt.should_save(13) and ckpt.should_save(14)
        assert ckpt.save(13, state, force=True)  # off-interval final/preemption save.
        assert not ckpt.save(13, state, force=True)  # never twice at one step.
        assert not ckpt.save(11, state, force=True)  # nor behind the latest.
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [6, 12, 13]
        # Old steps leave through the trash directory, which is emptied behind them.
        assert sorted(os.listdir(ckpt.directory)) == ["12", "13", "6", "_deleted"]
        assert os.listdir(os.path.join(ckpt.directory, "_deleted")) == []


def test_latest_step_after_restart_and_from_config(tmp_path):
    assert checkpointing.latest_step(tmp_path) is None
    config = ml_collections.ConfigDict(
        {"checkpoint_every_steps": 5, "keep_checkpoints": 3, "keep_period": 100}
    )
    ckpt = checkpointing.Checkpointer.from_config(tmp_path, config)
    assert ckpt.latest_step() is None
    for step in range(1, 16):
        ckpt.save(step, {"x": jnp.full((2,), float(step))}, {"step": step})
    ckpt.close()
    assert checkpointing.latest_step(tmp_path) == 15
    with checkpointing.Checkpointer.from_config(tmp_path, config) as again:
        assert again.latest_step() == 15 and again.all_steps() == [5, 10, 15]
        assert not again.save(15, {"x": jnp.zeros(2)})


def test_partial_tmp_checkpoint_is_ignored_and_cleaned(tmp_path, mesh):
    state = {"x": jnp.arange(8.0), "n": jnp.int32(0)}
    with checkpointing.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
        for step in (1, 2):
            ckpt.save(step, {"x": state["x"] + step, "n": jnp.int32(step)}, {"step": step})
    # A crash mid-write of step 3 leaves its tmp directory: copy step 2 under the tmp name
    # and damage it (truncate every file, drop the metadata), as a killed writer would.
    ckpt_dir = workdir_lib.checkpoint_dir(tmp_path)
    tmp = os.path.join(ckpt_dir, "3.orbax-checkpoint-tmp")
    shutil.copytree(os.path.join(ckpt_dir, "2"), tmp)
    os.remove(os.path.join(tmp, "_CHECKPOINT_METADATA"))
    for root, _, files in os.walk(tmp):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(3)
    assert checkpointing.latest_step(tmp_path) == 2

    with checkpointing.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
        assert ckpt.latest_step() == 2
        got, extra = ckpt.restore(_target(state, mesh))
        assert extra == {"step": 2} and int(got["n"]) == 2
        np.testing.assert_array_equal(got["x"], np.arange(8.0) + 2)
        assert ckpt.save(3, {"x": state["x"] + 3, "n": jnp.int32(3)})  # the step is redone.
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [1, 2, 3]
    assert not os.path.exists(tmp)
    assert checkpointing.restore_subtree(tmp_path, "n")[0].item() == 3


def test_nonfinite_state_is_never_saved(tmp_path):
    good = {"w": jnp.ones((4,)), "i": jnp.int32(7), "k": jax.random.key(0)}
    assert checkpointing.all_finite(good)
    assert checkpointing.all_finite({"a": np.arange(3), "b": 1.0, "c": None})
    assert not checkpointing.all_finite({"a": np.array([1.0, np.inf])})
    assert not checkpointing.all_finite({"a": float("nan")})
    bad = {
        "params": {"w": jnp.ones((4,)).at[2].set(jnp.nan), "b": jnp.zeros((2,))},
        "ema": {"s": jnp.asarray([jnp.inf], jnp.bfloat16)},
        "i": jnp.int32(1),
    }
    assert checkpointing.nonfinite_leaves(bad) == ["['ema']['s']", "['params']['w']"]
    with checkpointing.Checkpointer(tmp_path, save_every_steps=5) as ckpt:
        assert ckpt.save(5, good)
        # Off-interval steps are skipped before any check, so a NaN there costs nothing...
        assert not ckpt.save(6, bad)
        # ...but a save that would write raises, naming the step and the leaves.
        with pytest.raises(errors.NonFiniteError, match=r"step 10.*\['params'\]\['w'\]"):
            ckpt.save(10, bad)
        with pytest.raises(errors.NonFiniteError, match="last good checkpoint is step 5"):
            ckpt.save(11, bad, force=True)
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [5]
        with pytest.raises(ValueError, match=r"extra for the checkpoint at step 15.*JSON"):
            ckpt.save(15, good, {"obj": object()})
        with pytest.raises(ValueError, match="step 20"):
            ckpt.save(20, good, {"loss": float("nan")})
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [5]


def test_constructor_validates_policy(tmp_path):
    with pytest.raises(ValueError, match=r"training\.checkpoint_every_steps"):
        checkpointing.Checkpointer(tmp_path, save_every_steps=0)
    with pytest.raises(ValueError, match=r"training\.keep_checkpoints"):
        checkpointing.Checkpointer(tmp_path, save_every_steps=1, keep_last=0)
    with pytest.raises(ValueError, match=r"training\.keep_period"):
        checkpointing.Checkpointer(tmp_path, save_every_steps=1, keep_period=-1)


def test_restore_subtree_restores_ema_params_alone(tmp_path, mesh):
    state = _make_state(2)
    with checkpointing.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
        ckpt.save(2, state)
        ckpt.save(4, state.replace(ema_params=jax.tree.map(lambda x: x + 1, state.ema_params)))
    ema = checkpointing.restore_subtree(tmp_path, "ema_params", step=2)[0]
    _assert_bit_exact(ema, state.ema_params)
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(ema))
    assert {d for x in jax.tree.leaves(ema) for d in x.sharding.device_set} == set(jax.devices())
    # Latest step, onto a caller-given sharded target.
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())),
        state.ema_params,
    )
    target["w"] = jax.ShapeDtypeStruct(
        (16, 8), jnp.float32, sharding=NamedSharding(mesh, P("data"))
    )
    latest = checkpointing.restore_subtree(tmp_path, "ema_params", target)[0]
    assert latest["w"].sharding.spec == P("data")
    np.testing.assert_array_equal(latest["w"], np.asarray(state.ema_params["w"]) + 1)
    with pytest.raises(KeyError, match=r"'emaparams'.*fields: \['ema_params', 'key'"):
        checkpointing.restore_subtree(tmp_path, "emaparams")[0]
    with pytest.raises(FileNotFoundError, match="step 3"):
        checkpointing.restore_subtree(tmp_path, "ema_params", step=3)[0]
    with pytest.raises(FileNotFoundError):
        checkpointing.restore_subtree(tmp_path / "nowhere", "ema_params")[0]


def test_catch_termination_sets_flag_and_restores_handler():
    def sentinel(signum, frame):
        raise AssertionError("the previous handler must not run inside the context")

    original = signal.signal(signal.SIGTERM, sentinel)
    try:
        with preemption.catch_termination() as flag:
            assert not flag.is_set()
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 5
            while not flag.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert flag.is_set() and flag.signum == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is sentinel
    finally:
        signal.signal(signal.SIGTERM, original)


_KILL_CHILD = textwrap.dedent(
    """
    import sys
    import jax.numpy as jnp
    from ddpm_jax.runtime import checkpointing

    ckpt = checkpointing.Checkpointer(sys.argv[1], save_every_steps=1, keep_last=3)
    big = jnp.zeros((512, 1024), jnp.float32)  # 2 MiB: writes take long enough to be cut.
    for step in range(1, 100_000):
        ckpt.save(step, {"big": big + step, "step": jnp.int32(step)}, {"step": step})
        print(step, flush=True)
    """
)


def test_sigkill_mid_save_leaves_only_complete_checkpoints(tmp_path, mesh):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    child = subprocess.Popen(
        [sys.executable, "-c", _KILL_CHILD, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        for line in child.stdout:  # wait until a few saves have been started.
            if int(line) >= 4 or time.monotonic() > deadline:
                break
        time.sleep(0.05)  # land somewhere inside a later, unfinished write.
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL

    with checkpointing.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
        steps = ckpt.all_steps()
        assert steps and steps[-1] >= 3, steps
        target = {
            "big": jax.ShapeDtypeStruct(
                (512, 1024), jnp.float32, sharding=sharding.batch_sharding(mesh)
            ),
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh)),
        }
        for step in steps:  # every visible checkpoint is whole and self-consistent.
            got, extra = ckpt.restore(target, step=step)
            assert int(got["step"]) == step == extra["step"]
            big = np.asarray(got["big"])
            assert big.min() == big.max() == step
    assert not [n for n in os.listdir(workdir_lib.checkpoint_dir(tmp_path)) if "tmp" in n]


_TWO_PROCESS_CHILD = """
import sys

import jax

pid, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)

import jax.numpy as jnp
import numpy as np

from ddpm_jax import errors
from ddpm_jax.runtime import checkpointing, sharding

mesh = sharding.make_mesh()
assert mesh.devices.size == 4 and jax.process_count() == 2
per_process = sharding.validate_batch_size(8, mesh)
local = np.arange(per_process * 3, dtype=np.float32).reshape(per_process, 3) + 100 * pid
batch = sharding.host_to_global({"x": local}, mesh)
assert batch["x"].shape == (8, 3) and not batch["x"].is_fully_addressable
full = sharding.global_to_host(batch)["x"]
want = np.concatenate([np.arange(12, dtype=np.float32).reshape(4, 3) + 100 * p for p in (0, 1)])
np.testing.assert_array_equal(full, want)

def init(key):
    return {"w": jax.random.normal(key, (8, 16)), "b": jnp.zeros(3), "step": jnp.int32(0)}

key = jax.random.key(0)
abstract = sharding.sharded_abstract(init, mesh, key, fsdp=True, min_size=16)
state = sharding.init_sharded(init, abstract, key)
assert state["w"].sharding.spec == jax.sharding.PartitionSpec(None, "data")
with checkpointing.Checkpointer(workdir, save_every_steps=1, keep_last=1) as ckpt:
    assert ckpt.save(1, state, {"pos": 1})
    bad = dict(state, w=state["w"].at[0, 0].set(jnp.nan))
    try:
        ckpt.save(2, bad)
        raise AssertionError("NaN state was saved")
    except errors.NonFiniteError:
        pass
    assert ckpt.save(3, dict(state, step=state["step"] + 3), {"pos": 3})
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [3], ckpt.all_steps()
    got, extra = ckpt.restore(abstract)
assert extra == {"pos": 3} and int(got["step"]) == 3
assert got["w"].sharding == abstract["w"].sharding
w_saved = sharding.global_to_host(state["w"])
np.testing.assert_array_equal(sharding.global_to_host(got["w"]), w_saved)
w = checkpointing.restore_subtree(workdir, "w")[0]
assert w.sharding.is_fully_replicated and len(w.sharding.device_set) == 4
np.testing.assert_array_equal(np.asarray(w), w_saved)
print("OK", pid, flush=True)
"""


def test_two_processes_shard_save_and_restore(tmp_path):
    """Two JAX processes x 2 CPU devices: batches assembled and gathered across processes,
    an FSDP state (leaves spanning both processes) saved, refused when NaN, pruned and
    restored, and a subtree loaded alone."""
    script = tmp_path / "child.py"
    script.write_text(_TWO_PROCESS_CHILD)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    env = dict(
        os.environ,
        PYTHONPATH=REPO_ROOT,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
    )
    children = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), port, str(tmp_path / "workdir")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outputs = [c.communicate(timeout=120)[0] for c in children]
    finally:
        for c in children:
            c.kill()
    for i, (c, out) in enumerate(zip(children, outputs, strict=True)):
        assert c.returncode == 0 and f"OK {i}" in out, out[-3000:]
