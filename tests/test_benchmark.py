"""The benchmark on the tiny config: its parts run, and its JSON record is complete and sane.

Timings are not asserted (the CPU is shared); only structure, positivity and finiteness, and
the figures that are exact: parameter counts and the reference's architecture.
"""

import json
import math
import os

import pytest

from configs import tiny
from ddpm_jax import bench, models
from ddpm_jax.bench import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The model parts only: the sampler-accuracy part has its own cut test below (in full it
# runs every sampler, spacing and step count on the oracles: minutes on 2 cores).
SETTINGS = bench.BenchSettings(
    batch_size=8, steps=1, repeats=2, warmup=1, sample_steps=2, parts=common.MODEL_PARTS
)


def _config():
    """configs/tiny.py with its U-Net cut to one level (attention kept), to compile faster."""
    config = tiny.get_config()
    config.model.ch_mult = (1,)
    config.model.attn_resolutions = (8,)
    return config


def _positive_finite(x):
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def _check_timing(t):
    assert len(t["per_repeat_s"]) == SETTINGS.repeats
    assert all(_positive_finite(v) for v in t["per_repeat_s"])
    assert t["min_s"] <= t["median_s"] <= t["max_s"]


def _check_common(part):
    _check_timing(part["step_s"])
    assert part["images_per_s"] == pytest.approx(SETTINGS.batch_size / part["step_s"]["median_s"])


@pytest.fixture(scope="module")
def results():
    return bench.run(_config(), SETTINGS, config_name="configs/tiny.py")


def test_jax_figures(results, tmp_path):
    ours = results["jax"]
    config = _config()
    assert ours["params"] == models.count_params(
        models.abstract_variables(models.create_model(config))["params"]
    )
    for part in ("train", "forward"):
        _check_common(ours[part])
        assert _positive_finite(ours[part]["lower_s"]) and _positive_finite(ours[part]["compile_s"])
        assert _positive_finite(ours[part]["flops_per_image"])
        assert _positive_finite(ours[part]["achieved_tflops_per_s"])
        assert ours[part]["mfu"] is None  # no peak is known for a CPU.
    assert ours["train"]["steps_per_s"] == pytest.approx(1 / ours["train"]["step_s"]["median_s"])
    # Forward + backward costs about 3 forwards: the cost analysis counted the backward pass.
    ratio = ours["train"]["flops_per_image"] / ours["forward"]["flops_per_image"]
    assert 2.5 < ratio < 4.0
    # Per-image FLOPs of the sharded program (8 devices here) equal the unsharded count.
    assert ours["forward"]["flops_per_image"] == pytest.approx(
        models.forward_flops(config, SETTINGS.batch_size) / SETTINGS.batch_size, rel=0.02
    )
    assert ours["train"]["xla_memory_per_device"]["total_bytes"] > 0
    s = ours["sampling"]
    _check_timing(s["chain_s"])
    assert s["chain_steps"] == 2 and s["full_chain_steps"] == config.diffusion.num_timesteps
    assert s["per_step_s"] == pytest.approx(s["chain_s"]["median_s"] / 2)
    assert s["full_chain_s_projected"] == pytest.approx(s["per_step_s"] * 100)
    assert _positive_finite(s["per_step_over_forward"])
    assert set(s["compile_by_chain_steps"]) == {"2", "100"}  # (sample_steps, T) by default.
    assert all(_positive_finite(c["compile_s"]) for c in s["compile_by_chain_steps"].values())
    assert ours["memory"]["bytes"] > 0
    assert results["reference"] is None and results["ratios"] is None

    path = tmp_path / "out" / "bench.json"
    bench.write_json(results, str(path))
    loaded = json.loads(path.read_text())
    meta = loaded["meta"]
    assert meta["config"] == "configs/tiny.py" and meta["batch_size"] == 8
    assert meta["dtype"] == "float32" and meta["platform"] == "cpu" and meta["jax"]
    assert "XLA_FLAGS" in meta and meta["date"].startswith("20")
    table = bench.format_table(loaded)
    assert "train: images/s" in table and "sampler compile, 100 steps" in table


def test_torch_reference():
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from ddpm_jax.bench import torch_ref

    config = _config()
    settings = bench.BenchSettings(batch_size=8, steps=1, repeats=1, warmup=0, sample_steps=2)
    ref = torch_ref.measure(config, settings, "cpu", None, {"train": 1e6, "forward": 3e5})
    # The same architecture: diffusers' layers hold exactly ddpm_jax's parameter count.
    ours = models.count_params(models.abstract_variables(models.create_model(config))["params"])
    assert ref["params"] == ours
    for part in ("train", "forward"):
        assert _positive_finite(ref[part]["images_per_s"])
        assert _positive_finite(ref[part]["achieved_tflops_per_s"])
    assert _positive_finite(ref["sampling"]["per_step_s"])
    assert ref["memory"]["bytes"] > 0
    ratios = bench.report.ratios({"train": {"images_per_s": 2.0}}, {"train": {"images_per_s": 1.0}})
    assert ratios == {"train_images_per_s": 2.0}


def test_cifar10_reference_architecture():
    """diffusers' UNet2DModel as configured matches Ho et al.'s 35,746,307 parameters."""
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from configs import cifar10
    from ddpm_jax.bench import torch_ref

    kwargs = torch_ref.diffusers_kwargs(cifar10.get_config())
    assert kwargs["down_block_types"] == (
        "DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"
    )  # fmt: skip
    assert kwargs["up_block_types"] == ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    with __import__("torch").device("meta"):
        net = diffusers.UNet2DModel(**kwargs)
    assert sum(p.numel() for p in net.parameters()) == 35_746_307


def test_peaks_and_settings():
    assert common.peak_tflops_for("NVIDIA H100 80GB HBM3") == (989.0, "table: H100 bf16 dense")
    assert common.peak_tflops_for("TPU v5 lite")[0] == 197.0
    assert common.peak_tflops_for("TPU v5p")[0] == 459.0
    assert common.peak_tflops_for("cpu")[0] is None
    assert common.peak_tflops_for("cpu", 1.5) == (1.5, "given (--peak_tflops)")
    rates = common.flop_rates(1e9, 100.0, 0.5, 2)  # 0.1 TFLOP/s of a 1 TFLOP/s pair.
    assert rates["achieved_tflops_per_s"] == pytest.approx(0.1)
    assert rates["mfu"] == pytest.approx(0.1)
    for bad in ({"batch_size": 0}, {"parts": ("train", "eval")}, {"peak_tflops": 0.0},
                {"compile_sample_steps": (0,)}):  # fmt: skip
        with pytest.raises(ValueError, match="BenchSettings"):
            bench.BenchSettings(**bad)
    with pytest.raises(ValueError, match="reference"):
        bench.run(tiny.get_config(), SETTINGS, reference="tensorflow")


def test_sampler_accuracy_oracles_and_tables(monkeypatch):
    """The oracles are exact, and a cut run of the part gives its tables."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ddpm_jax import schedules
    from ddpm_jax.bench import sampler_accuracy as sa

    sched = schedules.make_schedule(schedules.get_beta_schedule("linear", 1000))
    # One component: the mixture's denoiser is the Gaussian posterior mean.
    one = sa.Mixture(np.array([1.0]), np.full((1, 3), 0.3), np.array([0.5]))
    x, t = jax.random.normal(jax.random.PRNGKey(0), (4, 3)), jnp.array([0, 10, 500, 999])
    a = sched.alphas_cumprod[t][:, None]
    want = 0.3 + jnp.sqrt(a) * 0.25 / (0.25 * a + 1 - a) * (x - jnp.sqrt(a) * 0.3)
    np.testing.assert_allclose(one.denoiser(sched)(x, t), want, rtol=1e-5, atol=1e-6)
    # The mixture's denoiser at t = 0 maps a point near a mode onto that mode's neighbourhood.
    near = jnp.asarray(sa.MIXTURE.means + 0.01)
    np.testing.assert_allclose(sa.MIXTURE.denoiser(sched)(near, jnp.zeros(4, jnp.int32)), near,
                               atol=0.01)  # fmt: skip
    draws = sa.MIXTURE.draw(jax.random.PRNGKey(1), 20000)
    np.testing.assert_allclose(sa.MIXTURE.mode_weights(draws), sa.MIXTURE.weights, atol=0.02)
    assert sa.sliced_wasserstein(draws, draws) == 0.0
    assert sa.sliced_wasserstein(draws, draws + 0.1) > 0.05

    monkeypatch.setattr(sa, "STEPS", (5,))
    monkeypatch.setattr(sa, "SPACINGS", ("logsnr",))
    monkeypatch.setattr(sa, "SAMPLERS", sa.SAMPLERS[:2] + sa.SAMPLERS[3:4])
    gaussian = sa.gaussian_errors(sched, n=16)
    assert set(gaussian["logsnr"]) == {"ddim", "dpm_solver++ 2"}
    assert gaussian["logsnr"]["dpm_solver++ 2"]["5"] < gaussian["logsnr"]["ddim"]["5"]
    mixture = sa.mixture_errors(sched, n=256)
    cost = {"forward_s": 0.1, "samplers": {"ddim": {"step_over_forward": 1.0}}}
    results = {"gaussian": gaussian, "mixture": mixture, "step_cost": cost}
    table = sa.format_table(results)
    assert "dpm_solver++ 2" in table and "sliced W1" in table


def test_sampler_accuracy_at_equal_network_evaluations(monkeypatch):
    """(d): the oracle stays exact at fractional timesteps, and a cut run gives its table."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ddpm_jax import edm_discrete, schedules
    from ddpm_jax.bench import sampler_accuracy as sa

    sched = schedules.make_schedule(schedules.get_beta_schedule("linear", 1000))
    one = sa.Mixture(np.array([1.0]), np.full((1, 3), 0.3), np.array([0.5])).denoiser(sched)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 3))
    t = jnp.array([0, 10, 999])
    np.testing.assert_allclose(one(x, t.astype(jnp.float32)), one(x, t), rtol=1e-5, atol=1e-6)
    # At a fractional t the model is the exact denoiser at the σ that t stands for.
    sigma = jnp.array([0.05, 1.7, 60.0])
    denoise = edm_discrete.denoiser(one, sched, parameterization="x0")
    want = 0.3 + (0.25 / (0.25 + sigma**2))[:, None] * (x - 0.3)
    np.testing.assert_allclose(denoise(x, sigma), want, rtol=1e-5, atol=1e-6)

    monkeypatch.setattr(sa, "EVALUATIONS", (9,))
    monkeypatch.setattr(sa, "EQUAL_COST_SAMPLERS", sa.EQUAL_COST_SAMPLERS[:3])
    eq = sa.equal_cost_errors(sched, n=16)
    assert set(eq["discrete"]) == {"euler", "heun", "dpm_solver++ 2"}
    assert eq["discrete"]["dpm_solver++ 2"]["9"] < eq["discrete"]["euler"]["9"]
    assert set(eq["edm"]) == {"euler", "heun"}
    mixture = {"spacing": "logsnr", "num_samples": 0, "noise_floor_sw": 0.0, "samplers": {},
               "data_noise_floor_sw": 0.0, "reference_sw_to_data": 0.0}  # fmt: skip
    cost = {"forward_s": 0.1, "samplers": {}}
    results = {"gaussian": {}, "mixture": mixture, "step_cost": cost, "equal_cost": eq}
    table = sa.format_table(results)
    assert "(d) Gaussian data" in table and "EDM formulation" in table


def test_the_command_needs_a_config_only_for_the_model_parts():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "ddpm_jax.benchmark", "--parts=train,sampler_accuracy"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: --parts=train measures a model: give its config, e.g. --config=configs/cifar10.py."
    ]


def _check_restart(restart, results, directory, parts):
    runs = results["on"]
    names = {"train": ("first", "resumed"), "sampler": ("first", "second"),
             "sample": ("first", "second"), "eval": ("first", "second")}  # fmt: skip
    assert set(runs) == {f"{p}_{r}" for p in parts for r in names[p]}
    for name in ("train_first", "train_resumed"):
        assert 0 < runs[name]["first_step_s"] <= runs[name]["wall_s"], runs[name]
    workdir = directory / "run_cache_on"
    steps = [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")]
    assert steps[0] == 1 and steps[-1] == 2  # the second run resumed the first.
    assert any((directory / "cache").iterdir())  # the processes used the one cache.
    text = restart.table(results)
    assert text.splitlines()[0] == "| | cache on |" and "| train_resumed | first_step" in text
    return runs, workdir


def test_restart_refuses_bad_requests_before_running_anything(tmp_path):
    from ddpm_jax.bench import restart

    with pytest.raises(ValueError, match="unknown caches/parts"):
        restart.measure("configs/tiny.py", str(tmp_path / "x"), caches=("warm",))
    with pytest.raises(ValueError, match="workdir of train"):
        restart.measure("configs/tiny.py", str(tmp_path / "x"), parts=("eval",))
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        restart.measure("configs/tiny.py", str(tmp_path / "used"))
    assert (tmp_path / "used" / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "x").exists()
    rows = {"on": {"train_first": {"first_step_s": 3.0, "wall_s": 4.25}},
            "off": {"train_first": {"first_step_s": 5.0, "wall_s": 6.0}}}  # fmt: skip
    assert restart.table(rows).splitlines() == [
        "| | cache on | cache off |",
        "| --- | --- | --- |",
        "| train_first | first_step 3.0 s, wall 4.2 s | first_step 5.0 s, wall 6.0 s |",
    ]


@pytest.mark.slow  # minutes; the user's commands themselves run in CI in test_readme.py.
def test_restart_measurements_run_the_users_commands_with_one_cache(tmp_path):
    """`python -m ddpm_jax.bench.restart`: train, resume, load_sampler and eval, cache on."""
    from ddpm_jax.bench import restart

    directory = tmp_path / "restart"
    results = restart.measure(os.path.join(REPO, "configs", "tiny.py"), str(directory),
                              caches=("on",))  # fmt: skip
    runs, workdir = _check_restart(restart, results, directory, restart.PARTS)
    for name in ("sampler_first", "sampler_second"):
        assert 0 < runs[name]["load_s"] < runs[name]["first_images_s"] <= runs[name]["wall_s"]
    assert (workdir / "eval" / "bpd_step2.json").exists()
    # The resumed run and the second sampling command load their programs, tracing nothing.
    for name in ("train_resumed", "sample_second"):
        phases = runs[name]["phases"]
        assert "load_executable" in phases and "trace" not in phases, (name, phases)
    assert "| train_resumed, cache on |" in restart.phase_table(results)


def test_the_formulations_part_times_the_ddpm_and_edm_steps_of_one_u_net():
    settings = bench.BenchSettings(batch_size=8, steps=1, repeats=2, warmup=1,
                                   parts=("formulations",))  # fmt: skip
    results = bench.run(_config(), settings, config_name="configs/tiny.py")
    part = results["formulations"]
    for formulation in ("ddpm", "edm"):
        _check_common(part[formulation])
    assert _positive_finite(part["edm_over_ddpm_step_s"])
    # The same network: XLA counts the same work, but for the elementwise preconditioning.
    flops = [part[f]["flops_per_image"] for f in ("ddpm", "edm")]
    assert flops[1] == pytest.approx(flops[0], rel=0.01)
    assert "EDM / DDPM step time" in bench.format_table(results)
    assert results["jax"] is None
