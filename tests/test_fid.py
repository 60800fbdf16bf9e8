"""Tests of ddpm_jax.fid: the FID InceptionV3, its weight conversion/loading, and FID itself.

The network runs with random weights on 75x75 inputs (its minimum; no resize to 299), so no
download is needed. The PyTorch side is represented by an independent table of torchvision's
Inception3 layer shapes, not derived from the Flax module.
"""

import hashlib
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from scipy import linalg

from ddpm_jax.fid import download, frechet, inception, weights

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def variables():
    return inception.random_variables(0)


@pytest.fixture(scope="module")
def features_fn(variables):
    return inception.make_feature_fn(variables, resize_input=False)


@pytest.fixture(scope="module")
def weights_npz(variables, tmp_path_factory):
    """The random variables saved as `.npz`, named with their SHA-256 prefix."""
    flat = traverse_util.flatten_dict(variables, sep="/")
    tmp = tmp_path_factory.mktemp("w") / "tmp.npz"
    weights.save_variables_npz(tmp, flat)
    path = tmp.with_name(f"fid_test-{weights.sha256_file(tmp)[:8]}.npz")
    os.replace(tmp, path)
    return path


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- torchvision table
# Shapes of pytorch-fid's state dict, written from torchvision's Inception3 definition
# (BasicConv2d = conv without bias + BatchNorm2d), independently of the Flax module.


def _basic(name, cin, cout, k):
    kh, kw = (k, k) if isinstance(k, int) else k
    return {
        f"{name}.conv.weight": (cout, cin, kh, kw),
        f"{name}.bn.weight": (cout,),
        f"{name}.bn.bias": (cout,),
        f"{name}.bn.running_mean": (cout,),
        f"{name}.bn.running_var": (cout,),
        f"{name}.bn.num_batches_tracked": (),
    }


def _block_a(p, cin, pool):
    return {
        **_basic(f"{p}.branch1x1", cin, 64, 1),
        **_basic(f"{p}.branch5x5_1", cin, 48, 1),
        **_basic(f"{p}.branch5x5_2", 48, 64, 5),
        **_basic(f"{p}.branch3x3dbl_1", cin, 64, 1),
        **_basic(f"{p}.branch3x3dbl_2", 64, 96, 3),
        **_basic(f"{p}.branch3x3dbl_3", 96, 96, 3),
        **_basic(f"{p}.branch_pool", cin, pool, 1),
    }


def _block_c(p, c7):
    return {
        **_basic(f"{p}.branch1x1", 768, 192, 1),
        **_basic(f"{p}.branch7x7_1", 768, c7, 1),
        **_basic(f"{p}.branch7x7_2", c7, c7, (1, 7)),
        **_basic(f"{p}.branch7x7_3", c7, 192, (7, 1)),
        **_basic(f"{p}.branch7x7dbl_1", 768, c7, 1),
        **_basic(f"{p}.branch7x7dbl_2", c7, c7, (7, 1)),
        **_basic(f"{p}.branch7x7dbl_3", c7, c7, (1, 7)),
        **_basic(f"{p}.branch7x7dbl_4", c7, c7, (7, 1)),
        **_basic(f"{p}.branch7x7dbl_5", c7, 192, (1, 7)),
        **_basic(f"{p}.branch_pool", 768, 192, 1),
    }


def _block_e(p, cin):
    return {
        **_basic(f"{p}.branch1x1", cin, 320, 1),
        **_basic(f"{p}.branch3x3_1", cin, 384, 1),
        **_basic(f"{p}.branch3x3_2a", 384, 384, (1, 3)),
        **_basic(f"{p}.branch3x3_2b", 384, 384, (3, 1)),
        **_basic(f"{p}.branch3x3dbl_1", cin, 448, 1),
        **_basic(f"{p}.branch3x3dbl_2", 448, 384, 3),
        **_basic(f"{p}.branch3x3dbl_3a", 384, 384, (1, 3)),
        **_basic(f"{p}.branch3x3dbl_3b", 384, 384, (3, 1)),
        **_basic(f"{p}.branch_pool", cin, 192, 1),
    }


def _torch_state_dict_shapes():
    return {
        **_basic("Conv2d_1a_3x3", 3, 32, 3),
        **_basic("Conv2d_2a_3x3", 32, 32, 3),
        **_basic("Conv2d_2b_3x3", 32, 64, 3),
        **_basic("Conv2d_3b_1x1", 64, 80, 1),
        **_basic("Conv2d_4a_3x3", 80, 192, 3),
        **_block_a("Mixed_5b", 192, 32),
        **_block_a("Mixed_5c", 256, 64),
        **_block_a("Mixed_5d", 288, 64),
        **_basic("Mixed_6a.branch3x3", 288, 384, 3),
        **_basic("Mixed_6a.branch3x3dbl_1", 288, 64, 1),
        **_basic("Mixed_6a.branch3x3dbl_2", 64, 96, 3),
        **_basic("Mixed_6a.branch3x3dbl_3", 96, 96, 3),
        **_block_c("Mixed_6b", 128),
        **_block_c("Mixed_6c", 160),
        **_block_c("Mixed_6d", 160),
        **_block_c("Mixed_6e", 192),
        **_basic("Mixed_7a.branch3x3_1", 768, 192, 1),
        **_basic("Mixed_7a.branch3x3_2", 192, 320, 3),
        **_basic("Mixed_7a.branch7x7x3_1", 768, 192, 1),
        **_basic("Mixed_7a.branch7x7x3_2", 192, 192, (1, 7)),
        **_basic("Mixed_7a.branch7x7x3_3", 192, 192, (7, 1)),
        **_basic("Mixed_7a.branch7x7x3_4", 192, 192, 3),
        **_block_e("Mixed_7b", 1280),
        **_block_e("Mixed_7c", 2048),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    }


# --------------------------------------------------------------------------- architecture


def test_param_count_matches_torchvision_trunk():
    shapes = inception.variable_shapes()
    n_params = sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith("params/"))
    # torchvision inception_v3: 27,161,264 params, minus AuxLogits (3,326,696) and the
    # 1000-way fc (2,049,000): the conv+BN trunk. pytorch-fid adds a 1008-way fc (unused here).
    assert n_params == 21_785_568
    assert n_params + 2048 * 1008 + 1008 == 23_850_960
    assert sum(k.endswith("/conv/kernel") for k in shapes) == 94


# Output sizes annotated in torchvision's Inception3._forward for a 299x299 input.
_TORCHVISION_SIZES = {
    "Conv2d_1a_3x3": (149, 32),
    "Conv2d_2a_3x3": (147, 32),
    "Conv2d_2b_3x3": (147, 64),
    "Conv2d_3b_1x1": (73, 80),
    "Conv2d_4a_3x3": (71, 192),
    "Mixed_5b": (35, 256),
    "Mixed_5c": (35, 288),
    "Mixed_5d": (35, 288),
    "Mixed_6a": (17, 768),
    "Mixed_6b": (17, 768),
    "Mixed_6c": (17, 768),
    "Mixed_6d": (17, 768),
    "Mixed_6e": (17, 768),
    "Mixed_7a": (8, 1280),
    "Mixed_7b": (8, 2048),
    "Mixed_7c": (8, 2048),
}


def test_block_output_sizes_match_torchvision(variables):
    """A 32x32 input is resized to 299 and every block has torchvision's output size."""
    model = inception.FIDInceptionV3()  # resize_input=True
    out, state = jax.eval_shape(
        lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=["intermediates"]),
        variables,
        jnp.zeros((2, 32, 32, 3)),
    )
    assert out.shape == (2, 2048)
    sizes = {
        name: o["__call__"][0].shape[1:]
        for name, o in state["intermediates"].items()
        if name != "__call__"
    }
    assert sizes == {name: (s, s, c) for name, (s, c) in _TORCHVISION_SIZES.items()}


def test_basic_conv_batchnorm_in_inference_mode():
    """Conv -> BN with running statistics and eps 1e-3 (tiny variances make eps matter)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 5, 5, 3)).astype(np.float32)
    kernel = rng.standard_normal((1, 1, 3, 4)).astype(np.float32)
    scale, bias, mean = (rng.standard_normal(4).astype(np.float32) for _ in range(3))
    var = np.array([1e-4, 1e-3, 1e-2, 1.0], np.float32)
    variables = {
        "params": {"conv": {"kernel": kernel}, "bn": {"scale": scale, "bias": bias}},
        "batch_stats": {"bn": {"mean": mean, "var": var}},
    }
    out = inception.BasicConv2d(4, precision="highest").apply(variables, x)
    ref = np.maximum((x @ kernel[0, 0] - mean) / np.sqrt(var + 1e-3) * scale + bias, 0.0)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def _primitive_names(jaxpr):
    names = []
    for eqn in jaxpr.eqns:
        names.append(eqn.primitive.name)
        for param in eqn.params.values():
            for sub in param if isinstance(param, list | tuple) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    names.extend(_primitive_names(inner))
    return names


def test_pooling_layout_has_the_fid_graph_quirks(variables):
    """Pool ops in program order: Mixed_7b averages (excluding padding), Mixed_7c max-pools."""
    model = inception.FIDInceptionV3(resize_input=False)
    x = jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32)
    names = _primitive_names(jax.make_jaxpr(model.apply)(variables, x).jaxpr)
    pools = "".join({"reduce_window_max": "M", "reduce_window_sum": "S"}.get(n, "") for n in names)
    # An exclude-padding average pool sums the input and a ones-mask: "SS".
    expected = "MM" + "SS" * 3 + "M" + "SS" * 4 + "M" + "SS" + "M"
    assert pools == expected
    assert names.count("conv_general_dilated") == 94


def test_forward_shape_finite_and_per_example(variables, features_fn):
    key_a, key_b, key_c = jax.random.split(jax.random.key(0), 3)
    a, b, c = (
        jax.random.uniform(k, (1, 75, 75, 3), minval=-1, maxval=1) for k in (key_a, key_b, key_c)
    )
    f1 = features_fn(jnp.concatenate([a, b]))
    f2 = features_fn(jnp.concatenate([a, c]))
    assert f1.shape == (2, inception.FEATURE_DIM) and f1.dtype == jnp.float32
    assert bool(jnp.isfinite(f1).all())
    assert float(f1.min()) >= 0.0  # means of ReLU outputs
    assert float(jnp.std(f1[0])) > 0.0
    # Inference-mode BatchNorm: an image's features do not depend on the rest of the batch.
    np.testing.assert_allclose(f1[0], f2[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(f1[1], f2[1])


def test_rejects_too_small_or_wrong_channels(variables):
    model = inception.FIDInceptionV3(resize_input=False)
    with pytest.raises(ValueError, match="at least 75x75"):
        jax.eval_shape(model.apply, variables, jnp.zeros((1, 64, 64, 3)))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        jax.eval_shape(model.apply, variables, jnp.zeros((1, 75, 75, 1)))


def _torch_bilinear_1d(n_in, n_out):
    """Interpolation matrix of F.interpolate(mode='bilinear', align_corners=False)."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(np.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        lam = src - i0
        m[i, i0] += 1 - lam
        m[i, i1] += lam
    return m


@pytest.mark.parametrize(("n_in", "n_out"), [(7, 13), (13, 5), (32, 299)])
def test_resize_matches_torch_bilinear(n_in, n_out):
    x = np.random.default_rng(0).standard_normal((2, n_in, n_in, 3)).astype(np.float32)
    m = _torch_bilinear_1d(n_in, n_out)
    expected = np.einsum("ih,jw,bhwc->bijc", m, m, x, optimize=True)
    got = inception.resize_bilinear(jnp.asarray(x), n_out)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_pools_match_numpy():
    x = np.random.default_rng(1).standard_normal((1, 4, 5, 2)).astype(np.float32) - 3.0
    avg, mx = np.zeros_like(x), np.zeros_like(x)
    for i in range(4):
        for j in range(5):
            win = x[:, max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2]
            avg[:, i, j] = win.mean(axis=(1, 2))  # in-image pixels only
            mx[:, i, j] = win.max(axis=(1, 2))  # all-negative: zero padding would win
    np.testing.assert_allclose(inception.avg_pool_3x3_exclude_pad(jnp.asarray(x)), avg, rtol=1e-6)
    np.testing.assert_allclose(inception.max_pool_3x3_same(jnp.asarray(x)), mx, rtol=1e-6)


def test_images_from_uint8():
    out = inception.images_from_uint8(np.array([0, 255, 128], np.uint8))
    np.testing.assert_allclose(out, [-1.0, 1.0, 128 / 127.5 - 1], atol=1e-7)


# --------------------------------------------------------------------------- conversion


def test_converter_covers_every_variable_exactly_once(variables):
    rng = np.random.default_rng(0)
    torch_shapes = _torch_state_dict_shapes()
    state_dict = {k: rng.standard_normal(s).astype(np.float32) for k, s in torch_shapes.items()}
    flat = weights.convert_state_dict(state_dict)
    used = [k for k in torch_shapes if "num_batches" not in k]
    assert len(flat) == len(used) == 472  # injective: no two torch keys land on one variable
    # The logits layer is kept beside the network: fc.weight transposed, fc.bias as it is.
    np.testing.assert_array_equal(flat.pop("fc/kernel"), state_dict["fc.weight"].T)
    np.testing.assert_array_equal(flat.pop("fc/bias"), state_dict["fc.bias"])

    abstract = jax.eval_shape(
        inception.FIDInceptionV3(resize_input=False).init,
        jax.random.key(0),
        jnp.zeros((1, 75, 75, 3)),
    )
    tree = traverse_util.unflatten_dict(flat, sep="/")
    assert jax.tree.structure(tree) == jax.tree.structure(abstract)
    assert jax.tree.map(np.shape, tree) == jax.tree.map(lambda a: a.shape, abstract)

    w = state_dict["Mixed_6b.branch7x7_2.conv.weight"]  # [O, I, 1, 7]
    np.testing.assert_array_equal(
        flat["params/Mixed_6b/branch7x7_2/conv/kernel"], w.transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        flat["batch_stats/Mixed_7c/branch_pool/bn/var"],
        state_dict["Mixed_7c.branch_pool.bn.running_var"],
    )
    np.testing.assert_array_equal(
        flat["params/Conv2d_1a_3x3/bn/scale"], state_dict["Conv2d_1a_3x3.bn.weight"]
    )


def test_converter_rejects_unknown_and_missing_keys():
    shapes = _torch_state_dict_shapes()
    state_dict = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    with pytest.raises(ValueError, match=r"AuxLogits\.conv0\.conv\.weight"):
        weights.convert_state_dict(
            {**state_dict, "AuxLogits.conv0.conv.weight": np.zeros((128, 768, 1, 1))}
        )
    del state_dict["Mixed_5b.branch5x5_2.bn.running_var"]
    with pytest.raises(ValueError, match=r"batch_stats/Mixed_5b/branch5x5_2/bn/var"):
        weights.convert_state_dict(state_dict)


@pytest.mark.parametrize(
    ("kernel", "padding"), [((3, 3), (1, 1)), ((1, 3), (0, 1)), ((3, 1), (1, 0))]
)
def test_converted_conv_matches_torch_cross_correlation(kernel, padding):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 3, *kernel)).astype(np.float32)  # torch [O, I, kh, kw]
    x = rng.standard_normal((2, 3, 6, 7)).astype(np.float32)  # torch NCHW
    (ph, pw), (kh, kw) = padding, kernel
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    h, wd = xp.shape[2] - kh + 1, xp.shape[3] - kw + 1
    ref = np.zeros((2, 4, h, wd), np.float32)
    for i in range(h):
        for j in range(wd):
            ref[:, :, i, j] = np.einsum("bchw,ochw->bo", xp[:, :, i : i + kh, j : j + kw], w)
    conv = nn.Conv(4, kernel, padding=[(ph, ph), (pw, pw)], use_bias=False, precision="highest")
    out = conv.apply(
        {"params": {"kernel": weights.conv_kernel_from_torch(w)}}, x.transpose(0, 2, 3, 1)
    )
    np.testing.assert_allclose(out, ref.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- npz + hashes


def test_npz_round_trip_and_deterministic(variables, weights_npz, tmp_path):
    loaded = weights.load_variables_npz(weights_npz)
    assert jax.tree.structure(loaded) == jax.tree.structure(variables)
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)
    again = tmp_path / "again.npz"
    weights.save_variables_npz(again, traverse_util.flatten_dict(loaded, sep="/"))
    assert _sha(again) == _sha(weights_npz)
    assert weights.variables_fingerprint(loaded) == weights.variables_fingerprint(variables)


def test_npz_loader_names_bad_keys(variables, tmp_path):
    flat = dict(traverse_util.flatten_dict(variables, sep="/"))
    del flat["params/Mixed_6e/branch7x7dbl_3/conv/kernel"]
    flat["params/Mixed_5b/branch1x1/bn/bias"] = np.zeros(7, np.float32)
    flat["params/extra/kernel"] = np.zeros(1, np.float32)
    path = tmp_path / "bad.npz"
    weights.save_variables_npz(path, flat)
    with pytest.raises(ValueError) as err:
        weights.load_variables_npz(path)
    msg = str(err.value)
    assert "missing: params/Mixed_6e/branch7x7dbl_3/conv/kernel" in msg
    assert "unexpected: params/extra/kernel" in msg
    assert "params/Mixed_5b/branch1x1/bn/bias: (7,) (expected (64,))" in msg


def test_npz_loader_never_unpickles(tmp_path):
    path = tmp_path / "pickled.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="pickle"):
        weights.load_variables_npz(path)


def test_verify_sha256(tmp_path):
    data = b"fid weights"
    digest = hashlib.sha256(data).hexdigest()
    named = tmp_path / f"w-{digest[:8]}.pth"
    named.write_bytes(data)
    assert "prefix" in download.verify_sha256(named)
    assert digest in download.verify_sha256(named, digest.upper())
    plain = tmp_path / "w.pth"
    plain.write_bytes(data)
    with pytest.raises(ValueError, match="cannot verify"):
        download.verify_sha256(plain)
    with pytest.raises(ValueError, match="inception_sha256 must be 64 hex"):
        download.verify_sha256(plain, digest[:8])
    named.write_bytes(b"fid weightz")  # tampered
    with pytest.raises(ValueError, match="mismatch"):
        download.verify_sha256(named)
    with pytest.raises(ValueError, match="mismatch"):
        download.verify_sha256(named, digest)


def test_fetch_url_verifies_before_caching(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    data = b"some weights"
    good = src / f"w-{hashlib.sha256(data).hexdigest()[:8]}.npz"
    good.write_bytes(data)
    cache = tmp_path / "cache"
    got = download.fetch(good.as_uri(), cache)
    assert got == cache / good.name and got.read_bytes() == data
    bad = src / "v-00000000.npz"
    bad.write_bytes(data)
    with pytest.raises(ValueError, match="mismatch"):
        download.fetch(bad.as_uri(), cache)
    assert sorted(p.name for p in cache.iterdir()) == [good.name]  # nothing unverified left


def test_try_load_success_and_reasons(variables, weights_npz, tmp_path, monkeypatch):
    loaded, reason = weights.try_load_inception_weights(str(weights_npz))
    assert reason is None and loaded.path == weights_npz
    assert loaded.fingerprint == weights.variables_fingerprint(variables)
    via_url, _ = weights.try_load_inception_weights(
        weights_npz.as_uri(), _sha(weights_npz), cache_dir=tmp_path / "cache"
    )
    assert via_url.fingerprint == loaded.fingerprint

    for source, phrase in [
        (None, "config.eval.inception_weights is not set"),
        (str(tmp_path / "absent-12345678.npz"), "no file at"),
        ((tmp_path / "absent-12345678.npz").as_uri(), "could not download"),
    ]:
        got, reason = weights.try_load_inception_weights(source, cache_dir=tmp_path / "c")
        assert got is None and phrase in reason and "\n" not in reason

    data = b"not really a checkpoint"
    pth = tmp_path / f"pt_inception-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    pth.write_bytes(data)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    got, reason = weights.try_load_inception_weights(str(pth), cache_dir=tmp_path / "c")
    assert got is None and "needs torch" in reason


class _FakeTensor:
    def __init__(self, array):
        self._array = array

    def detach(self):
        return self

    def cpu(self):
        return self

    def numpy(self):
        return self._array


def test_pth_conversion_path_uses_weights_only(variables, tmp_path, monkeypatch):
    """A .pth source is read with torch.load(weights_only=True), converted once, then reused."""
    flat = traverse_util.flatten_dict(variables, sep="/")
    to_torch = {v[:2]: k for k, v in weights._TORCH_TO_FLAX.items()}
    state_dict = {"fc.weight": _FakeTensor(np.zeros((1008, 2048), np.float32))}
    for name, value in flat.items():
        collection, *module, layer, leaf = name.split("/")
        if leaf == "kernel":
            value = value.transpose(3, 2, 0, 1)
        key = ".".join(module) + "." + to_torch[(collection, f"{layer}/{leaf}")]
        state_dict[key] = _FakeTensor(value)
    calls = []

    def fake_load(path, map_location=None, weights_only=False):
        calls.append(weights_only)
        return state_dict

    monkeypatch.setitem(sys.modules, "torch", type(sys)("torch"))
    monkeypatch.setattr(sys.modules["torch"], "load", fake_load, raising=False)
    data = b"stand-in for the checkpoint bytes"
    pth = tmp_path / f"pt_inception-2015-12-05-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    pth.write_bytes(data)
    cache = tmp_path / "cache"
    loaded, reason = weights.try_load_inception_weights(str(pth), cache_dir=cache)
    assert reason is None and calls == [True]
    assert loaded.path.name.startswith(f"fid_inception_v3_from_{pth.stem[-8:]}-")
    assert loaded.fingerprint == weights.variables_fingerprint(variables)
    again, _ = weights.try_load_inception_weights(str(pth), cache_dir=cache)
    assert again.path == loaded.path and calls == [True]  # the converted file is reused


def test_try_load_raises_on_tampered_weights(weights_npz, tmp_path):
    bad = tmp_path / weights_npz.name
    data = bytearray(weights_npz.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside some weight array
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="mismatch"):
        weights.try_load_inception_weights(str(bad))


def test_cli_check(weights_npz, tmp_path):
    """`ddpm-jax-fid check FILE`: verified; a file that fails is one `error:` line, exit 2."""
    ok = subprocess.run(
        [sys.executable, "-m", "ddpm_jax.fid", "check", str(weights_npz)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert ok.returncode == 0 and "expected shapes" in ok.stdout, ok.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "ddpm_jax.fid", "check", str(tmp_path / "none-0123abcd.npz")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.strip().startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- Fréchet distance


def _random_gaussian(rng, d, n=None):
    a = rng.standard_normal((d, n or 2 * d))
    return rng.standard_normal(d), a @ a.T / a.shape[1] + 0.01 * np.eye(d)


def _fid_reference(mu1, s1, mu2, s2):
    # Symmetric form: Tr (S1 S2)^{1/2} = Tr (S1^{1/2} S2 S1^{1/2})^{1/2}.
    r1 = linalg.sqrtm(s1).real
    tr = np.trace(linalg.sqrtm(r1 @ s2 @ r1).real)
    return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr


def test_frechet_matches_independent_formula_and_is_symmetric():
    rng = np.random.default_rng(0)
    (mu1, s1), (mu2, s2) = _random_gaussian(rng, 16), _random_gaussian(rng, 16)
    fid = frechet.frechet_distance(mu1, s1, mu2, s2)
    np.testing.assert_allclose(fid, _fid_reference(mu1, s1, mu2, s2), rtol=1e-8)
    np.testing.assert_allclose(frechet.frechet_distance(mu2, s2, mu1, s1), fid, rtol=1e-8)


def test_frechet_closed_forms():
    rng = np.random.default_rng(1)
    mu1, s1 = _random_gaussian(rng, 64)
    assert abs(frechet.frechet_distance(mu1, s1, mu1, s1)) < 1e-6
    mu2 = mu1 + rng.standard_normal(64)
    np.testing.assert_allclose(
        frechet.frechet_distance(mu1, s1, mu2, s1), np.sum((mu1 - mu2) ** 2), rtol=1e-8
    )
    a, b = rng.uniform(0.1, 2.0, 8), rng.uniform(0.1, 2.0, 8)  # commuting (diagonal)
    np.testing.assert_allclose(
        frechet.frechet_distance(np.zeros(8), np.diag(a), np.zeros(8), np.diag(b)),
        np.sum((np.sqrt(a) - np.sqrt(b)) ** 2),
        rtol=1e-8,
    )


def test_frechet_singular_and_invalid_inputs():
    rng = np.random.default_rng(2)
    mu1, s1 = _random_gaussian(rng, 32, n=4)  # rank 4 + tiny ridge: nearly singular product
    s1 -= 0.01 * np.eye(32)
    mu2, s2 = _random_gaussian(rng, 32, n=4)
    s2 -= 0.01 * np.eye(32)
    fid = frechet.frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(fid) and fid > 0
    with pytest.raises(ValueError, match="imaginary"):
        frechet.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="sigma1 and sigma2"):
        frechet.frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))


def test_streaming_stats_equal_full_set():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((37, 5)) * [1, 2, 3, 4, 5] + 1e4  # large offset: stability check
    stats = frechet.init_feature_stats(5)
    for lo, hi in [(0, 10), (10, 10), (10, 17), (17, 37)]:
        stats = frechet.update_feature_stats(stats, x[lo:hi].astype(np.float32).astype(np.float64))
    mu, sigma = frechet.mean_and_covariance(stats)
    assert stats.count == 37
    xf = x.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(mu, xf.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(xf, rowvar=False), rtol=1e-8, atol=1e-10)
    halves = frechet.merge_feature_stats(
        frechet.update_feature_stats(frechet.init_feature_stats(5), xf[:20]),
        frechet.update_feature_stats(frechet.init_feature_stats(5), xf[20:]),
    )
    np.testing.assert_allclose(frechet.mean_and_covariance(halves)[1], sigma, rtol=1e-10)
    with pytest.raises(ValueError, match=r"\[N, 5\]"):
        frechet.update_feature_stats(stats, np.zeros((3, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        frechet.mean_and_covariance(
            frechet.update_feature_stats(frechet.init_feature_stats(5), xf[:1])
        )


def test_stats_files_and_cache_path(tmp_path):
    rng = np.random.default_rng(4)
    mu, sigma = _random_gaussian(rng, 6)
    path = tmp_path / "sub" / "stats.npz"
    frechet.save_stats(path, mu, sigma, num_examples=100)
    mu2, sigma2 = frechet.load_stats(path)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    np.savez(tmp_path / "bad.npz", mu=mu)
    with pytest.raises(ValueError, match="sigma"):
        frechet.load_stats(tmp_path / "bad.npz")

    fp = "0123456789abcdef" * 4
    p = frechet.reference_stats_path(tmp_path, "celeb_a_hq/256", "train[:1000]", 256, fp)
    assert p == tmp_path / "celeb_a_hq_256-train_1000-256px-all-inception_0123456789abcdef.npz"
    assert p != frechet.reference_stats_path(tmp_path, "celeb_a_hq/256", "train", 256, fp)
    assert p != frechet.reference_stats_path(
        tmp_path, "celeb_a_hq/256", "train[:1000]", 256, "f" * 64
    )
    with pytest.raises(ValueError, match="weights_fingerprint"):
        frechet.reference_stats_path(tmp_path, "cifar10", "train", 32, "xyz")
