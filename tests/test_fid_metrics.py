"""Tests of ADM's evaluator metrics in ddpm_jax.fid: the logits and spatial outputs of the
Inception (converted random weights, as tests/test_fid.py), the Inception Score, precision and
recall, sFID, and the reading of published reference files.

The references are independent numpy formulas written here (brute-force distances, softmax,
np.cov), never the library's own functions.
"""

import hashlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from scipy import linalg

from ddpm_jax import fid
from ddpm_jax.fid import frechet, inception, weights

# --------------------------------------------------------------------------- converted weights


@pytest.fixture(scope="module")
def torch_state_dict():
    """pytorch-fid-style state dict (numpy) of random variables and a random fc layer."""
    flat = traverse_util.flatten_dict(inception.random_variables(0), sep="/")
    to_torch = {v[:2]: k for k, v in weights._TORCH_TO_FLAX.items()}
    state_dict = {}
    for name, value in flat.items():
        collection, *module, layer, leaf = name.split("/")
        if leaf == "kernel":
            value = value.transpose(3, 2, 0, 1)
        state_dict[".".join(module) + "." + to_torch[(collection, f"{layer}/{leaf}")]] = value
    rng = np.random.default_rng(1)
    state_dict["fc.weight"] = (0.05 * rng.standard_normal((1008, 2048))).astype(np.float32)
    state_dict["fc.bias"] = rng.standard_normal(1008).astype(np.float32)
    return state_dict


def _save_named(flat, directory, stem):
    tmp = directory / "tmp.npz"
    weights.save_variables_npz(tmp, flat)
    path = directory / f"{stem}-{weights.sha256_file(tmp)[:8]}.npz"
    tmp.rename(path)
    return path


@pytest.fixture(scope="module")
def converted(torch_state_dict, tmp_path_factory):
    """(new .npz with the logits layer, older-style .npz without it)."""
    flat = weights.convert_state_dict(torch_state_dict)
    directory = tmp_path_factory.mktemp("w")
    old = {k: v for k, v in flat.items() if not k.startswith("fc/")}
    return _save_named(flat, directory, "new"), _save_named(old, directory, "old")


def test_logits_are_pool_times_fc_weight_and_spatial_is_mixed_6d_branch1x1(
    torch_state_dict, converted
):
    loaded = fid.load_inception_weights(str(converted[0]))
    kernel = fid.require_logits_kernel(loaded)
    assert kernel.shape == (2048, 1008)
    features_fn = fid.make_features_fn(loaded.variables, kernel, resize_input=False)
    images = jax.random.uniform(jax.random.key(0), (2, 75, 75, 3), minval=-1, maxval=1)
    out = features_fn(images)
    assert sorted(out) == ["logits", "pool", "spatial"]
    pool = np.asarray(out["pool"], np.float64)
    # ADM: logits = pool3 @ W of softmax/logits/MatMul, which is pytorch-fid's fc.weight.T.
    expected = pool @ torch_state_dict["fc.weight"].astype(np.float64).T
    np.testing.assert_allclose(out["logits"], expected, rtol=1e-5, atol=1e-5)
    # One plain forward pass with every block's output: the pool features of the FID path
    # (unchanged) and Mixed_6d's branch1x1, which is TF's mixed_6/conv.
    pool_only, state = jax.jit(
        lambda v, x: inception.FIDInceptionV3(resize_input=False).apply(
            v, x, capture_intermediates=True, mutable=["intermediates"]
        )
    )(loaded.variables, images)
    np.testing.assert_allclose(out["pool"], pool_only, rtol=1e-5, atol=1e-5)
    branch = np.asarray(state["intermediates"]["Mixed_6d"]["branch1x1"]["__call__"][0])
    # Spatial: its channels 0..6, flattened in (h, w, c) order.
    np.testing.assert_allclose(out["spatial"], branch[..., :7].reshape(2, -1), rtol=1e-5, atol=1e-5)


def test_spatial_features_are_2023_values_at_299():
    model = inception.FIDInceptionV3()  # resize_input=True
    pool, spatial = jax.eval_shape(
        lambda v, x: model.apply(v, x, spatial=True),
        inception.random_variables(0),
        jax.ShapeDtypeStruct((3, 32, 32, 3), jnp.float32),
    )
    assert pool.shape == (3, 2048) and spatial.shape == (3, 17, 17, 7)
    assert fid.SPATIAL_DIM == 17 * 17 * 7 == 2023 and fid.SPATIAL_BLOCK == "Mixed_6d"


def test_older_file_without_fc_serves_fid_and_refuses_is_in_one_line(converted):
    new, old = (fid.load_inception_weights(str(p)) for p in converted)
    assert old.logits_kernel is None and not fid.has_logits_layer(old.path)
    assert fid.has_logits_layer(new.path)
    # The fingerprint (the key of cached pool statistics) covers the network alone.
    assert old.fingerprint == new.fingerprint
    assert old.fingerprint == weights.variables_fingerprint(inception.random_variables(0))
    with pytest.raises(ValueError) as err:
        fid.require_logits_kernel(old)
    msg = str(err.value)
    assert str(old.path) in msg and "convert" in msg and "\n" not in msg
    fid.make_features_fn(old.variables, outputs=("pool", "spatial"))  # FID and sFID still work
    with pytest.raises(ValueError, match="logits_kernel"):
        fid.make_features_fn(old.variables, old.logits_kernel)


def test_cached_conversion_without_fc_is_converted_again(
    torch_state_dict, converted, tmp_path, monkeypatch
):
    """A .pth source whose cached .npz predates fc: reconverted with torch, reused without."""
    data = b"stand-in for the checkpoint bytes"
    pth = tmp_path / f"pt_inception-2015-12-05-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    pth.write_bytes(data)
    cache = tmp_path / "cache"
    cache.mkdir()
    stale = cache / f"fid_inception_v3_from_{pth.stem[-8:]}-00000000.npz"
    stale.write_bytes(converted[1].read_bytes())
    stale = stale.rename(cache / f"{stale.stem[:-8]}{weights.sha256_file(stale)[:8]}.npz")

    monkeypatch.setitem(sys.modules, "torch", None)  # no torch: the old file still serves FID
    got, reason = weights.try_load_inception_weights(str(pth), cache_dir=cache)
    assert reason is None and got.path == stale and got.logits_kernel is None

    class FakeTensor(np.ndarray):
        def detach(self):
            return self

        def cpu(self):
            return self

        def numpy(self):
            return np.asarray(self)

    fake_torch = type(sys)("torch")
    fake_torch.load = lambda *a, **k: {k_: v.view(FakeTensor) for k_, v in torch_state_dict.items()}
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    got, reason = weights.try_load_inception_weights(str(pth), cache_dir=cache)
    assert reason is None and got.path != stale and got.logits_kernel is not None
    again, _ = weights.try_load_inception_weights(str(pth), cache_dir=cache)
    assert again.path == got.path  # the file with fc is preferred from now on


def test_cli_check_reports_the_logits_layer(converted):
    def check(path):
        out = subprocess.run([sys.executable, "-m", "ddpm_jax.fid", "check", str(path)],
                             capture_output=True, text=True)  # fmt: skip
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert "logits layer present" in check(converted[0])
    assert "no logits layer" in check(converted[1])


# --------------------------------------------------------------------------- Inception Score


def _is_reference(logits, splits):
    """improved-gan / ADM: softmax, then exp(mean KL(p(y|x) || p(y))) per part."""
    e = np.exp(logits - logits.max(1, keepdims=True))
    preds = e / e.sum(1, keepdims=True)
    n, scores = len(preds), []
    for i in range(splits):
        part = preds[i * n // splits : (i + 1) * n // splits]
        kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return np.mean(scores), np.std(scores)


@pytest.mark.parametrize(("n", "splits"), [(1000, 10), (997, 3), (50, 1)])
def test_inception_score_matches_numpy(n, splits):
    logits = (3.0 * np.random.default_rng(n).standard_normal((n, 1008))).astype(np.float32)
    got = fid.inception_score(logits, splits=splits)
    np.testing.assert_allclose(got, _is_reference(logits.astype(np.float64), splits), rtol=1e-10)


def test_inception_score_closed_forms():
    confident = 60.0 * np.eye(1008)[np.arange(1000) % 10]  # 10 classes, equally often, sure
    mean, std = fid.inception_score(confident, splits=10)
    assert mean == pytest.approx(10.0, rel=1e-9) and std < 1e-9
    assert fid.inception_score(np.zeros((20, 1008)), splits=2) == pytest.approx((1.0, 0.0))
    with pytest.raises(ValueError, match="splits"):
        fid.inception_score(np.zeros((5, 1008)), splits=6)
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        fid.inception_score(np.zeros(1008))


# --------------------------------------------------------------------------- precision / recall


def _pr_reference(real, fake, k):
    """Kynkäänniemi et al.: brute-force float64 squared distances and sorted k-NN radii."""

    def sq(a, b):
        return np.sum((a[:, None, :] - b[None, :, :]) ** 2, axis=-1)

    real, fake = real.astype(np.float64), fake.astype(np.float64)
    r_real = np.sort(sq(real, real), axis=1)[:, k]  # index 0 is the point itself
    r_fake = np.sort(sq(fake, fake), axis=1)[:, k]
    d = sq(real, fake)
    precision = np.mean(np.any(d <= r_real[:, None], axis=0))
    recall = np.mean(np.any(d <= r_fake[None, :], axis=1))
    return precision, recall, r_real


@pytest.fixture(scope="module")
def feature_sets():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((300, 16)).astype(np.float32)
    fake = (rng.standard_normal((250, 16)) + 0.5).astype(np.float32)
    return real, fake


def test_precision_recall_match_brute_force_and_batched_equals_unbatched(feature_sets):
    real, fake = feature_sets
    precision, recall, radii = _pr_reference(real, fake, 3)
    assert 0.05 < precision < 0.95 and 0.05 < recall < 0.95  # a non-trivial case
    tol = 1.0 / 250 + 1e-12  # at most one borderline vector decided otherwise in float32
    whole = fid.precision_recall(real, fake, k=3, block_size=1000)  # one block: unbatched
    batched = fid.precision_recall(real, fake, k=3, block_size=64)  # padded 64x64 blocks
    np.testing.assert_allclose(whole, (precision, recall), atol=tol)
    np.testing.assert_allclose(batched, whole, atol=tol)
    np.testing.assert_allclose(fid.knn_radii(real, 3, block_size=64), radii, rtol=1e-4)
    np.testing.assert_allclose(fid.knn_radii(real, 3, block_size=1000), radii, rtol=1e-4)
    cached = fid.precision_recall(real, fake, k=3, block_size=64, real_radii=radii)
    np.testing.assert_allclose(cached, whole, atol=tol)
    k5 = _pr_reference(real, fake, 5)[:2]
    np.testing.assert_allclose(fid.precision_recall(real, fake, k=5, block_size=100), k5, atol=tol)


def test_precision_recall_closed_forms(feature_sets):
    real, _ = feature_sets
    assert fid.precision_recall(real, real, block_size=128) == (1.0, 1.0)
    assert fid.precision_recall(real, real[:100] + 100.0, block_size=128) == (0.0, 0.0)
    with pytest.raises(ValueError, match=r"\[N, 16\]"):
        fid.precision_recall(real, real[:, :8])
    with pytest.raises(ValueError, match="k must be"):
        fid.knn_radii(real[:3], k=3)


# --------------------------------------------------------------------------- sFID


def test_sfid_is_the_frechet_distance_of_streamed_spatial_statistics():
    """sFID as the evaluation computes it (streamed FeatureStats), against np.cov + sqrtm."""
    rng = np.random.default_rng(5)
    dim = 63  # the spatial width at 75x75 inputs (3x3x7); 2023 at 299x299
    a = np.abs(rng.standard_normal((200, dim))).astype(np.float32)  # post-ReLU-like
    b = np.abs(rng.standard_normal((180, dim)) * 1.2 + 0.1).astype(np.float32)
    stats = []
    for x in (a, b):
        s = frechet.init_feature_stats(dim)
        for start in range(0, len(x), 64):
            s = frechet.update_feature_stats(s, x[start : start + 64])
        stats.append(frechet.mean_and_covariance(s))
    got = fid.frechet_distance(*stats[0], *stats[1])
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    s1, s2 = np.cov(a64, rowvar=False), np.cov(b64, rowvar=False)
    r1 = linalg.sqrtm(s1).real
    expected = (
        np.sum((a64.mean(0) - b64.mean(0)) ** 2)
        + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(r1 @ s2 @ r1).real)
    )  # fmt: skip
    np.testing.assert_allclose(got, expected, rtol=1e-7)


# --------------------------------------------------------------------------- reference files

POOL, SPATIAL = 6, 5


def _stats(rng, d):
    a = rng.standard_normal((d, 2 * d))
    return rng.standard_normal(d), a @ a.T / (2 * d)


def _adm_batch(path, rng, n=10, compressed=False):
    images = rng.integers(0, 256, (n, 4, 5, 3), dtype=np.uint8)
    (mu, sigma), (mu_s, sigma_s) = _stats(rng, POOL), _stats(rng, SPATIAL)
    save = np.savez_compressed if compressed else np.savez
    save(path, arr_0=images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    return images, mu, sigma, mu_s, sigma_s


@pytest.mark.parametrize("compressed", [False, True])
def test_adm_reference_batch_read_and_streamed(tmp_path, compressed):
    path = tmp_path / "VIRTUAL_test.npz"
    images, mu, sigma, mu_s, sigma_s = _adm_batch(path, np.random.default_rng(0), 10, compressed)
    ref = fid.load_reference(path, pool_dim=POOL, spatial_dim=SPATIAL)
    assert ref.num_images == 10 and ref.image_shape == (4, 5, 3)
    assert ref.keys == ("arr_0", "mu", "mu_s", "sigma", "sigma_s")
    assert ref.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    for got, want in [(ref.mu, mu), (ref.sigma, sigma), (ref.mu_s, mu_s), (ref.sigma_s, sigma_s)]:
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, want)
    batches = list(fid.iter_reference_images(path, 4))
    assert [len(b) for b in batches] == [4, 4, 2] and all(b.dtype == np.uint8 for b in batches)
    np.testing.assert_array_equal(np.concatenate(batches), images)


def test_edm_statistics_file(tmp_path):
    rng = np.random.default_rng(1)
    mu, sigma = _stats(rng, POOL)
    np.savez(tmp_path / "cifar10-32x32.npz", mu=mu, sigma=sigma)
    ref = fid.load_reference(tmp_path / "cifar10-32x32.npz", pool_dim=POOL)
    assert ref.num_images is None and ref.mu_s is None and ref.sigma_s is None
    np.testing.assert_array_equal(ref.sigma, sigma)
    with pytest.raises(ValueError, match="has no arr_0"):
        next(fid.iter_reference_images(tmp_path / "cifar10-32x32.npz", 4))


def test_reference_files_refused_in_one_line(tmp_path):
    rng = np.random.default_rng(2)
    mu, sigma = _stats(rng, POOL)
    cases = {
        "half.npz": (dict(mu=mu), "without its pair"),
        "shape.npz": (dict(mu=mu, sigma=sigma[:5]), r"must be \[6\] and \[6, 6\]"),
        "float.npz": (dict(arr_0=np.zeros((2, 4, 4, 3), np.float32)), "must be uint8 images"),
        "gray.npz": (dict(arr_0=np.zeros((2, 4, 4), np.uint8)), "must be uint8 images"),
        "nothing.npz": (dict(labels=np.zeros(3)), "neither images"),
        "pickled.npz": (dict(mu=np.array([{"a": 1}], dtype=object), sigma=sigma), "pickle"),
    }
    for name, (arrays, phrase) in cases.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(ValueError, match=phrase) as err:
            fid.load_reference(tmp_path / name, pool_dim=POOL, spatial_dim=SPATIAL)
        assert "\n" not in str(err.value) and name in str(err.value)
    np.save(tmp_path / "single.npy", mu)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    for name, phrase in [("single.npy", "single .npy"), ("junk.npz", "not a readable .npz")]:
        with pytest.raises(ValueError, match=phrase):
            fid.load_reference(tmp_path / name)
    # Published widths by default: 2048 (pool3) and 2023 (spatial).
    with pytest.raises(ValueError, match=r"\[2048\]"):
        fid.load_reference(tmp_path / "shape.npz")
    with pytest.raises(FileNotFoundError):
        fid.load_reference(tmp_path / "absent.npz")
