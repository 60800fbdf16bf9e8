"""Image folders, Hugging Face datasets and prepared ArrayRecord files as training data.

Every dataset here is generated in the test (PNG/JPEG files of mixed sizes and modes, a
`datasets.Dataset` saved to disk, a fake entry of the `datasets` cache): no network.
"""

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from configs import tiny
from ddpm_jax.data import DataConfig, decode, sources, splits
from ddpm_jax.data import pipeline as ip
from ddpm_jax.data import prepare as prep
from ddpm_jax.data.config import DatasetInfo
from ddpm_jax.errors import ConfigError
from ddpm_jax.experiment import defaults
from ddpm_jax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RNG = np.random.default_rng(0)


def _image(mode, size):
    """A smooth random image (compresses like a photo) of Pillow `mode` and (w, h) `size`."""
    w, h = size
    base = RNG.integers(0, 256, (h // 4 + 2, w // 4 + 2, 3), np.uint8)
    rgb = Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)
    if mode == "P":
        return rgb.quantize(16)
    return rgb.convert(mode)


# (relative path, mode, (w, h)): two classes, nested folders, every mode, odd sizes.
FILES = [
    ("cats/a.png", "RGB", (8, 8)),
    ("cats/b.jpg", "RGB", (20, 12)),
    ("cats/c.png", "L", (9, 17)),
    ("cats/deep/d.PNG", "RGBA", (16, 16)),
    ("cats/deep/e.png", "P", (30, 10)),
    ("cats/deep/er/f.jpeg", "L", (40, 40)),
    ("cats/g.webp", "RGB", (12, 12)),
    ("cats/h.bmp", "RGB", (8, 11)),
] + [(f"dogs/{i:02d}.png", "RGB", (8 + i % 5, 8 + i % 3)) for i in range(12)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for rel, mode, size in FILES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        _image(mode, size).save(root / rel)
    (root / "dogs" / "notes.txt").write_text("not an image")
    (root / ".cache").mkdir()
    _image("RGB", (8, 8)).save(root / ".cache" / "hidden.png")  # hidden: skipped
    return str(root)


def _data(path, **kw):
    fields = {"name": "mine", "source": "folder", "path": str(path), "image_size": 8}
    return DataConfig.from_dict(
        defaults.group("data", **{**fields, "channels": 3, "random_flip": False, **kw})
    )


def _oracle(path, size=8, channels=3):
    with Image.open(path) as im:
        return decode.to_array(im, size, channels)


def _examples(source):
    return [source[i] for i in range(len(source))]


# ---------------------------------------------------------------- folder source


def test_folder_lists_every_image_sorted_and_decodes_each_like_the_tfds_path(folder):
    source, info = sources.open_split(_data(folder))
    expected = sorted(rel for rel, _, _ in FILES)
    assert list(source.files) == expected and info.num_examples == len(FILES)
    assert info == DatasetInfo(f"folder:{folder}", "train", len(FILES), 8, 3, 0)
    for rel, example in zip(source.files, _examples(source), strict=True):
        image = example["image"]
        assert image.shape == (8, 8, 3) and image.dtype == np.uint8 and "label" not in example
        np.testing.assert_array_equal(image, _oracle(os.path.join(folder, rel)))
    # An 8×8 RGB PNG is read as is; a larger one is the TFDS path's centre crop and resize.
    with Image.open(os.path.join(folder, "cats/a.png")) as im:
        np.testing.assert_array_equal(source[0]["image"], np.asarray(im))
    with Image.open(os.path.join(folder, "dogs/04.png")) as im:  # 12×9: crop then resize
        want = decode.center_crop_resize(np.asarray(im), 8)
    np.testing.assert_array_equal(source[expected.index("dogs/04.png")]["image"], want)
    grey, _ = sources.open_split(_data(folder, channels=1))
    assert grey[2]["image"].shape == (8, 8, 1)
    # RGBA loses its alpha, palette images are expanded: both become plain RGB.
    with Image.open(os.path.join(folder, "cats/deep/d.PNG")) as im:
        rgb = np.asarray(im.convert("RGB").resize((8, 8), Image.Resampling.BICUBIC,
                                                  reducing_gap=None))  # fmt: skip
    np.testing.assert_array_equal(source[expected.index("cats/deep/d.PNG")]["image"], rgb)


def test_labels_from_first_level_folders(folder):
    data = _data(folder, labels_from_folders=True)
    source, info = sources.open_split(data, num_classes=2)
    assert info.num_classes == 2
    labels = [source[i]["label"] for i in range(len(source))]
    assert labels == [0 if f.startswith("cats/") else 1 for f in source.files]
    with pytest.raises(ValueError, match=r"config\.model\.num_classes=3 .* 2 label classes"):
        sources.get_dataset_info(data, num_classes=3)
    with pytest.raises(ValueError, match="labels_from_folders=True"):
        sources.get_dataset_info(_data(folder), num_classes=2)


def test_loose_files_with_labels_from_folders_are_refused(tmp_path):
    (tmp_path / "cls").mkdir()
    _image("RGB", (8, 8)).save(tmp_path / "cls" / "a.png")
    _image("RGB", (8, 8)).save(tmp_path / "loose.png")
    with pytest.raises(ValueError, match=r"directly in it, e.g. 'loose\.png'"):
        sources.get_dataset_info(_data(tmp_path, labels_from_folders=True))


def test_held_out_split_is_a_stable_hash_of_the_path(folder):
    data = _data(folder, eval_fraction=0.3)
    train_src, _ = sources.open_split(data)
    test_src, info = sources.open_split(data, "test")
    assert info.split == "test" and len(test_src) > 0
    assert sorted(train_src.files + test_src.files) == sorted(r for r, _, _ in FILES)
    assert all(splits.held_out(f, 0.3) for f in test_src.files)
    assert not any(splits.held_out(f, 0.3) for f in train_src.files)
    with pytest.raises(ValueError, match=r"config\.eval\.split='test' .* is empty.*"
                                         "eval_fraction"):  # fmt: skip
        sources.get_dataset_info(_data(folder), "test")
    with pytest.raises(ValueError, match=r"config\.data\.split='validation'.*\['train', 'test'\]"):
        sources.get_dataset_info(_data(folder, split="validation"))


def test_folder_batches_are_pure_in_seed_and_step_and_work_in_worker_processes(folder):
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    data = _data(folder, random_flip=True, num_workers=1)
    a, b = (ip.make_train_data(data, global_batch_size=8, process_index=0, process_count=1,
                               seed=3) for _ in range(2))  # fmt: skip
    for step in (0, 4, 17):
        np.testing.assert_array_equal(a.get_batch(step)["image"], b.get_batch(step)["image"])
    source, _ = sources.open_split(data)
    copy = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(copy[5]["image"], source[5]["image"])
    it = a.iterator(2)  # one Grain worker process
    try:
        for step in (2, 3):
            np.testing.assert_array_equal(next(it)["image"], a.get_batch(step)["image"])
    finally:
        it.close()


@pytest.mark.slow  # the folder's batches at any step: above; resume: tests/test_train.py.
def test_folder_resume_is_bit_identical(folder, tmp_path):
    """2 steps in one go, against the same run resumed from its step-1 checkpoint."""
    config = tiny.get_config()
    config.data.source, config.data.path = "folder", folder
    config.training.sample_every_steps = 0
    config.training.num_train_steps, config.training.checkpoint_every_steps = 2, 1
    workdir = str(tmp_path / "run")
    full = loop.train(config, workdir)
    with open(os.path.join(folder, "cats", "later.txt"), "w") as f:
        f.write("a new file that is not an image changes nothing")
    os.utime(os.path.join(folder, "cats", "a.png"))  # nor does a touched one
    config.training.resume_step = 1  # a fresh start from step 1's checkpoint: step 2
    resumed = loop.train(config, workdir)
    assert int(resumed.step) == 2
    leaves, want = jax.tree.leaves(resumed), jax.tree.leaves(full)
    assert len(leaves) == len(want) > 3
    for x, y in zip(leaves, want, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    saved = json.load(open(os.path.join(workdir, "config.json")))["data"]
    assert saved["source"] == "folder" and saved["path"] == folder


# ---------------------------------------------------------------- bad input


def _touch(path):
    path.write_text("")
    return path


def _truncated_jpeg(path):
    """A JPEG cut in the middle of its pixel data: the header reads, the pixels do not."""
    buffer = io.BytesIO()
    _image("RGB", (256, 256)).save(buffer, format="jpeg")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def _corrupt_folder(tmp_path, n=10):
    for i in range(n):
        _image("RGB", (8, 8)).save(tmp_path / f"{i:02d}.png")
    return tmp_path


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda p: p / "missing", FileNotFoundError, r"config\.data\.path=.*missing.* does not "),
        (lambda p: p, ValueError, "holds no image files"),
        (lambda p: _touch(p / "x.txt").parent, ValueError, r"1 other file.* 'x\.txt'"),
    ],
    ids=["missing", "empty", "no_images"],
)
def test_missing_empty_and_imageless_folders(tmp_path, make, error, match):
    with pytest.raises(error, match=match):
        sources.get_dataset_info(_data(make(tmp_path)))


def test_unreadable_images_are_named_before_anything_is_written(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "a.png").write_bytes(b"not a png")
    (root / "b.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match=r"holds no readable image: .*a\.png \(cannot ident"):
        sources.get_dataset_info(_data(root))
    _corrupt_folder(root)
    start = time.perf_counter()
    config = tiny.get_config()
    config.data.source, config.data.path = "folder", str(root)
    with pytest.raises(ValueError, match=r"2 unreadable image file\(s\) among 12: .*a\.png"):
        loop.train(config, str(tmp_path / "w"))
    assert time.perf_counter() - start < 10 and not (tmp_path / "w").exists()


def test_a_truncated_file_fails_when_read_naming_it(tmp_path):
    _truncated_jpeg(tmp_path / "t.jpg")
    source, _ = sources.open_split(_data(tmp_path))
    with pytest.raises(ValueError, match=r"cannot decode image file .*t\.jpg"):
        source[0]


def test_fewer_images_than_one_global_batch(tmp_path):
    data = _data(_corrupt_folder(tmp_path, 5))
    assert sources.get_dataset_info(data).num_examples == 5
    with pytest.raises(ValueError, match=r"has 5 images, fewer than one global batch.*=8"):
        sources.get_dataset_info(data, global_batch_size=8)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ip.make_train_data(data, global_batch_size=8, process_index=0, process_count=1, seed=0)


def test_the_command_line_prints_one_error_line_and_writes_nothing(tmp_path):
    (tmp_path / "data").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "ddpm_jax.main", "--config=configs/tiny.py",
         f"--workdir={tmp_path / 'w'}", "--config.data.source=folder",
         f"--config.data.path={tmp_path / 'data'}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": REPO},
    )  # fmt: skip
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0]
    assert errors[0].startswith("error: config.data.path=") and "holds no image files" in errors[0]
    assert "Traceback" not in result.stderr and not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"source": "folders"}, r"config\.data\.source = 'folders': must be one of 'tfds'"),
        ({"source": "folder"}, r"config\.data\.path = None: .*'folder' needs the directory"),
        ({"path": "/x"}, r"config\.data\.path = '/x': applies to .*source 'tfds'"),
        ({"labels_from_folders": True, "source": "arrayrecord", "path": "/x"}, "'folder' only"),
        ({"eval_fraction": 0.1}, r"must be 0 with config\.data\.source = 'tfds'"),
        ({"eval_fraction": 1.0, "source": "folder", "path": "/x"}, "< 1"),
        ({"image_key": ""}, r"config\.data\.image_key = ''"),
    ],
)
def test_bad_source_fields_name_the_field(fields, match):
    with pytest.raises(ConfigError, match=match):
        DataConfig.from_dict(defaults.group("data", **{"name": "digits", **fields}))


# ---------------------------------------------------------------- prepare → arrayrecord


def test_prepare_round_trip_gives_the_folder_pixels(folder, tmp_path):
    out = tmp_path / "prepared"
    result = subprocess.run(
        [sys.executable, "-m", "ddpm_jax.data", "prepare", "--source=folder", f"--path={folder}",
         f"--out={out}", "--image_size=8", "--labels_from_folders", "--eval_fraction=0.3",
         "--workers=0"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": REPO},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"--config.data.source=arrayrecord --config.data.path={out}" in result.stdout
    info = json.loads((out / "info.json").read_text())
    assert info["class_names"] == ["cats", "dogs"] and info["encoding"] == "raw"
    for split in ("train", "test"):
        want, _ = sources.open_split(
            _data(folder, labels_from_folders=True, eval_fraction=0.3), split
        )
        got, got_info = sources.open_split(_data(out, source="arrayrecord"), split, num_classes=2)
        assert got_info.num_examples == len(want) == info["splits"][split]["num_examples"]
        for a, b in zip(_examples(want), _examples(got), strict=True):
            np.testing.assert_array_equal(a["image"], b["image"])
            assert a["label"] == b["label"]
        assert pickle.loads(pickle.dumps(got))[0]["label"] == got[0]["label"]
    # PNG records, and the process pool: the same pixels again.
    png = prep.prepare(_data(folder), str(tmp_path / "png"), encoding="png", workers=1)
    assert png["num_classes"] == 0 and list(png["splits"]) == ["train"]
    source, _ = sources.open_split(_data(tmp_path / "png", source="arrayrecord"))
    want, _ = sources.open_split(_data(folder))
    np.testing.assert_array_equal(source[len(source) - 1]["image"], want[len(want) - 1]["image"])
    with pytest.raises(ValueError, match="exists and is not empty"):
        prep.prepare(_data(folder), str(out))
    with pytest.raises(ValueError, match=r"image_size=16 but .* prepared with image_size=8"):
        sources.get_dataset_info(_data(out, source="arrayrecord", image_size=16))
    with pytest.raises(ValueError, match=r"'validation' is not a split .* \['test', 'train'\]"):
        sources.get_dataset_info(_data(out, source="arrayrecord"), "validation")
    with pytest.raises(ValueError, match="is not a dataset prepared by"):
        sources.get_dataset_info(_data(folder, source="arrayrecord"))


def test_prepare_stops_at_a_file_that_does_not_decode(tmp_path):
    (tmp_path / "d").mkdir()
    root = _corrupt_folder(tmp_path / "d", 3)
    _truncated_jpeg(root / "z.jpg")
    with pytest.raises(ValueError, match=r"cannot decode image file .*z\.jpg"):
        prep.prepare(_data(root), str(tmp_path / "out"), workers=0)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- Hugging Face datasets


@pytest.fixture(scope="module")
def hf_saved(tmp_path_factory):
    datasets = pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("hf")
    modes = ["RGB", "L", "RGBA", "P"]
    pil = [_image(modes[i % 4], (8 + i % 7, 8 + i % 4)) for i in range(24)]
    features = datasets.Features(
        {"img": datasets.Image(), "fine": datasets.ClassLabel(names=["a", "b", "c"]),
         "caption": datasets.Value("string")}
    )  # fmt: skip
    single = datasets.Dataset.from_dict(
        {"img": pil, "fine": [i % 3 for i in range(24)], "caption": ["x"] * 24}, features
    )
    single.save_to_disk(str(root / "single"))
    datasets.DatasetDict({"train": single.select(range(16)), "valid": single.select(range(16, 24))}
                         ).save_to_disk(str(root / "dict"))  # fmt: skip
    return root, pil


def _hf(path, **kw):
    return _data(path, **{"source": "huggingface", "image_key": "img", "label_key": "fine", **kw})


def test_huggingface_saved_dataset_decodes_like_the_folder_source(hf_saved):
    root, pil = hf_saved
    source, info = sources.open_split(_hf(root / "single"), num_classes=3)
    assert info == DatasetInfo(f"huggingface:{root / 'single'}", "train", 24, 8, 3, 3)
    for i, example in enumerate(_examples(source)):
        stored = Image.open(io.BytesIO(source.dataset.data.column("img")[i].as_py()["bytes"]))
        np.testing.assert_array_equal(example["image"], decode.to_array(stored, 8, 3))
        assert example["label"] == i % 3
    np.testing.assert_array_equal(source[0]["image"], np.asarray(pil[0]))  # 8×8 RGB, lossless
    copy = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(copy[7]["image"], source[7]["image"])
    held = sources.open_split(_hf(root / "single", eval_fraction=0.25), "test")[0]
    assert list(held.rows) == [i for i in range(24) if splits.held_out(str(i), 0.25)]
    valid, info = sources.open_split(_hf(root / "dict", split="valid"))
    assert info.num_examples == 8 and info.num_classes == 3
    np.testing.assert_array_equal(valid[0]["image"], source[16]["image"])
    data = ip.make_train_data(_hf(root / "dict"), global_batch_size=8, process_index=1,
                              process_count=2, seed=0)  # fmt: skip
    assert data.get_batch(3)["image"].shape == (4, 8, 8, 3)


def test_huggingface_bad_input(hf_saved, tmp_path):
    root, _ = hf_saved
    with pytest.raises(ValueError, match=r"no column 'image' .* \['img', 'fine', 'caption'\]"):
        sources.get_dataset_info(_data(root / "single", source="huggingface"))
    with pytest.raises(ValueError, match=r"'test' is not a split .* \['train', 'valid'\]"):
        sources.get_dataset_info(_hf(root / "dict"), "test")
    with pytest.raises(ValueError, match="'caption' holds string, not class indices"):
        sources.get_dataset_info(_hf(root / "single", label_key="caption"), num_classes=3)
    assert sources.get_dataset_info(_hf(root / "single", label_key=None)).num_classes == 0
    with pytest.raises(ValueError, match="not a directory written by datasets' save_to_disk"):
        sources.get_dataset_info(_hf(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sources.get_dataset_info(_hf(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"does not decode|cannot identify|not uint8"):
        sources.get_dataset_info(_hf(root / "single", image_key="caption"))
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"load_dataset\('someone/absent'.*save_to_disk"):
        sources.get_dataset_info(_hf("hf://someone/absent", data_dir=str(tmp_path)))
    assert time.perf_counter() - start < 5


def test_huggingface_hub_name_from_the_datasets_cache(hf_saved, tmp_path):
    """A cache entry as `load_dataset` leaves it (written here by its arrow builder)."""
    datasets = pytest.importorskip("datasets")
    root, _ = hf_saved
    arrow = next(p for p in os.listdir(root / "single") if p.endswith(".arrow"))
    work = tmp_path / "work"
    builder = datasets.load_dataset_builder(
        "arrow", data_files={"train": str(root / "single" / arrow)}, cache_dir=str(work)
    )
    builder.download_and_prepare()
    built = os.path.dirname(next(os.path.join(d, f) for d, _, fs in os.walk(work) for f in fs
                                 if f.endswith("-train.arrow")))  # fmt: skip
    entry = tmp_path / "cache" / "someone___fake" / "default" / "0.0.0" / "abc"
    shutil.copytree(built, entry)
    os.rename(entry / "arrow-train.arrow", entry / "fake-train.arrow")
    source, info = sources.open_split(_hf("hf://someone/fake", data_dir=str(tmp_path / "cache")))
    assert info.num_examples == 24 and info.num_classes == 3
    single, _ = sources.open_split(_hf(root / "single"))
    np.testing.assert_array_equal(source[5]["image"], single[5]["image"])


def test_prepare_from_huggingface(hf_saved, tmp_path):
    root, _ = hf_saved
    info = prep.prepare(_hf(root / "dict", channels=1), str(tmp_path / "out"), workers=0)
    assert sorted(info["splits"]) == ["train", "valid"] and info["class_names"] == ["a", "b", "c"]
    got, _ = sources.open_split(_data(tmp_path / "out", source="arrayrecord", channels=1), "valid")
    want, _ = sources.open_split(_hf(root / "dict", channels=1, split="valid"))
    for a, b in zip(_examples(want), _examples(got), strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        assert a["label"] == b["label"]


# ---------------------------------------------------------------- the input benchmark


def test_input_benchmark_measures_every_source(tmp_path):
    pytest.importorskip("datasets")
    from ddpm_jax.bench import input_bench

    results = input_bench.measure(
        sizes=(8,), workers=(0,), batch_size=8, num_batches=2, num_images=32,
        workdir=str(tmp_path)
    )  # fmt: skip
    rows = results["rows"]
    assert {r["source"] for r in rows} == set(input_bench.SOURCES)
    for r in rows:
        assert r["image_size"] == 8 and r["num_workers"] == 0
        assert r["images_per_s"] > 0 and r["steps_per_s_at_128"] == r["images_per_s"] / 128
    table = input_bench.format_table(results)
    assert "arrayrecord" in table and "images/s" in table
