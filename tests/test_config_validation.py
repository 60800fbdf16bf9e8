"""Every bad config fails before anything compiles, in one line naming field, value and range."""

import math
import os
import subprocess
import sys
import time

import pytest

from configs import tiny
from ddpm_jax import errors
from ddpm_jax.experiment import ExperimentConfig
from ddpm_jax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _set(path, value):
    group, field = path.split(".")

    def edit(d):
        d[group][field] = value

    return edit


def _delete(path):
    group, field = path.split(".")
    return lambda d: d[group].pop(field)


# (edit of the config as a nested dict, the field the message must name, a fragment of what
# it must say is allowed). Plain dicts let a test give a value of the wrong type, which a
# locked ConfigDict would refuse before the config is ever checked.
BAD = [
    (_set("data.name", ""), "data.name", "non-empty string"),
    (_set("data.split", ""), "data.split", "non-empty string"),
    (_set("data.image_size", 0), "data.image_size", ">= 1"),
    (_set("data.image_size", -8), "data.image_size", "an integer >= 1"),
    (_set("data.channels", 0), "data.channels", ">= 1 and <= 4"),
    (_set("data.channels", 5), "data.channels", "<= 4"),
    (_set("data.random_flip", 1), "data.random_flip", "True or False"),
    (_set("data.num_workers", -1), "data.num_workers", ">= 0"),
    (_set("data.data_dir", ""), "data.data_dir", "non-empty string or None"),
    (_set("model.ch", 0), "model.ch", ">= 1"),
    (_set("model.ch", 48), "model.ch", "multiple of 32"),
    (_set("model.ch_mult", ()), "model.ch_mult", "non-empty tuple"),
    (_set("model.ch_mult", (1, 0)), "model.ch_mult", ">= 1"),
    (_set("model.num_res_blocks", 0), "model.num_res_blocks", ">= 1"),
    (_set("model.attn_resolutions", (7,)), "model.attn_resolutions", "never occur"),
    (_set("model.dropout", 1.0), "model.dropout", "< 1"),
    (_set("model.dropout", -0.1), "model.dropout", ">= 0"),
    (_set("model.num_heads", 0), "model.num_heads", ">= 1"),
    (_set("model.num_heads", 3), "model.num_heads", "does not divide"),
    (_set("model.num_classes", -1), "model.num_classes", ">= 0"),
    (_set("model.dtype", "float16"), "model.dtype", "'float32', 'bfloat16'"),
    (_set("model.out_channels", 0), "model.out_channels", ">= 1"),
    (_set("model.out_channels", 2), "model.out_channels", "config.data.channels = 1"),
    (_set("model.width", 3), "model", "unknown field"),
    (_set("model.remat", "no"), "model.remat", "True or False"),
    (_set("diffusion.schedule", "cosin"), "diffusion.schedule", "'cosine'"),
    (_set("diffusion.num_timesteps", 0), "diffusion.num_timesteps", ">= 1"),
    (_set("diffusion.beta_start", 0.0), "diffusion.beta_start", "> 0"),
    (_set("diffusion.beta_start", 0.5), "diffusion.beta_start", "<= beta_end"),
    (_set("diffusion.beta_end", 1.0), "diffusion.beta_end", "< 1"),
    (_set("diffusion.beta_end", math.nan), "diffusion.beta_end", "finite"),
    (_set("diffusion.parameterization", "score"), "diffusion.parameterization", "'eps'"),
    (_set("diffusion.weighting", "snr"), "diffusion.weighting", "'min_snr'"),
    (_set("diffusion.min_snr_gamma", -1.0), "diffusion.min_snr_gamma", "> 0"),
    (_set("diffusion.min_snr_gamma", 0.0), "diffusion.min_snr_gamma", "number > 0"),
    (_set("diffusion.variance", "learnt"), "diffusion.variance", "'fixedsmall'"),
    (_set("diffusion.clip_denoised", "yes"), "diffusion.clip_denoised", "True or False"),
    (_set("training.batch_size", 0), "training.batch_size", ">= 1"),
    (_set("training.num_train_steps", 0), "training.num_train_steps", ">= 1"),
    (_set("training.log_every_steps", 0), "training.log_every_steps", ">= 1"),
    (_set("training.checkpoint_every_steps", 0), "training.checkpoint_every_steps", ">= 1"),
    (_set("training.keep_checkpoints", 0), "training.keep_checkpoints", ">= 1"),
    (_set("training.keep_period", -1), "training.keep_period", ">= 0"),
    (_set("training.sample_every_steps", -5), "training.sample_every_steps", ">= 0"),
    (_set("training.num_sample_images", 0), "training.num_sample_images", ">= 1"),
    (_set("training.grad_accum_steps", 0), "training.grad_accum_steps", ">= 1"),
    (_set("training.grad_accum_steps", 3), "training.grad_accum_steps", "divisible"),
    (_set("training.seed", -1), "training.seed", ">= 0"),
    (_set("training.seed", 2.5), "training.seed", "an integer"),
    (_set("training.resume_step", -1), "training.resume_step", ">= 0"),
    (_set("training.resume_step", 20), "training.resume_step", "num_train_steps"),
    (_set("training.allow_config_change", "yes"), "training.allow_config_change", "True or"),
    (_set("optim.learning_rate", -1e-3), "optim.learning_rate", "> 0"),
    (_set("optim.learning_rate", 0.0), "optim.learning_rate", "number > 0"),
    (_set("optim.learning_rate", math.nan), "optim.learning_rate", "finite"),
    (_set("optim.learning_rate", math.inf), "optim.learning_rate", "a finite number"),
    (_set("optim.warmup_steps", -1), "optim.warmup_steps", ">= 0"),
    (_set("optim.b1", 1.5), "optim.b1", "< 1"),
    (_set("optim.b2", -0.1), "optim.b2", ">= 0"),
    (_set("optim.eps", -1e-8), "optim.eps", "> 0"),
    (_set("optim.grad_clip_norm", -1.0), "optim.grad_clip_norm", "> 0"),
    (_set("optim.ema_decay", 1.0), "optim.ema_decay", "< 1"),
    (_set("optim.ema_warmup", 2), "optim.ema_warmup", "True or False"),
    (_set("sampling.sampler", "euler_a"), "sampling.sampler", "'ancestral'"),
    (_set("sampling.num_steps", -1), "sampling.num_steps", ">= 0"),
    (_set("sampling.num_steps", 101), "sampling.num_steps", "num_timesteps = 100"),
    (_set("sampling.eta", 0.5), "sampling.eta", "DDIM sampler only"),
    (_set("sampling.num_samples", 0), "sampling.num_samples", ">= 1"),
    (_set("sampling.batch_size", 0), "sampling.batch_size", ">= 1"),
    (_set("sampling.seed", -3), "sampling.seed", ">= 0"),
    (_set("sampling.guidance_scale", 2.0), "sampling.guidance_scale", "class-conditional"),
    (_set("sampling.guidance_scale", math.inf), "sampling.guidance_scale", "finite"),
    (_set("eval.split", ""), "eval.split", "non-empty string"),
    (_set("eval.batch_size", 0), "eval.batch_size", ">= 1"),
    (_set("eval.bpd_timestep_chunk", 0), "eval.bpd_timestep_chunk", ">= 1"),
    (_set("eval.num_examples", -1), "eval.num_examples", ">= 0"),
    (_set("eval.fid_num_samples", 1), "eval.fid_num_samples", ">= 2"),
    (_set("eval.inception_sha256", "abc"), "eval.inception_sha256", "64 hexadecimal"),
    (_set("eval.fid_reference_examples", -1), "eval.fid_reference_examples", ">= 0"),
    (_set("mesh.fsdp", 1), "mesh.fsdp", "True or False"),
    (_set("mesh.fsdp_min_size", -1), "mesh.fsdp_min_size", ">= 0"),
    (_delete("training.seed"), "training", r"missing field\(s\) \['seed'\]"),
    (lambda d: d.pop("mesh"), "mesh", "no group 'mesh'"),
    (lambda d: d.update(extra={"x": 1}), "extra", "unknown group"),
]


def _ddim_eta(d):
    d["sampling"]["sampler"] = "ddim"
    d["sampling"]["eta"] = -0.1


def _solver_order(d):
    d["sampling"]["sampler"] = "dpm_solver++"
    d["sampling"]["order"] = 4


def _leading_too_many(d):
    d["sampling"]["num_steps"] = 100  # tiny's T: "leading" needs K + 1 <= T.
    d["sampling"]["timestep_spacing"] = "leading"


BAD += [
    (_ddim_eta, "sampling.eta", ">= 0"),
    (_solver_order, "sampling.order", "<= 3"),
    (_set("sampling.order", 3), "sampling.order", "multistep solvers"),
    (_set("sampling.timestep_spacing", "uniform"), "sampling.timestep_spacing", "'logsnr'"),
    (_leading_too_many, "sampling.num_steps", "distinct timesteps"),
    (_set("diffusion.vlb_weight", -0.1), "diffusion.vlb_weight", ">= 0"),
    (_set("diffusion.vlb_weight", 0.001), "diffusion.vlb_weight", "trains a learned variance"),
    (
        _set("diffusion.timestep_proposal", "importance"),
        "diffusion.timestep_proposal",
        "'loss_aware'",
    ),
    (_set("data.source", "folders"), "data.source", "'folder', 'huggingface'"),
    (_set("data.source", "folder"), "data.path", "needs the directory"),
    (_set("data.path", "/x"), "data.path", "with source 'tfds'"),
    (_set("data.path", ""), "data.path", "non-empty string or None"),
    (_set("data.labels_from_folders", 1), "data.labels_from_folders", "True or False"),
    (_set("data.labels_from_folders", True), "data.labels_from_folders", "'folder' only"),
    (_set("data.eval_fraction", 1.0), "data.eval_fraction", "< 1"),
    (_set("data.eval_fraction", 0.1), "data.eval_fraction", "must be 0 with"),
    (_set("data.image_key", ""), "data.image_key", "non-empty string"),
    (_set("data.label_key", 3), "data.label_key", "non-empty string or None"),
]


def _edits(*changes, edm=False):
    """Several `_set`s in one edit; `edm`: an EDM model sampled with heun first."""

    def edit(d):
        if edm:
            d["diffusion"]["formulation"], d["sampling"]["sampler"] = "edm", "heun"
        for path, value in changes:
            _set(path, value)(d)

    return edit


DDPM_ONLY = "applies to config.diffusion.formulation = 'ddpm' only"
# The EDM formulation, its samplers, zero terminal SNR, the half-life EMA.
# fmt: off
BAD += [
    (_set("diffusion.formulation", "karras"), "diffusion.formulation", "'ddpm', 'edm'"),
    (_edits(("diffusion.weighting", "elbo"), edm=True), "diffusion.weighting", DDPM_ONLY),
    (_edits(("diffusion.timestep_proposal", "loss_aware"), edm=True),
     "diffusion.timestep_proposal", DDPM_ONLY),
    (_edits(("diffusion.parameterization", "eps"), edm=True),
     "diffusion.parameterization", DDPM_ONLY),
    (_edits(("diffusion.variance", "learned_range"), edm=True), "diffusion.variance",
     "a learned variance applies to config.diffusion.formulation = 'ddpm' only"),
    (_set("diffusion.formulation", "edm"), "sampling.sampler",
     "'ancestral': works for DDPM models only; an EDM model"),
    (_edits(("diffusion.rescale_zero_terminal_snr", True), ("diffusion.parameterization", "eps")),
     "diffusion.rescale_zero_terminal_snr", "'v' or 'x0', not 'eps'"),
    (_set("diffusion.rescale_zero_terminal_snr", 1), "diffusion.rescale_zero_terminal_snr",
     "True or False"),
    (_set("edm.sigma_data", 0.0), "edm.sigma_data", "> 0"),
    (_set("edm.p_std", -1.0), "edm.p_std", "> 0"),
    (_set("edm.p_mean", math.nan), "edm.p_mean", "finite"),
    (_set("training.label_dropout", 1.0), "training.label_dropout", "< 1"),
    (_set("optim.grad_clip_norm", 0.0), "optim.grad_clip_norm", "> 0 or None"),
    (_set("optim.ema_halflife_kimg", 0.0), "optim.ema_halflife_kimg", "> 0 or None"),
    (_set("optim.ema_rampup_ratio", 0.05), "optim.ema_rampup_ratio", "ema_halflife_kimg is None"),
    (_set("sampling.s_churn", 40.0), "sampling.s_churn", "'heun' and 'euler' only"),
    (_set("sampling.sigma_min", 0.01), "sampling.sigma_min", "'heun' and 'euler' only"),
    (_edits(("sampling.sampler", "euler"), ("sampling.sigma_min", 0.0)), "sampling.sigma_min",
     "> 0 or None"),
    (_edits(("sampling.sigma_min", 1.0), ("sampling.sigma_max", 0.5), edm=True),
     "sampling.sigma_min", "<= config.sampling.sigma_max = 0.5"),
    (_edits(("sampling.s_min", 1.0), ("sampling.s_max", 0.5), edm=True), "sampling.s_max",
     "number >= 1"),
    (_edits(("sampling.rho", 0.0), edm=True), "sampling.rho", "> 0"),
    (_edits(("sampling.sampler", "heun"), ("sampling.sigma_max", 1e4)), "sampling.sigma_max",
     "within this DDPM model's σ_t range"),
]
# fmt: on


def test_there_are_at_least_fifty_distinct_bad_configs():
    assert len(BAD) >= 50 and len({(f, m) for _, f, m in BAD}) == len(BAD)


@pytest.mark.parametrize("edit, field, allowed", BAD, ids=[f"{f}~{m}" for _, f, m in BAD])
def test_bad_config_names_field_value_and_what_is_allowed(edit, field, allowed):
    config = tiny.get_config().to_dict()
    edit(config)
    start = time.perf_counter()
    with pytest.raises(errors.ConfigError, match=allowed) as info:
        ExperimentConfig.from_config(config)
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert f"config.{field}" in message or f"group {field!r}" in message or field in message
    assert "\n" not in message


def test_a_good_config_parses_and_is_hashable():
    cfg = ExperimentConfig.from_config(tiny.get_config())
    assert cfg.training.batch_size == 8 and cfg.diffusion.reverse.parameterization == "x0"
    assert hash(cfg) == hash(ExperimentConfig.from_config(tiny.get_config()))


def test_training_checks_everything_before_writing_or_compiling(tmp_path):
    """Through the training entry point: a late-used field (sampling) fails at once too."""
    config = tiny.get_config()
    config.sampling.sampler = "ddim"
    config.sampling.eta = -1.0  # used only by the sample grids at the end of training.
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"config\.sampling\.eta = -1\.0"):
        loop.train(config, str(tmp_path / "w"))
    assert time.perf_counter() - start < 30
    assert not (tmp_path / "w").exists()
    config = tiny.get_config()
    config.training.batch_size = 12  # 8 fake devices.
    with pytest.raises(ValueError, match=r"batch_size = 12 must be divisible by .* 8"):
        loop.train(config, str(tmp_path / "w"))


def _main(args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "ddpm_jax.main", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": REPO},
    )


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--config.optim.learning_rate=-1e-3"], "config.optim.learning_rate = -0.001: must be"),
        (["--config.training.batch_sz=8"], "no field 'batch_sz'; did you mean \"batch_size\""),
        (["--config.training.batch_size=8.5"], "--config.training.batch_size=8.5"),
        (["--config.sampling.eta=0.3"], "config.sampling.eta = 0.3: applies to the DDIM"),
    ],
)
def test_the_command_line_prints_one_error_line_and_exits_2(tmp_path, args, expected):
    result = _main(["--config=configs/tiny.py", "--workdir=w", *args], cwd=REPO)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert not (tmp_path / "w").exists() and not os.path.exists(os.path.join(REPO, "w"))


def test_a_missing_config_file_and_a_missing_config_are_one_line(tmp_path):
    missing = _main(["--config=configs/nope.py", "--workdir=w"], cwd=REPO)
    assert missing.returncode == 2
    assert missing.stderr.strip().startswith("error: --config=configs/nope.py:")
    assert len(missing.stderr.strip().splitlines()) == 1
    none = _main(["--workdir=w"], cwd=str(tmp_path))
    assert none.returncode == 2 and "--config is required to train" in none.stderr


def test_verbose_shows_the_traceback(tmp_path):
    result = _main(
        ["--config=configs/tiny.py", "--workdir=w", "--config.optim.b1=2.0", "--verbose"], REPO
    )
    assert result.returncode != 0 and "Traceback" in result.stderr
    assert "config.optim.b1 = 2.0" in result.stderr


def test_a_config_file_that_is_not_python_is_one_line(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("def get_config(:\n    pass\n")
    result = _main([f"--config={bad}", "--workdir=w"], cwd=str(tmp_path))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {bad}, line 1: ") and "not valid Python" in lines[0]


@pytest.mark.parametrize("kind", ["a file", "not creatable"])
def test_a_workdir_that_cannot_be_one_is_one_line_before_jax_starts(tmp_path, kind):
    if kind == "a file":
        workdir = tmp_path / "results.txt"
        workdir.write_text("keep me")
        expected = f"error: --workdir={workdir} is an existing file, not a directory"
    else:  # /proc accepts no new directories, whoever runs the tests.
        workdir = "/proc/ddpm_jax_workdir"
        expected = f"error: --workdir={workdir} cannot be created"
    result = _main(["--config=configs/tiny.py", f"--workdir={workdir}"], cwd=REPO)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(expected), lines
    if kind == "a file":
        assert workdir.read_text() == "keep me"


def test_the_console_script_takes_the_mode_as_its_first_word(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "ddpm-jax")
    run = lambda *a: subprocess.run(  # noqa: E731
        [script, *a], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    result = run("train", "--config=configs/tiny.py", "--workdir=w", "--config.optim.b1=2.0")
    assert result.returncode == 2 and "error: config.optim.b1 = 2.0" in result.stderr
    both = run("sample", "--mode=eval", f"--workdir={tmp_path}")
    assert both.returncode == 2 and "not both" in both.stderr
    missing = run("eval", f"--workdir={tmp_path / 'none'}")
    assert missing.returncode == 2 and "config.json not found" in missing.stderr
