"""The EDM formulation through the normal commands, and heun/euler for DDPM workdirs.

A tiny EDM config (configs/edm_tiny.py) trains, resumes bit-identically after `kill -9`,
logs its loss and denoising errors (it has no bound estimate), samples with heun and euler
through `load_sampler` (each image equal to `edm.sample` of its documented key), and
evaluates log p(x) by the probability-flow ODE and the sample metrics; DDPM workdirs,
imported diffusers ones included, sample with heun and euler equal to `edm_discrete.sample`.
"""

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from numerics import F32_ATOL, assert_f32_close

import ddpm_jax
from configs import edm_tiny, tiny
from ddpm_jax import edm, edm_discrete, errors, fid, train
from ddpm_jax.evaluation import evaluate
from ddpm_jax.experiment import ExperimentConfig, Stream, stream_key
from ddpm_jax.fid import inception, weights
from ddpm_jax.inference import write_samples
from ddpm_jax.pretrained import import_diffusers
from ddpm_jax.runtime import checkpointing
from ddpm_jax.runtime import sharding as shd
from ddpm_jax.runtime import workdir as wd
from ddpm_jax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS8 = Path(REPO) / "tests" / "golden" / "pretrained" / "digits8_root"


def edm_config(**training):
    config = edm_tiny.get_config()
    config.training.update(num_train_steps=6, checkpoint_every_steps=3, sample_every_steps=0,
                           log_every_steps=3)  # fmt: skip
    config.training.update(training)
    return config


def assert_chain_close(got, want, sigma_max):
    """float32 chains of separately compiled programs: they start at x_T · σ_max, where
    |x| reaches ~4 σ_max, and float32 rounding there (not at the image's scale) is the floor."""
    assert_f32_close(got, want, atol=F32_ATOL * 4 * float(sigma_max))


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def chain_key(seed, chunk, index):
    """The key of image `index` of chunk `chunk` (trained_model's documented derivation)."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), chunk), index)
    return jax.random.split(key)[0]


def random_workdir(workdir, config):
    """config.json and a step-3 checkpoint of random parameters (no training compiled)."""
    abstract = train.build(config, shd.make_mesh()).abstract
    rng = np.random.default_rng(0)

    def draw(leaf):
        if not np.issubdtype(leaf.dtype, np.floating):
            return np.zeros(leaf.shape, leaf.dtype)
        return (0.2 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    state = dataclasses.replace(jax.tree.map(draw, abstract), step=np.int32(3))
    wd.write_config(config, str(workdir))
    with checkpointing.Checkpointer(str(workdir), save_every_steps=1, async_save=False) as ckpt:
        ckpt.save(3, state, {"data_step": 3}, force=True)
    return str(workdir)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """6 EDM steps in one go (a sample grid at the end): the reference of the resumed run."""
    workdir = str(tmp_path_factory.mktemp("edm") / "w")
    state = loop.train(edm_config(sample_every_steps=6), workdir)
    return state, workdir


def test_an_edm_run_logs_its_loss_and_denoising_errors_and_samples(trained):
    state, workdir = trained
    assert int(state.step) == 6 and checkpointing.latest_step(workdir) == 6
    rows = [json.loads(line) for line in open(os.path.join(workdir, wd.METRICS_FILE))]
    assert [r["step"] for r in rows] == [3, 6]
    bands = ["mse_sigma_0.002_0.05", "mse_sigma_0.05_0.5", "mse_sigma_0.5_5", "mse_sigma_5_80"]
    for row in rows:
        assert "bpd_estimate" not in row
        assert all(np.isfinite(row[k]) for k in ("loss", "ema_loss", *bands))
    # The denoising error grows with σ (it is the posterior variance for the exact denoiser).
    assert [rows[-1][k] for k in bands] == sorted(rows[-1][k] for k in bands)
    assert os.path.exists(os.path.join(workdir, "samples_00000006.png"))
    assert json.load(open(os.path.join(workdir, wd.CONFIG_FILE)))["diffusion"]["formulation"] == (
        "edm"
    )


def test_kill_9_then_resume_is_bit_identical(trained, tmp_path):
    reference, _ = trained
    workdir = str(tmp_path / "run")
    cmd = [
        sys.executable, "-m", "ddpm_jax.main", "--config=configs/edm_tiny.py",
        f"--workdir={workdir}", "--config.training.num_train_steps=100000",
        "--config.training.checkpoint_every_steps=3", "--config.training.sample_every_steps=0",
        "--config.training.log_every_steps=3",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while (checkpointing.latest_step(workdir) or 0) < 3:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    last = checkpointing.latest_step(workdir)
    assert last is not None and last >= 3 and last % 3 == 0
    end = last + 3
    resumed = loop.train(edm_config(num_train_steps=end), workdir)
    expected = reference if end == 6 else loop.train(edm_config(num_train_steps=end),
                                                     str(tmp_path / "ref"))  # fmt: skip
    assert_trees_equal(resumed, expected)


def test_a_changed_formulation_or_edm_field_is_refused_on_resume(trained):
    _, workdir = trained
    for path, value, message in (
        ("diffusion.formulation", "ddpm", "diffusion.formulation ('edm' -> 'ddpm')"),
        ("edm.sigma_data", 0.25, "edm.sigma_data (0.5 -> 0.25)"),
    ):
        config = edm_config(num_train_steps=9)
        group, field = path.split(".")
        config[group][field] = value
        with pytest.raises(errors.ConfigError, match=r"Refusing to resume") as info:
            loop.train(config, workdir)
        assert message in str(info.value)


def test_the_edm_step_minimises_the_mean_denoiser_loss_with_label_dropout():
    """One update of a class-conditional EDM model: its loss is `edm.denoiser_loss`'s batch
    mean with the documented keys and the labels dropped at `training.label_dropout`."""
    config = edm_config()
    config.model.num_classes = 10
    config.training.label_dropout = 0.5
    mesh = shd.make_mesh(devices=jax.devices()[:1])
    setup = train.build(config, mesh)
    exp = setup.experiment
    state = shd.init_sharded(setup.init_fn, setup.abstract, jax.random.PRNGKey(0))
    rng = np.random.default_rng(2)
    batch = {
        "image": rng.uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32),
        "label": rng.integers(0, 10, 8).astype(np.int32),
    }
    _, metrics = jax.jit(train.make_train_step(exp, setup.optimizer))(state, batch)

    def oracle(params, images, labels):
        key = jax.random.fold_in(stream_key(config.training.seed, Stream.TRAIN_STEP), 0)
        dropout_key, loss_key, label_key = jax.random.split(key, 3)
        y = jnp.where(jax.random.bernoulli(label_key, 0.5, labels.shape), 10, labels)
        fn = exp.denoiser(params, y, train=True, rngs={"dropout": dropout_key})
        return jnp.mean(edm.denoiser_loss(fn, images, loss_key)), y

    loss, y = jax.jit(oracle)(state.params, batch["image"], batch["label"])
    assert 0 < int(jnp.sum(y == 10)) < 8  # some labels dropped, not all
    assert_f32_close(metrics["loss"], loss)


def test_the_half_life_ema_is_edms():
    """β = 0.5^(B / max(min(h, r · s · B), 1e-8)): 0 at step 0, then ramping up to h."""
    config = edm_config()
    config.optim.update(ema_halflife_kimg=500.0, ema_rampup_ratio=0.05)
    beta = train.make_ema_beta_fn(ExperimentConfig.from_config(config).optim, 512)
    for step in (0, 1, 100, 10_000, 100_000):
        h = max(min(500_000.0, 0.05 * step * 512), 1e-8)
        assert float(beta(jnp.int32(step))) == pytest.approx(0.5 ** (512 / h), rel=1e-6, abs=0)
    config.optim.ema_rampup_ratio = None
    flat = train.make_ema_beta_fn(ExperimentConfig.from_config(config).optim, 512)
    assert float(flat(jnp.int32(0))) == pytest.approx(0.5 ** (512 / 500_000), rel=1e-6)


def test_heun_and_euler_of_an_edm_workdir_equal_edm_sample(trained, caplog):
    _, workdir = trained
    model = ddpm_jax.load_sampler(workdir)
    denoise_fn = model.experiment.denoiser(model.params)
    # Heun in 3 steps and Euler in 5 make 5 evaluations each: one compiled program for both.
    for solver, n, evaluations in (("heun", 3, 5), ("euler", 5, 5)):
        with caplog.at_level(logging.INFO):
            got = model.sample_float(10, seed=1, sampler=solver, num_steps=n, batch_size=8)
        assert f"{evaluations} network evaluations per image" in caplog.text
        for chunk, index in ((0, 0), (1, 1)):  # images 0 and 9
            want = edm.sample(denoise_fn, (1, 8, 8, 1), chain_key(1, chunk, index),
                              num_steps=n, solver=solver)  # fmt: skip
            assert_chain_close(got[8 * chunk + index], np.asarray(want)[0], 80.0)
        caplog.clear()
    assert model.steps_per_chunk() == 7  # the config's heun, N = 4
    assert model.steps_per_chunk(model.options(num_steps=0)) == 35  # EDM's 18 steps
    with pytest.raises(errors.ConfigError, match=r"'ddim': works for DDPM models only"):
        model.sample(2, sampler="ddim")


def _fid_config(**eval_fields):
    config = edm_config()
    config.sampling.update(num_samples=8, batch_size=8, sampler="euler", num_steps=5)
    config.eval.update(fid_num_samples=8, fid_reference_examples=8, batch_size=8, **eval_fields)
    return config


def test_sample_command_and_eval_of_an_edm_workdir(trained, tmp_path, monkeypatch):
    """`ddpm-jax sample` writes the chunks; `ddpm-jax eval` gives an EDM model the likelihood
    it has, log p(x) by the probability-flow ODE (it has no discrete bound), and the sample
    metrics (cheap features in place of Inception here)."""
    _, workdir = trained
    config = _fid_config(fid_cache_dir=str(tmp_path / "cache"), num_examples=2, ode_rtol=1e-3,
                         ode_atol=1e-3)  # fmt: skip
    path = write_samples.write_samples(config, workdir)
    assert np.load(path)["images"].shape == (8, 8, 8, 1)
    meta = json.load(open(os.path.join(os.path.dirname(path), "meta.json")))
    assert meta["sampler"] == "euler" and meta["s_churn"] == 0.0

    w = np.random.default_rng(1).standard_normal((8 * 8 * 3, 16)).astype(np.float32)

    def make_features_fn(variables, logits_kernel=None, *, outputs=fid.FEATURE_OUTPUTS, **_):
        def features(x):
            h = x.reshape(x.shape[0], -1) @ w
            out = {"pool": jnp.tanh(h[:, :6]), "spatial": jnp.tanh(h[:, 6:11]),
                   "logits": 3.0 * h[:, 11:]}  # fmt: skip
            return {k: out[k] for k in outputs}

        return features

    kernel = np.zeros((fid.FEATURE_DIM, fid.LOGITS_DIM), np.float32)
    fake = weights.InceptionWeights({}, "ab" * 32, Path("fake.npz"), kernel)
    monkeypatch.setattr(fid, "make_features_fn", make_features_fn)
    monkeypatch.setattr(fid, "try_load_inception_weights", lambda *a, **k: (fake, None))
    result = evaluate.evaluate(config, workdir)
    assert result["likelihood"] == ["ode"] and "bpd" not in result
    assert result["protocol"]["formulation"] == "edm"
    assert np.isfinite(result["ode_bpd"]) and result["ode_num_examples"] == 2
    assert np.isfinite(result["fid"]) and result["fid"] > 0
    saved = json.load(open(os.path.join(workdir, wd.EVAL_SUBDIR, "bpd_step6.json")))
    assert saved["fid"] == result["fid"] and saved["ode_bpd"] == result["ode_bpd"]


@pytest.mark.slow
def test_eval_fid_of_an_edm_workdir_with_random_inception_weights(trained, tmp_path):
    """The real FID Inception (random weights from an .npz, as a converted file is loaded)."""
    _, workdir = trained
    npz = tmp_path / "inception.npz"
    weights.save_variables_npz(
        npz, traverse_util.flatten_dict(inception.random_variables(0), sep="/")
    )
    config = _fid_config(inception_weights=str(npz), inception_sha256=weights.sha256_file(npz),
                         fid_cache_dir=str(tmp_path / "cache"), likelihood="ode", num_examples=2,
                         ode_rtol=1e-3, ode_atol=1e-3)  # fmt: skip
    result = evaluate.evaluate(config, workdir)
    assert np.isfinite(result["fid"]) and result["fid"] > 0 and "ode_bpd" in result


def test_class_conditional_edm_samples_with_guidance(tmp_path):
    config = edm_config()
    config.model.num_classes = 10
    config.data.data_dir = str(tmp_path / "tfds")
    model = ddpm_jax.load_sampler(random_workdir(tmp_path / "run", config))
    labels = np.array([0, 0, 9, 10], np.int32)
    kw = dict(seed=0, sampler="euler", num_steps=3, guidance_scale=2.0)
    a = model.sample_float(4, labels=labels, **kw)
    b = model.sample_float(4, labels=np.full(4, 5, np.int32), **kw)
    assert np.all(np.isfinite(a)) and not np.allclose(a, b)
    # Guidance of the denoiser: D_null + w (D_y - D_null), for image 0's chain.
    params = model.params
    exp = model.experiment

    def guided(x, s):
        null = exp.denoiser(params, jnp.full((1,), 10, jnp.int32))(x, s)
        return null + 2.0 * (exp.denoiser(params, jnp.zeros((1,), jnp.int32))(x, s) - null)

    want = edm.sample(guided, (1, 8, 8, 1), chain_key(0, 0, 0), num_steps=3, solver="euler")
    assert_chain_close(a[0], np.asarray(want)[0], 80.0)


@pytest.fixture(scope="module")
def ddpm_workdir(tmp_path_factory):
    config = tiny.get_config()
    config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
    config.diffusion.num_timesteps = 16
    config.sampling.batch_size = 8
    return random_workdir(tmp_path_factory.mktemp("ddpm") / "w", config)


@pytest.mark.parametrize("solver, num_steps", [("heun", 3), ("euler", 5)])  # 5 evaluations
def test_heun_and_euler_of_a_ddpm_workdir_equal_edm_discrete_sample(ddpm_workdir, solver,
                                                                    num_steps):  # fmt: skip
    model = ddpm_jax.load_sampler(ddpm_workdir)
    got = model.sample_float(3, seed=2, sampler=solver, num_steps=num_steps)
    x_T = np.stack([jax.random.normal(jax.random.split(chain_key(2, 0, j))[0], (1, 8, 8, 1))[0]
                    for j in range(3)])  # fmt: skip
    r = model.reverse
    want = edm_discrete.sample(
        model.experiment.model_fn(model.params), model.sched, (3, 8, 8, 1), jax.random.key(9),
        parameterization=r.parameterization, variance=r.variance, num_steps=num_steps,
        solver=solver,
        x_T=jnp.asarray(x_T),
    )  # fmt: skip
    assert_chain_close(got, want, model.experiment.sigma_range[1])


def test_a_ddpm_sigma_range_within_the_model_gives_that_grid(ddpm_workdir):
    model = ddpm_jax.load_sampler(ddpm_workdir)
    lo, hi = model.experiment.sigma_range
    options = model.options(sampler="heun", num_steps=5)
    np.testing.assert_array_equal(
        model.experiment.karras_grid(options),
        edm_discrete.karras_grid(model.sched, 5).astype(np.float32),
    )
    narrow = dataclasses.replace(options, sigma_min=2 * lo, sigma_max=hi / 2)
    grid = model.experiment.karras_grid(narrow)
    assert grid[0] == pytest.approx(hi / 2, rel=1e-6) and grid[-1] == 0
    assert grid[-2] == pytest.approx(2 * lo, rel=1e-6)
    images = model.sample(2, seed=0, sampler="heun", num_steps=5)
    assert images.shape == (2, 8, 8, 1)


def test_an_imported_diffusers_checkpoint_samples_with_heun_in_18_steps(tmp_path, caplog):
    workdir = str(tmp_path / "w")
    import_diffusers(str(DIGITS8), workdir, data_name="digits")
    model = ddpm_jax.load_sampler(workdir)
    with caplog.at_level(logging.INFO):
        got = model.sample_float(2, seed=0, sampler="heun", num_steps=18)
    assert "heun in 18 steps" in caplog.text and "35 network evaluations" in caplog.text
    r = model.reverse
    x_T = np.stack([jax.random.normal(jax.random.split(chain_key(0, 0, j))[0], (1, 8, 8, 1))[0]
                    for j in range(2)])  # fmt: skip
    want = edm_discrete.sample(
        model.experiment.model_fn(model.params), model.sched, (2, 8, 8, 1), jax.random.key(0),
        parameterization=r.parameterization, variance=r.variance, num_steps=18,
        x_T=jnp.asarray(x_T),
    )  # fmt: skip
    assert_chain_close(got, want, model.experiment.sigma_range[1])
