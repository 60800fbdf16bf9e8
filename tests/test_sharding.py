"""Tests for ddpm_jax.runtime.sharding on 8 fake CPU devices (set in conftest.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm_jax.runtime import sharding


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh()


def test_make_mesh_spans_all_devices(mesh):
    assert jax.device_count() == 8
    assert mesh.axis_names == ("data",)
    assert mesh.shape["data"] == 8
    assert set(mesh.devices.flat) == set(jax.devices())
    assert mesh.axis_types == (AxisType.Auto,)
    sub = sharding.make_mesh(None, devices=jax.devices()[:4])
    assert sub.shape["data"] == 4
    assert sharding.batch_sharding(mesh).spec == P("data")
    assert sharding.replicated(mesh).spec == P()


def test_host_to_global_shapes_sharding_and_values(mesh):
    rng = np.random.default_rng(0)
    local = {
        "image": rng.standard_normal((16, 4, 4, 3)).astype(np.float32),
        "label": np.arange(16, dtype=np.int32),
    }
    batch = sharding.host_to_global(local, mesh)
    assert batch["image"].shape == (16, 4, 4, 3)
    assert batch["label"].dtype == jnp.int32
    for x, ref in ((batch["image"], local["image"]), (batch["label"], local["label"])):
        assert x.sharding == sharding.batch_sharding(mesh)
        assert len(x.addressable_shards) == 8
        for shard in x.addressable_shards:
            assert shard.data.shape[0] == 2  # 16 rows over 8 devices.
            np.testing.assert_array_equal(np.asarray(shard.data), ref[shard.index])
    back = sharding.global_to_host(batch)
    assert isinstance(back["image"], np.ndarray)
    np.testing.assert_array_equal(back["image"], local["image"])
    np.testing.assert_array_equal(back["label"], local["label"])


def test_host_to_global_rejects_indivisible_batch(mesh):
    with pytest.raises(ValueError, match=r"divisible.*training\.batch_size"):
        sharding.host_to_global({"x": np.zeros((12, 2), np.float32)}, mesh)
    with pytest.raises(ValueError, match="leading"):
        sharding.host_to_global(np.float32(1.0), mesh)


@pytest.mark.parametrize(
    "shape, n, min_size, expected",
    [
        ((512, 1024), 8, 0, P(None, "data")),  # largest divisible dim.
        ((1024, 6), 8, 0, P("data")),
        ((3, 3, 64, 128), 8, 0, P(None, None, None, "data")),
        ((64, 64), 8, 0, P(None, "data")),  # ties: the last (output features).
        ((7, 9), 8, 0, P()),  # nothing divisible.
        ((512, 1024), 8, 10**6, P()),  # below min_size.
        ((), 8, 0, P()),  # scalar.
        ((512, 1024), 1, 0, P()),  # one device.
        ((12, 16), 4, 0, P(None, "data")),
    ],
)
def test_fsdp_spec(shape, n, min_size, expected):
    assert sharding.fsdp_spec(shape, n, min_size) == expected


def _init_state(key):
    """A small MLP with an Adam state and a step counter, as a train loop would hold it."""
    k1, k2 = jax.random.split(key)
    params = {
        "w1": jax.random.normal(k1, (6, 64)) * 0.3,
        "b1": jnp.zeros((64,)),
        "w2": jax.random.normal(k2, (64, 3)) * 0.3,
    }
    return {"step": jnp.int32(0), "params": params, "opt": optax.adam(1e-2).init(params)}


def _loss(params, batch):
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] - batch["y"]) ** 2)


def _train_step(state, batch):
    loss, grads = jax.value_and_grad(_loss)(state["params"], batch)
    updates, opt = optax.adam(1e-2).update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"step": state["step"] + 1, "params": params, "opt": opt}, loss


def test_state_shardings_fsdp_shards_big_leaves_only(mesh):
    abstract = jax.eval_shape(_init_state, jax.random.key(0))
    shard = sharding.state_shardings(mesh, abstract, fsdp=True, min_size=300)
    assert shard["params"]["w1"].spec == P(None, "data")  # 384 elements, 64 % 8 == 0.
    assert shard["opt"][0].mu["w1"].spec == P(None, "data")  # moments follow the params.
    assert shard["params"]["b1"].spec == P()  # 64 < min_size.
    assert shard["params"]["w2"].spec == P()  # 192 < min_size.
    assert shard["step"].spec == P()
    assert shard["opt"][0].count.spec == P()
    every = sharding.state_shardings(mesh, abstract, fsdp=False, min_size=0)
    assert all(s.spec == P() for s in jax.tree.leaves(every))
    # Leaves without a shape (Python scalars) are replicated, not an error.
    assert sharding.state_shardings(mesh, {"lr": 0.1}, fsdp=True, min_size=0)["lr"].spec == P()
    with pytest.raises(ValueError, match="min_size"):
        sharding.state_shardings(mesh, abstract, fsdp=True, min_size=-1)


def test_init_sharded_places_leaves_in_their_shardings(mesh):
    key = jax.random.key(0)
    abstract = sharding.sharded_abstract(_init_state, mesh, key, fsdp=True, min_size=300)
    assert abstract["params"]["w1"].sharding.spec == P(None, "data")
    state = sharding.init_sharded(_init_state, abstract, key)
    w1 = state["params"]["w1"]
    assert w1.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "data")), 2)
    assert w1.addressable_shards[0].data.shape == (6, 8)  # really split, 1/8 per device.
    assert state["params"]["w2"].addressable_shards[0].data.shape == (64, 3)
    np.testing.assert_allclose(
        np.asarray(w1), np.asarray(jax.jit(_init_state)(key)["params"]["w1"]), rtol=1e-6
    )


@pytest.mark.parametrize("fsdp", [False, True])
def test_sharded_train_step_matches_unsharded(mesh, fsdp):
    key = jax.random.key(1)
    rng = np.random.default_rng(1)
    local = {
        "x": rng.standard_normal((32, 6)).astype(np.float32),
        "y": rng.standard_normal((32, 3)).astype(np.float32),
    }
    # Reference: the same step on one device, no shardings anywhere.
    ref_state = _init_state(key)
    ref_step = jax.jit(_train_step)
    for _ in range(3):
        ref_state, ref_loss = ref_step(ref_state, local)

    abstract = sharding.sharded_abstract(_init_state, mesh, key, fsdp=fsdp, min_size=300)
    state_sh = sharding.shardings_of(abstract)
    step = jax.jit(
        _train_step,
        in_shardings=(state_sh, sharding.batch_sharding(mesh)),
        out_shardings=(state_sh, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    state = sharding.init_sharded(_init_state, abstract, key)
    batch = sharding.host_to_global(local, mesh)
    for _ in range(3):
        state, loss = step(state, batch)

    expected_w1 = P(None, "data") if fsdp else P()
    assert state["params"]["w1"].sharding.spec == expected_w1
    assert state["opt"][0].nu["w1"].sharding.spec == expected_w1
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    host = sharding.global_to_host(state)
    for got, want in zip(jax.tree.leaves(host), jax.tree.leaves(ref_state), strict=True):
        np.testing.assert_allclose(got, np.asarray(want), rtol=2e-5, atol=1e-6)
    assert int(host["step"]) == 3


def test_validate_batch_size(mesh):
    assert sharding.validate_batch_size(128, mesh, process_count=1) == 128
    assert sharding.validate_batch_size(128, 8, process_count=2) == 64
    assert sharding.validate_batch_size(8, mesh) == 8
    with pytest.raises(ValueError, match=r"training\.batch_size=100.*multiple of 8.*96 or 104"):
        sharding.validate_batch_size(100, mesh, process_count=1)
    with pytest.raises(ValueError, match=r"sampling\.batch_size=4.*e\.g\. 8"):
        sharding.validate_batch_size(4, 8, process_count=1, field="sampling.batch_size")
    with pytest.raises(ValueError, match=r"training\.batch_size=0"):
        sharding.validate_batch_size(0, 8, process_count=1)
    with pytest.raises(ValueError, match="integer"):
        sharding.validate_batch_size(12.0, 4, process_count=1)
    # 4 devices in 3 processes cannot share a batch of 8 evenly: needs a multiple of 12.
    with pytest.raises(ValueError, match="multiple of 12"):
        sharding.validate_batch_size(8, 4, process_count=3)
