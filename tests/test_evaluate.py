"""`--mode=eval`: bits/dim over a split (against a per-example oracle) and FID wiring."""

import dataclasses
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import tiny
from ddpm_jax import fid, likelihood, train
from ddpm_jax.data import pipeline as input_pipeline
from ddpm_jax.evaluation import bpd, evaluate, fid_score
from ddpm_jax.experiment import changes
from ddpm_jax.fid import inception, weights
from ddpm_jax.inference.trained_model import TrainedModel
from ddpm_jax.runtime import checkpointing
from ddpm_jax.runtime import sharding as shd
from ddpm_jax.runtime import workdir as wd

STEP = 3
N_EVAL = 13  # with eval batches of 8: one full batch and one of 5 real rows + 3 padding.


def small_config(data_dir):
    """configs/tiny.py with T = 16 and 13 evaluation examples."""
    config = tiny.get_config()
    config.data.data_dir = str(data_dir)
    config.diffusion.num_timesteps = 16
    config.eval.bpd_timestep_chunk = 8
    config.eval.batch_size = 8
    config.eval.num_examples = N_EVAL
    config.eval.fid_num_samples = N_EVAL
    config.eval.fid_reference_examples = N_EVAL
    config.sampling.batch_size = 8
    return config


def make_workdir(workdir, config):
    """config.json plus a step-3 checkpoint of random parameters (no training compiled)."""
    abstract = train.build(config, shd.make_mesh()).abstract
    rng = np.random.default_rng(0)

    def draw(leaf):
        if not np.issubdtype(leaf.dtype, np.floating):
            return np.zeros(leaf.shape, leaf.dtype)
        return (0.2 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    state = dataclasses.replace(jax.tree.map(draw, abstract), step=np.int32(STEP))
    wd.write_config(config, str(workdir))
    with checkpointing.Checkpointer(str(workdir), save_every_steps=1, async_save=False) as ckpt:
        ckpt.save(STEP, state, {"data_step": STEP}, force=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    config = small_config(tmp_path_factory.mktemp("tfds"))
    workdir = str(tmp_path_factory.mktemp("run"))
    make_workdir(workdir, config)
    return config, workdir


@pytest.fixture(scope="module")
def sampler(run):
    config, workdir = run
    return TrainedModel.from_config(changes.resolve_config(config, workdir), workdir)


def split_images(config, split, n):
    """The first n images of a split, read straight from the data source: float [-1, 1]."""
    source, _ = input_pipeline.open_split(config, split)
    return np.stack([np.asarray(source[i]["image"]) for i in range(n)]) / 127.5 - 1.0


def test_bits_per_dim_equals_per_example_oracle_and_skips_fid(run, sampler, caplog):
    config, workdir = run
    with caplog.at_level(logging.INFO):
        result = evaluate.evaluate(config, workdir)
    skips = [r.getMessage() for r in caplog.records if r.getMessage().startswith("FID skipped")]
    assert skips == [f"FID skipped: {result['fid_skipped']}"]
    assert "inception_weights" in skips[0]

    # Oracle: the bound of each example alone, with its documented key, plain numpy mean.
    d = config.diffusion
    bound = jax.jit(
        lambda x, key: likelihood.bits_per_dim(
            sampler.experiment.model_fn(sampler.params),
            sampler.sched,
            x[None],
            key,
            parameterization=d.parameterization,
            variance=d.variance,
            clip_denoised=d.clip_denoised,
            timestep_chunk=16,  # not eval's 8: the chunking must not matter either.
        )
    )
    images = split_images(config, config.eval.split, N_EVAL).astype(np.float32)
    key = bpd.bpd_key(config)
    per = [jax.device_get(bound(images[i], jax.random.fold_in(key, i))) for i in range(N_EVAL)]
    mean = {f: np.mean([getattr(p, f)[0] for p in per]) for f in likelihood.BitsPerDim._fields}
    terms = np.mean([p.terms[0] for p in per], axis=0)

    assert result["num_examples"] == N_EVAL and result["step"] == STEP
    # Up to float32 round-off of convolutions over other batch shapes (~1e-5 relative); a
    # padded row counted changes them by ~20 %, a wrong key by ~0.2 %.
    fields = {"bpd": "total", "bpd_decoder_L0": "decoder",
              "bpd_diffusion_sum_Lt": "diffusion", "bpd_prior_LT": "prior"}  # fmt: skip
    for name, field in fields.items():
        np.testing.assert_allclose(result[name], mean[field], rtol=1e-4, atol=1e-7, err_msg=name)
    parts = result["bpd_decoder_L0"] + result["bpd_diffusion_sum_Lt"] + result["bpd_prior_LT"]
    assert math.isfinite(result["bpd"]) and result["bpd"] == pytest.approx(parts, rel=1e-6)

    stem = os.path.join(workdir, "eval", f"bpd_step{STEP}")
    assert json.load(open(stem + ".json")) == result
    curve = np.load(stem + "_terms.npz")["terms"]
    assert curve.shape == (16,)
    np.testing.assert_allclose(curve, terms, rtol=1e-4, atol=1e-6)
    assert curve[0] == pytest.approx(result["bpd_decoder_L0"], rel=1e-9)
    assert curve[1:].sum() == pytest.approx(result["bpd_diffusion_sum_Lt"], rel=1e-6)


def test_eval_batch_not_divisible_by_devices_is_refused(run):
    config, workdir = run
    config = small_config(config.data.data_dir)
    config.eval.batch_size = 12
    with pytest.raises(ValueError, match=r"config\.eval\.batch_size"):
        evaluate.evaluate(config, workdir)


def test_a_variance_given_on_the_command_line_reaches_the_bound(run, tmp_path):
    """`--mode=eval --config.diffusion.variance=fixedsmall` bounds with σ_q², not β_t."""
    _, workdir = run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("eval", wd.LOCK_FILE))
    large = evaluate.evaluate(None, str(copy))
    small = evaluate.evaluate(
        None, str(copy), config_overrides={"diffusion.variance": "fixedsmall"}
    )
    assert (large["variance"], small["variance"]) == ("fixedlarge", "fixedsmall")
    assert small["bpd_diffusion_sum_Lt"] != pytest.approx(large["bpd_diffusion_sum_Lt"], rel=1e-3)

    args = [f"--workdir={copy}", "--mode=eval", "--config.diffusion.variance=fixedsmall"]
    result = subprocess.run(
        [sys.executable, "-m", "ddpm_jax.main", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.load(open(copy / "eval" / f"bpd_step{STEP}.json"))
    assert written["variance"] == "fixedsmall"
    assert written["bpd"] == pytest.approx(small["bpd"], rel=1e-5)


_W = np.random.default_rng(1).standard_normal((8 * 8 * 3, 6)).astype(np.float32)


def _cheap_features(images):
    """A stand-in for Inception: 6 nonlinear features of [B, 8, 8, 3] images."""
    return jnp.tanh(images.reshape(images.shape[0], -1) @ _W)


def test_fid_wiring_against_oracle_and_reference_cache(run, sampler, tmp_path, monkeypatch):
    """Cheap features in place of Inception: the statistics must come from the right images."""
    config, workdir = run
    rows = []

    def make_feature_fn(variables):
        def features(images):
            rows.append(images.shape[0])
            return _cheap_features(images)

        return features

    fingerprint = "ab" * 32
    fake = weights.InceptionWeights({}, fingerprint, Path("fake.npz"))
    monkeypatch.setattr(fid, "make_feature_fn", make_feature_fn)
    monkeypatch.setattr(fid, "try_load_inception_weights", lambda *a, **k: (fake, None))
    config = changes.resolve_config(config, workdir)
    config.eval.fid_cache_dir = str(tmp_path)
    sampler = TrainedModel.from_config(config, workdir)
    result = fid_score.fid_score(sampler)

    def stats(uint8_images):
        x = np.asarray(uint8_images, np.float32) / 127.5 - 1.0
        f = np.asarray(_cheap_features(jnp.asarray(np.tile(x, (1, 1, 1, 3)))), np.float64)
        return f.mean(axis=0), np.cov(f, rowvar=False)

    ref = np.round((split_images(config, "train", N_EVAL) + 1.0) * 127.5)
    samples = sampler.sample(N_EVAL, seed=config.sampling.seed)
    expected = fid.frechet_distance(*stats(samples), *stats(ref))
    assert result["fid"] == pytest.approx(expected, rel=1e-5)
    assert result["fid_num_samples"] == N_EVAL
    cached = fid.reference_stats_path(tmp_path, "digits", "train", 8, fingerprint, N_EVAL)
    assert result["fid_reference"] == str(cached) and cached.exists()
    assert sum(rows) == 16 + 16  # two padded reference batches, two padded sample chunks

    # Again: the reference statistics come from the cache; only samples go through the net.
    rows.clear()
    again = fid_score.fid_score(sampler)
    assert sum(rows) == 16 and again["fid"] == pytest.approx(result["fid"], rel=1e-9)


@pytest.mark.slow
def test_fid_end_to_end_with_random_inception_weights(run, tmp_path):
    """The real FID Inception (random weights from an .npz, as a converted file is loaded)."""
    config, workdir = run
    path = tmp_path / "inception.npz"
    flat = traverse_util.flatten_dict(inception.random_variables(0), sep="/")
    weights.save_variables_npz(path, flat)
    config = small_config(config.data.data_dir)
    config.eval.inception_weights = str(path)
    config.eval.inception_sha256 = weights.sha256_file(path)
    config.eval.fid_cache_dir = str(tmp_path / "cache")
    result = evaluate.evaluate(config, workdir)
    assert math.isfinite(result["fid"]) and result["fid"] > 0
    assert (
        json.load(open(os.path.join(workdir, "eval", f"bpd_step{STEP}.json")))["fid"]
        == (result["fid"])
    )


def test_reference_key_separates_user_sources_sharing_a_name(tmp_path):
    """A folder run that keeps the default name "cifar10" must not read real CIFAR-10's
    cached statistics, nor another folder's, nor its own from before files were added."""
    from ddpm_jax.data.config import DataConfig

    def data(**kw):
        config = tiny.get_config()
        for k, v in kw.items():
            config.data[k] = v
        return DataConfig.from_config(config)

    tfds_key = fid_score.reference_key(data(name="cifar10"), 50_000)
    assert tfds_key == "cifar10"
    a = fid_score.reference_key(data(name="cifar10", source="folder", path=str(tmp_path / "a")), 9)
    b = fid_score.reference_key(data(name="cifar10", source="folder", path=str(tmp_path / "b")), 9)
    grown = fid_score.reference_key(
        data(name="cifar10", source="folder", path=str(tmp_path / "a")), 10
    )
    assert len({tfds_key, a, b, grown}) == 4
    assert a.startswith("cifar10-folder-")
