"""The one-shot GPU measurement, as far as a CPU can run it: the launcher script end to end
(wheel install, the measurement, the JSON record), its argument handling, and the plan.

The real run needs a GPU (the figures the issue's targets name); here `--smoke` cuts every
measurement to the tiny config and one step, which checks everything but the speed.
"""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ddpm_jax import bench
from ddpm_jax.bench import gpu

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "gpu_benchmark.sh"


def _dummy_wheel(directory: Path) -> Path:
    """A minimal pure-Python wheel, so that the launcher's offline install really runs."""
    directory.mkdir()
    path = directory / "ddpm_gpu_probe-0.0.0-py3-none-any.whl"
    info = "ddpm_gpu_probe-0.0.0.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("ddpm_gpu_probe/__init__.py", "INSTALLED = True\n")
        z.writestr(
            f"{info}/METADATA", "Metadata-Version: 2.1\nName: ddpm-gpu-probe\nVersion: 0.0.0\n"
        )
        z.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        z.writestr(f"{info}/RECORD", "")
    return path


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(PYTHON=sys.executable, SITE=str(tmp_path / "site"), **extra)
    return env


def test_every_plan_entry_is_valid_settings():
    """The real plan (batch 128, 1000-step chains) and its smoke cut both build settings."""
    names = [m.name for m in gpu.PLAN]
    assert names == ["c10_bf16", "c10_f32", "celeba256_bf16", "ancestral_1000", "dpm_solver_20"]
    for m in gpu.PLAN:
        real = bench.BenchSettings(**m.settings)
        smoke = bench.BenchSettings(**gpu.smoke_settings(m.settings))
        assert smoke.parts == real.parts and smoke.sampler == real.sampler
        assert smoke.steps == 1 and smoke.batch_size == 8
    by_name = {m.name: bench.BenchSettings(**m.settings) for m in gpu.PLAN}
    assert by_name["c10_bf16"].batch_size == 128 and by_name["celeba256_bf16"].batch_size == 64
    assert by_name["ancestral_1000"].sample_steps == 1000
    assert by_name["ancestral_1000"].batch_size == 256
    dpm = by_name["dpm_solver_20"]
    assert (dpm.sampler, dpm.sample_steps, dpm.sample_spacing) == ("dpm_solver++", 20, "logsnr")
    with pytest.raises(ValueError, match=r"BenchSettings\.sampler"):
        bench.BenchSettings(sampler="heun")
    with pytest.raises(ValueError, match=r"BenchSettings\.sample_spacing"):
        bench.BenchSettings(sample_spacing="cosine")


def test_launcher_cpu_run_writes_the_record(tmp_path):
    """launch/gpu_benchmark.sh as on the lent machine: offline wheel install into SITE, then
    the measurement, writing gpu_benchmark.json, the log and the nvidia-smi read-out."""
    wheels = tmp_path / "wheels"
    _dummy_wheel(wheels)
    out = tmp_path / "out dir"  # a space: every path is quoted.
    args = [str(out), "--", "--smoke", "--noreference", "--only=c10_f32,dpm_solver_20"]
    result = subprocess.run(
        ["bash", str(SCRIPT), *args],
        env=_env(tmp_path, WHEELS=str(wheels)),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "site" / "ddpm_gpu_probe" / "__init__.py").exists()
    assert {p.name for p in out.iterdir()} == {
        "gpu_benchmark.json",
        "gpu_benchmark.log",
        "nvidia_smi.csv",
    }
    record = json.loads((out / "gpu_benchmark.json").read_text())
    assert record["smoke"] is True and record["device_kind"]
    assert set(record["measurements"]) == {"c10_f32", "dpm_solver_20"}
    f32 = record["measurements"]["c10_f32"]
    assert f32["meta"]["config"] == "configs/tiny.py"
    assert set(f32["jax"]) >= {"train", "forward", "memory"} and "sampling" not in f32["jax"]
    dpm = record["measurements"]["dpm_solver_20"]["jax"]["sampling"]
    assert dpm["sampler"] == "dpm_solver++" and dpm["chain_steps"] == 5
    summary = record["summary"]
    assert set(summary) == set(gpu.summary({}))
    assert summary["c10_f32_train_steps_per_s"] > 0
    assert summary["dpm_solver_20_chain_s_256_images"] > 0
    assert summary["c10_bf16_train_steps_per_s"] is None  # not asked for: absent, not zero.
    assert "summary (targets" in (out / "gpu_benchmark.log").read_text()


def test_launcher_arguments(tmp_path):
    """The dry run prints the two commands; no wheels, or an unknown measurement, is one
    clear line before anything runs."""
    dry = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "o", "--", "--smoke"],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert dry.returncode == 0, dry.stderr
    install, run = dry.stdout.splitlines()
    assert "pip install" in install and "--no-index" in install and ".whl/*.whl" in install
    assert "-m ddpm_jax.bench.gpu --json=o/gpu_benchmark.json --smoke" in run
    assert run.startswith(f"PYTHONPATH={tmp_path / 'site'}:.")
    empty = tmp_path / "empty"
    empty.mkdir()
    none = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path / "o")],
        env=_env(tmp_path, WHEELS=str(empty)),
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert none.returncode == 2 and "launch/gpu_wheels.sh" in none.stderr
    unknown = subprocess.run(
        [sys.executable, "-m", "ddpm_jax.bench.gpu", "--smoke", "--only=c10_fp8"],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert unknown.returncode != 0
    assert "c10_fp8" in unknown.stderr and "c10_bf16" in unknown.stderr
    assert not (tmp_path / "gpu_benchmark.json").exists()


def test_wheel_list_dry_run():
    result = subprocess.run(
        ["bash", str(REPO / "launch" / "gpu_wheels.sh"), "--dry-run", "w"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    cmd = result.stdout.split()
    assert cmd[:4] == ["python3", "-m", "pip", "download"]
    assert {"--no-deps", "--only-binary=:all:", "3.12"} <= set(cmd)
    pins = [c for c in cmd if "==" in c]
    assert pins and all(len(p.split("==")) == 2 for p in pins)
    assert {p.split("==")[0] for p in pins} >= {"ml_collections", "diffusers"}
