"""Input pipeline throughput of every data source (part "input" of the benchmark).

    results = input_bench.measure(batch_size=128)      # python -m ddpm_jax.benchmark --parts=input
    print(input_bench.format_table(results))

For each image size (32 and 256 px by default) it generates images in a temporary directory
(smooth random RGB, which compresses like photographs; nothing is downloaded) and reads them
through each source, with `config.data.num_workers` 0 and 2:

- tfds: a TFDS dataset of PNG-encoded images in ArrayRecord files (how `tfds build
  --file_format=array_record` stores cifar10), opened by name from its data_dir;
- folder_png, folder_jpeg: a folder of PNG / JPEG (quality 90) files;
- huggingface: a `datasets.Dataset` of PNG images saved with `save_to_disk`;
- arrayrecord: the folder after `ddpm-jax-data prepare` (raw pixels).

Each is timed exactly as training reads it: `pipeline.make_train_data(...).iterator()` (random
flips on, two batches read ahead), the first batch untimed (start-up, worker spawn), then
batches until `seconds` have passed. "steps/s at 128" is images/s ÷ 128: the train steps per
second at batch 128 that the pipeline could feed. Per-image costs of the stages, timed in
this process without Grain, say where the time goes: reading and decoding an example
(`source[i]`), the model-input transform (uint8 → float32, flip), stacking a batch; what
remains of the per-image time at 0 workers is Grain's own overhead and the read-ahead
threads' contention.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
from PIL import Image

SOURCES = ("tfds", "folder_png", "folder_jpeg", "huggingface", "arrayrecord")
SIZES = (32, 256)
WORKERS = (0, 2)
_IMAGES = {32: 16384, 256: 512}  # per size; fewer makes Grain's index shuffle slower per element


def _synthetic(rng: np.random.Generator, size: int) -> Image.Image:
    base = rng.integers(0, 256, (size // 4 + 2, size // 4 + 2, 3), np.uint8)
    return Image.fromarray(base).resize((size, size), Image.Resampling.BICUBIC)


def _tfds_builder(folder: str, data_dir: str, size: int):
    """A prepared TFDS dataset (ArrayRecord, PNG) holding the PNG files of `folder`."""
    import tensorflow_datasets as tfds
    from etils import epath

    @dataclasses.dataclass(eq=False)
    class Config(tfds.core.BuilderConfig):
        image_size: int = 32

    class DdpmBenchImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")
        BUILDER_CONFIGS: ClassVar[list] = [Config(name=str(size), image_size=size)]

        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls) -> epath.Path:
            return epath.Path(__file__)  # see ddpm_jax.data.digits

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }),
            )  # fmt: skip

        def _split_generators(self, dl_manager):
            del dl_manager
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, name in enumerate(sorted(os.listdir(folder))):
                with open(os.path.join(folder, name), "rb") as f:
                    yield i, {"image": f.read(), "label": i % 10}

    shown = tfds.core.utils.tqdm_utils._active
    tfds.display_progress_bar(False)
    try:
        builder = DdpmBenchImages(config=str(size), data_dir=data_dir, file_format="array_record")
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(try_download_gcs=False),
        )
    finally:
        tfds.display_progress_bar(shown)
    return f"{builder.name}/{size}"


def make_datasets(root: str, size: int, num_images: int) -> dict[str, dict[str, Any]]:
    """Writes every source's copy of `num_images` images of `size` px under `root`.

    Returns:
      source → the `config.data` fields that read it (and "bytes": its size on disk).
    """
    from ddpm_jax.data import prepare
    from ddpm_jax.data.config import DataConfig
    from ddpm_jax.experiment import defaults

    rng = np.random.default_rng(size)
    png, jpeg = os.path.join(root, f"png{size}"), os.path.join(root, f"jpeg{size}")
    os.makedirs(png)
    os.makedirs(jpeg)
    for i in range(num_images):
        image = _synthetic(rng, size)
        image.save(os.path.join(png, f"{i:06d}.png"))
        image.save(os.path.join(jpeg, f"{i:06d}.jpg"), quality=90)
    out: dict[str, dict[str, Any]] = {
        "folder_png": {"source": "folder", "path": png},
        "folder_jpeg": {"source": "folder", "path": jpeg},
    }
    tfds_dir = os.path.join(root, f"tfds{size}")
    out["tfds"] = {"source": "tfds", "name": _tfds_builder(png, tfds_dir, size),
                   "data_dir": tfds_dir}  # fmt: skip
    try:
        import datasets
    except ImportError:
        datasets = None
    if datasets is not None:
        hf = os.path.join(root, f"hf{size}")
        files = sorted(os.listdir(png))
        table = {"image": [{"bytes": open(os.path.join(png, f), "rb").read(), "path": None}
                           for f in files]}  # fmt: skip
        features = datasets.Features({"image": datasets.Image()})
        datasets.Dataset.from_dict(table, features).save_to_disk(hf)
        out["huggingface"] = {"source": "huggingface", "path": hf}
    prepared = os.path.join(root, f"arrayrecord{size}")
    data = DataConfig.from_dict(defaults.group(
        "data", name="bench", source="folder", path=png, image_size=size, channels=3
    ))  # fmt: skip
    prepare.prepare(data, prepared, workers=0)
    out["arrayrecord"] = {"source": "arrayrecord", "path": prepared}
    for entry in out.values():
        where = entry.get("path") or entry["data_dir"]
        entry["bytes"] = sum(
            os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(where) for f in fs
        )
    return out


def _data_config(fields: dict[str, Any], size: int, workers: int):
    from ddpm_jax.data.config import DataConfig
    from ddpm_jax.experiment import defaults

    kw = {k: v for k, v in fields.items() if k != "bytes"}
    kw.setdefault("name", "bench")
    return DataConfig.from_dict(defaults.group(
        "data", image_size=size, channels=3, random_flip=True, num_workers=workers, **kw
    ))  # fmt: skip


def _throughput(data, batch_size: int, seconds: float, num_batches: int | None) -> dict:
    """images/s of the training iterator of `data` (as the training loop reads it)."""
    from ddpm_jax.data import pipeline

    start = time.perf_counter()
    train = pipeline.make_train_data(
        data, global_batch_size=batch_size, process_index=0, process_count=1, seed=0
    )
    it = train.iterator(0)
    try:
        next(it)
        startup = time.perf_counter() - start
        count, begin = 0, time.perf_counter()
        while True:
            next(it)
            count += 1
            elapsed = time.perf_counter() - begin
            done = count >= num_batches if num_batches else elapsed >= seconds and count >= 3
            if done:
                break
    finally:
        it.close()
    rate = count * batch_size / elapsed
    return {"images_per_s": rate, "batches": count, "startup_s": startup,
            "steps_per_s_at_128": rate / 128}  # fmt: skip


def _stage_costs(data, batch_size: int, samples: int = 64) -> dict[str, float]:
    """µs per image of read+decode, the model-input transform and stacking, without Grain."""
    from ddpm_jax.data import pipeline

    source, _ = pipeline.open_split(data)
    n = min(samples, len(source))
    transform = pipeline._ToModelInput(data.image_size)
    rng = np.random.default_rng(0)

    def per_image(fn: Any, repeats: int = 3) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t) / n * 1e6)
        return statistics.median(times), out

    read_us, examples = per_image(lambda: [source[i] for i in range(n)])
    transform_us, inputs = per_image(lambda: [transform(e, rng) for e in examples])
    rows = (inputs * (batch_size // n + 1))[:batch_size]
    stack_us, _ = per_image(lambda: {k: np.stack([r[k] for r in rows]) for k in rows[0]})
    return {"read_decode_us": read_us, "transform_us": transform_us,
            "stack_us": stack_us * n / batch_size}  # fmt: skip


def measure(
    settings: Any = None,
    *,
    sizes: Sequence[int] = SIZES,
    workers: Sequence[int] = WORKERS,
    sources: Sequence[str] = SOURCES,
    batch_size: int | None = None,
    seconds: float = 3.0,
    num_batches: int | None = None,
    num_images: int | None = None,
    workdir: str | None = None,
) -> dict[str, Any]:
    """Measures every (source, image size, num_workers) and the per-image stage costs.

    Args:
      settings: a `BenchSettings`; its batch_size is the pipeline's batch (default 128).
      sizes: image sizes, in pixels.
      workers: values of `config.data.num_workers`.
      sources: which of `SOURCES` (huggingface is left out when `datasets` is missing).
      batch_size: overrides the settings' batch size.
      seconds: timed seconds per measurement (at least 3 batches).
      num_batches: timed batches per measurement instead of `seconds` (for tests).
      num_images: images generated per size (default: 4,096 at ≤ 64 px, else 512).
      workdir: where the datasets are generated (default: a temporary directory, removed).

    Returns:
      {"meta": {...}, "datasets": {size: {source: bytes}}, "rows": [{"source",
       "image_size", "num_workers", "images_per_s", "steps_per_s_at_128", "batches",
       "startup_s"}], "stages": [{"source", "image_size", "read_decode_us", ...}]}.
    """
    from absl import flags

    if not flags.FLAGS.is_parsed():  # Grain worker processes read absl flags.
        flags.FLAGS.mark_as_parsed()
    batch = batch_size or (settings.batch_size if settings is not None else 128)
    root = workdir or tempfile.mkdtemp(prefix="ddpm_input_bench_")
    meta = {"batch_size": batch, "cpus": os.cpu_count(), "seconds": seconds}
    meta["load_average_start"] = list(os.getloadavg())
    results: dict[str, Any] = {
        "meta": meta,
        "datasets": {},
        "rows": [],
        "stages": [],
    }
    try:
        for size in sizes:
            count = num_images or (_IMAGES[32] if size <= 64 else _IMAGES[256])
            made = make_datasets(os.path.join(root, str(size)), size, count)
            results["datasets"][str(size)] = {k: v["bytes"] for k, v in made.items()}
            results["meta"][f"num_images_{size}"] = count
            for source in (s for s in sources if s in made):
                stages = _stage_costs(_data_config(made[source], size, 0), batch)
                results["stages"].append({"source": source, "image_size": size, **stages})
                for w in workers:
                    data = _data_config(made[source], size, w)
                    row = _throughput(data, batch, seconds, num_batches)
                    results["rows"].append(
                        {"source": source, "image_size": size, "num_workers": w, **row}
                    )
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    results["meta"]["load_average_end"] = list(os.getloadavg())
    return results


def format_table(results: dict[str, Any]) -> str:
    """The images/s table and the per-image stage costs, as plain text."""
    meta = results["meta"]
    lines = [
        f"input pipeline, batch {meta['batch_size']}, {meta['cpus']} CPUs, load average "
        f"{meta['load_average_start'][0]:.2f} at start, {meta['load_average_end'][0]:.2f} "
        "at end",
    ]
    rows = [("source", "size", "workers", "images/s", "steps/s at 128", "start-up", "on disk")]
    for r in results["rows"]:
        on_disk = results["datasets"][str(r["image_size"])][r["source"]]
        rows.append((r["source"], str(r["image_size"]), str(r["num_workers"]),
                     f"{r['images_per_s']:,.0f}", f"{r['steps_per_s_at_128']:.1f}",
                     f"{r['startup_s']:.2f} s", f"{on_disk / 2**20:.1f} MiB"))  # fmt: skip
    lines += _columns(rows)
    lines.append("per image, in this process without Grain (µs): read + decode, to float and "
                 "flip, batch stacking; total at 0 workers")  # fmt: skip
    totals = {(r["source"], r["image_size"]): 1e6 / r["images_per_s"]
              for r in results["rows"] if r["num_workers"] == 0}  # fmt: skip
    stage_rows = [("source", "size", "read+decode", "to float", "stack", "total (0 workers)")]
    for s in results["stages"]:
        total = totals.get((s["source"], s["image_size"]))
        stage_rows.append((s["source"], str(s["image_size"]), f"{s['read_decode_us']:.1f}",
                           f"{s['transform_us']:.1f}", f"{s['stack_us']:.1f}",
                           f"{total:.1f}" if total else "n/a"))  # fmt: skip
    lines += _columns(stage_rows)
    return "\n".join(lines)


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
