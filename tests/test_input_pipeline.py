"""Tests of the input pipeline and the embedded digits dataset.

Most pipeline tests read a small in-memory source whose images spell out their own index
and orientation, so order, sharding, flips and padding can be checked exactly.
"""

import pathlib
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from configs import digits as digits_config
from ddpm_jax.data import digits, sources
from ddpm_jax.data import pipeline as ip
from ddpm_jax.data.config import DatasetInfo
from ddpm_jax.experiment import defaults

N = 37  # examples in the fake source: prime, so global batches straddle epoch ends.


def _fake_source(n=N, size=4):
    """Examples whose image encodes their index (row 0) and orientation (row 1)."""
    examples = []
    for i in range(n):
        image = np.zeros((size, size, 1), np.uint8)
        image[0, 0, 0], image[0, 1, 0] = i % 256, i // 256
        image[1, 0, 0] = 255  # marker: on the left unless flipped.
        examples.append({"image": image, "label": i % 10})
    return examples


def _decode(batch):
    """Returns (index, flipped) per row of a float batch made from `_fake_source`."""
    u8 = np.rint((batch["image"] + 1.0) * 127.5).astype(np.int64)
    flipped = u8[:, 1, -1, 0] == 255
    row = np.where(flipped[:, None], u8[:, 0, ::-1, 0], u8[:, 0, :, 0])
    return row[:, 0] + 256 * row[:, 1], flipped


def _train(source=None, *, batch=8, p=0, count=1, seed=0, flip=False, size=4):
    return ip.train_batches(
        _fake_source() if source is None else source,
        image_size=size,
        global_batch_size=batch,
        process_index=p,
        process_count=count,
        seed=seed,
        random_flip=flip,
    )


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    digits.prepare(data_dir)
    return str(data_dir)


def _digits_config(data_dir, **data):
    config = digits_config.get_config()
    config.data.data_dir = data_dir
    for k, v in data.items():
        config.data[k] = v
    return config


# ---------------------------------------------------------------- embedded dataset


def test_to_uint8_image_closed_form():
    pixels = np.arange(64, dtype=np.float64).reshape(8, 8) % 17
    native = digits.to_uint8_image(pixels, 8)
    np.testing.assert_array_equal(native[:, :, 0], np.round(pixels * 255 / 16))
    assert (digits.to_uint8_image(np.full((8, 8), 16.0)) == 255).all()
    assert (digits.to_uint8_image(np.zeros((8, 8))) == 0).all()
    half = digits.to_uint8_image(np.full((8, 8), 8.0), 16)
    assert half.shape == (16, 16, 1) and half.dtype == np.uint8 and (half == 128).all()
    with pytest.raises(ValueError, match="shape"):
        digits.to_uint8_image(np.zeros((16, 16)))


def test_digits_builds_offline_with_real_content(digits_dir):
    builder = digits.prepare(digits_dir)  # already built: reused
    assert builder.info.splits["train"].num_examples == digits.NUM_TRAIN == 1500
    assert builder.info.splits["test"].num_examples == digits.NUM_TEST == 297
    test = builder.as_data_source("test")
    images = np.stack([test[i]["image"] for i in range(len(test))])
    labels = np.array([test[i]["label"] for i in range(len(test))])
    assert images.shape == (297, 16, 16, 1) and images.dtype == np.uint8
    assert set(labels.tolist()) == set(range(10))
    # Oracle: the stored test split is scikit-learn's last 297 digits, converted.
    sk = load_digits()
    expected = {
        (digits.to_uint8_image(x, 16).tobytes(), int(y))
        for x, y in zip(sk.images[1500:], sk.target[1500:], strict=True)
    }
    assert {(im.tobytes(), int(y)) for im, y in zip(images, labels, strict=True)} == expected
    assert images.max() == 255 and 0.1 < (images > 127).mean() < 0.6  # strokes on black


def test_digits_prepare_is_idempotent_and_opens_by_name(digits_dir):
    files = sorted((p.name, p.stat().st_mtime_ns) for p in _version_dir(digits_dir).iterdir())
    start = time.perf_counter()
    digits.prepare(digits_dir)
    assert time.perf_counter() - start < 1.0
    assert sorted((p.name, p.stat().st_mtime_ns) for p in _version_dir(digits_dir).iterdir()) == (
        files
    )
    source = tfds.data_source("digits/16", split="train", data_dir=digits_dir, download=False)
    assert len(source) == 1500 and source[0]["image"].shape == (16, 16, 1)


def _version_dir(data_dir):
    return pathlib.Path(digits.Digits(config="16", data_dir=data_dir).data_path)


def test_digits_native_size_config(digits_dir):
    info = sources.get_dataset_info(_digits_config(digits_dir, image_size=8), split="test")
    assert info == DatasetInfo("digits", "test", 297, 8, 1, 10)
    source = digits.prepare(digits_dir, 8).as_data_source("test")
    stored = {(source[i]["image"].tobytes(), source[i]["label"]) for i in range(len(source))}
    sk = load_digits()
    native = np.round(sk.images[1500:] * 255 / 16).astype(np.uint8)[..., None]
    assert stored == {(x.tobytes(), int(y)) for x, y in zip(native, sk.target[1500:], strict=True)}


# ---------------------------------------------------------------- training batches


def test_digits_config_batches(digits_dir):
    config = _digits_config(digits_dir)
    info = sources.get_dataset_info(config)
    assert info == DatasetInfo("digits", "train", 1500, 16, 1, 10)
    data = ip.make_train_data(
        config, global_batch_size=64, process_index=0, process_count=1, seed=0
    )
    batch = data.get_batch(3)
    assert batch["image"].shape == (64, 16, 16, 1) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and set(batch["label"]) <= set(range(10))
    assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0


def test_batch_is_pure_in_seed_and_step():
    a, b = _train(seed=3, flip=True), _train(seed=3, flip=True)
    for step in (0, 5, 1234):
        np.testing.assert_array_equal(a[step]["image"], b[step]["image"])
        np.testing.assert_array_equal(a[step]["label"], b[step]["label"])
    assert not np.array_equal(_decode(a[0])[0], _decode(a[1])[0])
    assert not np.array_equal(_decode(a[0])[0], _decode(_train(seed=4, flip=True)[0])[0])


def test_images_are_scaled_exactly():
    source = _fake_source()
    batch = _train(source)[0]
    index, flipped = _decode(batch)
    assert not flipped.any()
    for row, i in enumerate(index):
        expected = source[i]["image"].astype(np.float32) / 127.5 - 1.0
        np.testing.assert_array_equal(batch["image"][row], expected)
        assert batch["label"][row] == i % 10


def test_each_epoch_is_a_permutation():
    ds = _train(batch=8)
    order = np.concatenate([_decode(ds[s])[0] for s in range(3 * N // 8 + 1)])
    epochs = [order[e * N : (e + 1) * N] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(N))
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch


def test_process_shards_partition_the_global_batch():
    whole = _train(batch=8, flip=True, seed=1)
    shards = [_train(batch=8, p=p, count=4, flip=True, seed=1) for p in range(4)]
    for step in (0, 1, 4, 9):  # step 4 straddles the first epoch end
        parts = [shard[step] for shard in shards]
        assert all(part["image"].shape[0] == 2 for part in parts)
        for key in ("image", "label"):
            np.testing.assert_array_equal(
                np.concatenate([part[key] for part in parts]), whole[step][key]
            )
    ids = np.concatenate([_decode(shard[0])[0] for shard in shards])
    assert len(set(ids.tolist())) == 8  # disjoint rows


def test_flip_only_when_configured():
    flips = np.concatenate([_decode(_train(flip=True)[s])[1] for s in range(25)])
    assert 0.3 < flips.mean() < 0.7
    assert not any(_decode(_train(flip=False)[s])[1].any() for s in range(25))


def test_iterator_resumes_at_any_step_with_prefetch():
    data = ip.TrainData(_train(flip=True), info=None, local_batch_size=8)
    it = data.iterator(0, prefetch=3)
    from_start = [next(it) for _ in range(6)]
    assert it.step == 6
    it.close()
    resumed = data.iterator(4, prefetch=0)
    for step in (4, 5):
        batch = next(resumed)
        np.testing.assert_array_equal(batch["image"], from_start[step]["image"])
        np.testing.assert_array_equal(batch["image"], data.get_batch(step)["image"])
    assert resumed.step == 6


def test_iterator_with_worker_processes_matches_get_batch():
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    data = ip.TrainData(_train(flip=True), info=None, local_batch_size=8, num_workers=1)
    it = data.iterator(2)
    try:
        for step in (2, 3):
            np.testing.assert_array_equal(next(it)["image"], data.get_batch(step)["image"])
    finally:
        it.close()


def test_varying_image_sizes_are_cropped_and_resized():
    source = [
        {"image": np.full(shape, 10 * k, np.uint8), "label": k}
        for k, shape in enumerate([(6, 10, 1), (9, 5, 1), (4, 4, 1)])
    ]
    batch = _train(source, batch=3, size=4)[0]
    assert batch["image"].shape == (3, 4, 4, 1)
    for image, label in zip(batch["image"], batch["label"], strict=True):
        np.testing.assert_allclose(image, 10 * label / 127.5 - 1.0, atol=1e-6)


# ---------------------------------------------------------------- evaluation batches


@pytest.mark.parametrize("count", [1, 2, 4])
def test_eval_covers_split_once_in_order(count):
    seen, valid = [], 0
    for p in range(count):
        ds = ip.eval_batches(
            _fake_source(),
            image_size=4,
            global_batch_size=8,
            process_index=p,
            process_count=count,
        )
        assert len(ds) == 5  # ceil(37 / 8), the same on every process
        for k in range(len(ds)):
            batch = ds[k]
            index, flipped = _decode(batch)
            rows = k * 8 + p * (8 // count) + np.arange(8 // count)
            np.testing.assert_array_equal(batch["mask"], rows < N)
            np.testing.assert_array_equal(index[batch["mask"]], rows[rows < N])
            assert not flipped.any()
            seen += index[batch["mask"]].tolist()
            valid += batch["mask"].sum()
    assert sorted(seen) == list(range(N)) and valid == N


def test_eval_data_from_config(digits_dir):
    config = _digits_config(digits_dir)
    data = ip.make_eval_data(
        config, global_batch_size=128, process_index=1, process_count=2, split="test",
        num_examples=200,
    )  # fmt: skip
    batches = list(data)
    assert len(batches) == len(data) == 2 and data.num_examples == 200
    assert [b["mask"].sum() for b in batches] == [64, 8]  # rows 64..127 and 192..199
    assert data.info.split == "test" and data.info.num_examples == 297


# ---------------------------------------------------------------- catalog datasets, errors


def test_catalog_dataset_through_mock_data(tmp_path):
    config = defaults.get_config()  # cifar10, 32×32×3, random flips
    config.data.data_dir = str(tmp_path)
    with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
        info = sources.get_dataset_info(config)
        data = ip.make_train_data(
            config, global_batch_size=8, process_index=1, process_count=2, seed=0
        )
        batch = data.get_batch(7)
        evaluation = ip.make_eval_data(
            config, global_batch_size=8, process_index=0, process_count=1, split="test"
        )
        masks = [b["mask"].sum() for b in evaluation]
    assert info == DatasetInfo("cifar10", "train", 20, 32, 3, 10)
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["label"].dtype == np.int32
    assert ((0 <= batch["label"]) & (batch["label"] < 10)).all()
    assert masks == [8, 8, 4]
    config.data.image_size = 16
    with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
        with pytest.raises(ValueError, match=r"config\.data\.image_size=32"):
            sources.get_dataset_info(config)


def test_unprepared_catalog_dataset_fails_fast_with_command(tmp_path):
    config = defaults.get_config()
    config.data.data_dir = str(tmp_path)
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="tfds build cifar10 --file_format=array_record"):
        sources.get_dataset_info(config)
    assert time.perf_counter() - start < 5.0


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("name", "no_such_dataset_xyz", "config.data.name"),
        ("image_size", 32, r"config\.data\.image_size=32 is not available"),
        ("channels", 3, "config.data.channels=1"),
        ("split", "validation", "config.data.split"),
        ("image_size", 0, "config.data.image_size"),
        ("num_workers", -1, "config.data.num_workers"),
    ],
)
def test_bad_data_config_names_the_field(digits_dir, field, value, match):
    with pytest.raises(ValueError, match=match):
        sources.get_dataset_info(_digits_config(digits_dir, **{field: value}))


def test_bad_config_outside_the_data_group(digits_dir):
    config = _digits_config(digits_dir)
    config.data.unknown_field = 1
    with pytest.raises(ValueError, match="unknown_field"):
        sources.get_dataset_info(config)
    config = _digits_config(digits_dir)
    config.model.num_classes = 7
    with pytest.raises(ValueError, match=r"config\.model\.num_classes=10"):
        sources.get_dataset_info(config)


@pytest.mark.parametrize(
    ("batch", "p", "count", "match"),
    [(10, 0, 4, "multiple of process_count=4"), (8, 4, 4, "process_index"), (0, 0, 1, "positive")],
)
def test_bad_sharding_arguments(batch, p, count, match):
    with pytest.raises(ValueError, match=match):
        _train(batch=batch, p=p, count=count)
    with pytest.raises(ValueError, match=match):
        ip.eval_batches(
            _fake_source(),
            image_size=4,
            global_batch_size=batch,
            process_index=p,
            process_count=count,
        )
