"""`--mode=eval`: bits/dim over a split (against a per-example oracle) and FID wiring."""

import dataclasses
import functools
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from numerics import assert_f32_close

from configs import tiny
from ddpm_jax import fid, likelihood, train
from ddpm_jax.data import pipeline as input_pipeline
from ddpm_jax.errors import ConfigError
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
    # The default of a DDPM model is the bound alone, with the keys it always had.
    assert result["likelihood"] == ["bound"] and not any(k.startswith("ode") for k in result)
    assert result["protocol"]["likelihood"]["kinds"] == ["bound"]
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


# --------------------------------------------------------------------------- sample metrics

_W = np.random.default_rng(1).standard_normal((8 * 8 * 3, 16)).astype(np.float32)
POOL, SPATIAL, LOGITS = slice(0, 6), slice(6, 11), slice(11, 16)


def _cheap_make_features_fn(variables, logits_kernel=None, *, outputs=fid.FEATURE_OUTPUTS,
                            resize_input=True, calls=None):  # fmt: skip
    """A stand-in for `fid.make_features_fn`: 6 "pool", 5 "spatial" and 5 "logits" features of
    [B, 8, 8, 3] images (the real widths make each Fréchet distance minutes on 2 cores)."""

    def features(images):
        if calls is not None:
            calls.append(images.shape[0])
        h = images.reshape(images.shape[0], -1) @ _W
        out = {"pool": jnp.tanh(h[:, POOL]), "spatial": jnp.tanh(h[:, SPATIAL]),
               "logits": 3.0 * h[:, LOGITS]}  # fmt: skip
        return {k: out[k] for k in outputs}

    return features


def _cheap_numpy(uint8_images):
    """The same features in float64 numpy, from uint8 images [N, 8, 8, C]."""
    x = np.asarray(uint8_images, np.float64) / 127.5 - 1.0
    x = np.tile(x, (1, 1, 1, 3)) if x.shape[-1] == 1 else x
    h = x.reshape(x.shape[0], -1) @ _W.astype(np.float64)
    return np.tanh(h[:, POOL]), np.tanh(h[:, SPATIAL]), 3.0 * h[:, LOGITS]


def _stats(f):
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _fake_weights(logits=True):
    kernel = np.zeros((fid.FEATURE_DIM, fid.LOGITS_DIM), np.float32) if logits else None
    return weights.InceptionWeights({}, "ab" * 32, Path("fake.npz"), kernel)


@pytest.fixture
def cheap_inception(monkeypatch):
    """Cheap features in place of the Inception; returns the list of batch sizes seen."""
    calls = []
    monkeypatch.setattr(
        fid, "make_features_fn", functools.partial(_cheap_make_features_fn, calls=calls)
    )
    monkeypatch.setattr(fid, "try_load_inception_weights", lambda *a, **k: (_fake_weights(), None))
    return calls


SEEDS = (3, 5)


@pytest.fixture(scope="module")
def full(run, tmp_path_factory):
    """`evaluate` with both likelihoods and two seeds, cheap features for the Inception."""
    config, workdir = run
    config = small_config(config.data.data_dir)
    config.eval.update(likelihood="both", fid_seeds=SEEDS, inception_weights="fake.npz",
                       fid_cache_dir=str(tmp_path_factory.mktemp("cache")))  # fmt: skip
    copy = tmp_path_factory.mktemp("full") / "run"
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("eval", wd.LOCK_FILE))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fid, "make_features_fn", _cheap_make_features_fn)
        mp.setattr(fid, "try_load_inception_weights", lambda *a, **k: (_fake_weights(), None))
        result = evaluate.evaluate(config, str(copy))
    return config, str(copy), result


METRICS = ("fid", "sfid", "inception_score", "precision", "recall")


def test_eval_json_has_every_metric_and_the_protocol(full):
    config, workdir, result = full
    stem = os.path.join(workdir, "eval", f"bpd_step{STEP}")
    assert json.load(open(stem + ".json")) == result
    for key in ("bpd", "bpd_decoder_L0", "bpd_diffusion_sum_Lt", "bpd_prior_LT", "ode_bpd",
                "ode_bpd_sem", "inception_score_split_std"):  # fmt: skip
        assert math.isfinite(result[key]), key
    for m in METRICS:
        assert all(math.isfinite(result[f"{m}{s}"]) for s in ("", "_std", "_min", "_max")), m
    assert 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1
    assert result["likelihood"] == ["bound", "ode"] and result["num_examples"] == N_EVAL
    assert result["bpd_network_evaluations"] == 16 * N_EVAL and result["bpd_seconds"] > 0
    assert result["ode_num_examples"] == N_EVAL and result["ode_seconds"] > 0
    assert result["ode_network_evaluations"] > N_EVAL
    p = result["protocol"]
    assert (p["checkpoint_step"], p["ema"], p["formulation"]) == (STEP, "ema_params", "ddpm")
    assert result["ema"] == "ema_params"
    ode = p["likelihood"]["ode"]
    sigma_min, sigma_max = TrainedModel.from_config(
        changes.resolve_config(config, workdir), workdir
    ).experiment.sigma_range
    assert ode["sigma_min"] == pytest.approx(sigma_min) and ode["sigma_max"] == sigma_max
    assert (ode["dequantization"], ode["bins"], ode["bin_width"]) == ("uniform", "score_sde",
                                                                      2 / 256)  # fmt: skip
    assert (ode["trace"], ode["num_probes"], ode["solver"]) == ("hutchinson", 1, "dopri5")
    s = p["samples"]
    assert s["num_samples"] == N_EVAL == result["fid_num_samples"]
    assert s["seeds"] == list(SEEDS) == result["fid_seeds"]
    assert s["sampler"]["sampler"] == "ancestral" and s["sampler"]["steps"] == 16
    ref = s["reference"]
    assert (ref["choice"], ref["split"], ref["count"]) == ("train", "train", N_EVAL)
    assert ref["file"] == result["fid_reference"]
    assert ref["sha256"] == weights.sha256_file(ref["file"])
    assert (s["inception_score_splits"], s["inception_score_split_size"]) == (1, 5000)
    assert s["precision_recall_k"] == 3
    assert len(s["warnings"]) == 1 and "biased" in s["warnings"][0]  # 13 < 10,000 samples.
    cost = s["seconds"]["per_seed"]
    assert [c["seed"] for c in cost] == list(SEEDS) and s["seconds"]["reference"] > 0
    for part in ("sampling", "inception", "fid", "sfid", "inception_score", "precision_recall"):
        assert cost[0][part] > 0, part
    assert cost[0]["kept_feature_bytes"] == N_EVAL * (6 + 5) * 4  # cheap pool and logits.
    ode_file = np.load(stem + "_ode.npz")
    assert ode_file["bpd"].shape == ode_file["steps"].shape == (N_EVAL,)
    assert ode_file["bpd"].mean() == pytest.approx(result["ode_bpd"], rel=1e-12)
    assert result["ode_network_evaluations"] == int(np.sum(6 * ode_file["steps"] + 1))


def test_each_seed_is_reported_with_mean_std_min_and_max(full):
    _, _, result = full
    assert [row["seed"] for row in result["per_seed"]] == list(SEEDS)
    for m in METRICS:
        values = np.array([row[m] for row in result["per_seed"]])
        assert values[0] != values[1], m  # two seeds, two sample sets.
        assert result[m] == pytest.approx(values.mean(), rel=1e-12)
        assert result[f"{m}_std"] == pytest.approx(values.std(ddof=1), rel=1e-12)
        assert (result[f"{m}_min"], result[f"{m}_max"]) == (values.min(), values.max())


def test_sample_metrics_equal_the_library_functions_on_the_same_samples(full, sampler):
    config, _, result = full
    ref_uint8 = np.round((split_images(config, "train", N_EVAL) + 1.0) * 127.5)
    ref_pool, ref_spatial, _ = _cheap_numpy(ref_uint8)
    for row, seed in zip(result["per_seed"], SEEDS, strict=True):
        pool, spatial, logits = _cheap_numpy(sampler.sample(N_EVAL, seed=seed))
        expected = {
            "fid": fid.frechet_distance(*_stats(pool), *_stats(ref_pool)),
            "sfid": fid.frechet_distance(*_stats(spatial), *_stats(ref_spatial)),
            "inception_score": fid.inception_score(logits, splits=1)[0],
        }
        for m, value in expected.items():
            assert row[m] == pytest.approx(value, rel=1e-5), (seed, m)
        precision, recall = fid.precision_recall(ref_pool, pool, k=3)
        assert (row["precision"], row["recall"]) == (precision, recall), seed


def test_the_ode_likelihood_is_ode_bits_per_dim_of_the_models_denoiser(full, sampler):
    """Example i of the split is `ode_bits_per_dim(D, x_i[None], fold_in(key, i))`."""
    config, workdir, _ = full
    from ddpm_jax.evaluation import likelihood as ode_eval

    options = ode_eval.ode_options(sampler.experiment)
    one = jax.jit(
        lambda params, x, key: likelihood.ode_bits_per_dim(
            sampler.experiment.denoiser(params), x, key, **options
        )
    )
    source, _ = input_pipeline.open_split(config, config.eval.split)
    key = ode_eval.ode_key(config)
    # The first example, one of the second batch, and the last (in a batch padded with 3 rows).
    rows = [0, 9, N_EVAL - 1]
    expected = [
        float(
            one(sampler.params, np.asarray(source[i]["image"])[None], jax.random.fold_in(key, i))[0]
        )
        for i in rows
    ]
    got = np.load(os.path.join(workdir, "eval", f"bpd_step{STEP}_ode.npz"))["bpd"]
    assert_f32_close(got[rows], expected, rtol=1e-4)


def test_both_likelihoods_keep_the_bound_of_bound_alone(full, sampler):
    _, _, result = full
    alone = bpd.split_bits_per_dim(sampler).scalars()
    for key, value in alone.items():
        assert result[key] == pytest.approx(value, rel=1e-6), key


def test_the_ode_cost_counts_six_evaluations_a_step_plus_one():
    """`6 · steps + 1` vector-field evaluations per example, counted on a toy denoiser."""
    from ddpm_jax.evaluation import likelihood as ode_eval

    calls = []

    def denoise(x, sigma):
        jax.debug.callback(lambda s: calls.append(1), sigma)
        return jnp.tanh(2.0 * x) / (1.0 + jnp.square(sigma))[:, None]

    x = jnp.linspace(-1.0, 1.0, 6, dtype=jnp.float32).reshape(1, 6)
    result = jax.jit(
        lambda x: likelihood.ode_likelihood(
            denoise, x, jax.random.key(0), sigma_min=0.01, sigma_max=50.0, solver="dopri5"
        )
    )(x)
    jax.block_until_ready(result)
    steps = int(result.num_steps)
    assert steps > 3 and len(calls) == ode_eval.EVALS_PER_STEP * steps + ode_eval.EVALS_AT_START


def test_fid_reference_cache_and_skipped_metrics(run, cheap_inception, tmp_path, monkeypatch):
    """The reference's features are cached; weights without the logits layer serve every
    metric but IS, which is skipped in one line."""
    config, workdir = run
    config = changes.resolve_config(config, workdir)
    config.eval.fid_cache_dir = str(tmp_path)
    model = TrainedModel.from_config(config, workdir)
    result = fid_score.fid_score(model)
    cached = fid.reference_stats_path(tmp_path, "digits", "train", 8, "ab" * 32, N_EVAL)
    assert result["fid_reference"] == str(cached) and cached.exists()
    assert cached.with_name(cached.stem + "-adm.npz").exists()
    assert sum(cheap_inception) == 16 + 16  # two padded reference batches, two sample chunks

    cheap_inception.clear()
    no_logits = (_fake_weights(logits=False), None)
    again = fid_score.fid_score(model, no_logits)
    assert sum(cheap_inception) == 16  # the reference from the cache: only the samples.
    assert again["fid"] == pytest.approx(result["fid"], rel=1e-9)
    assert again["precision"] == result["precision"] and "inception_score" not in again
    assert "logits layer" in again["inception_score_skipped"]
    assert again["sample_protocol"]["inception"]["logits_layer"] is False


def _small_reference_file(monkeypatch):
    """Reference files of the cheap widths: 6 pool, 5 spatial features."""
    small = functools.partial(fid.load_reference, pool_dim=6, spatial_dim=5)
    monkeypatch.setattr(fid, "load_reference", small)


def test_a_reference_file_is_used_and_its_sha256_recorded(run, cheap_inception, tmp_path,
                                                          monkeypatch):  # fmt: skip
    """An ADM batch: FID and sFID from its statistics, precision/recall from its images."""
    config, workdir = run
    _small_reference_file(monkeypatch)
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (11, 8, 8, 3), dtype=np.uint8)
    img_pool, _, _ = _cheap_numpy(images)
    mu, sigma = _stats(rng.standard_normal((40, 6)))
    mu_s, sigma_s = _stats(rng.standard_normal((40, 5)))
    path = tmp_path / "ref_batch.npz"
    np.savez(path, arr_0=images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    digest = weights.sha256_file(path)
    config = changes.resolve_config(config, workdir)
    config.eval.update(fid_reference="file", reference_file=str(path), reference_sha256=digest,
                       fid_cache_dir=str(tmp_path / "cache"))  # fmt: skip
    model = TrainedModel.from_config(config, workdir)
    result = fid_score.fid_score(model)
    ref = result["sample_protocol"]["reference"]
    assert (ref["choice"], ref["file"], ref["sha256"], ref["count"]) == ("file", str(path),
                                                                         digest, 11)  # fmt: skip
    assert ref["statistics"] == ref["spatial_statistics"] == "file"
    pool, spatial, _ = _cheap_numpy(model.sample(N_EVAL, seed=config.sampling.seed))
    assert result["fid"] == pytest.approx(fid.frechet_distance(*_stats(pool), mu, sigma), rel=1e-5)
    assert result["sfid"] == pytest.approx(
        fid.frechet_distance(*_stats(spatial), mu_s, sigma_s), rel=1e-5
    )
    assert (result["precision"], result["recall"]) == fid.precision_recall(img_pool, pool, k=3)

    config.eval.reference_sha256 = "0" * 64
    with pytest.raises(ConfigError, match=r"config\.eval\.reference_sha256"):
        evaluate.evaluate(config, workdir)


def test_edm_statistics_give_fid_and_skip_what_needs_images(run, cheap_inception, tmp_path,
                                                            monkeypatch):  # fmt: skip
    config, workdir = run
    _small_reference_file(monkeypatch)
    mu, sigma = _stats(np.random.default_rng(8).standard_normal((40, 6)))
    path = tmp_path / "cifar10-32x32.npz"
    np.savez(path, mu=mu, sigma=sigma)
    config = changes.resolve_config(config, workdir)
    config.eval.update(fid_reference="file", reference_file=str(path),
                       fid_cache_dir=str(tmp_path / "cache"))  # fmt: skip
    result = fid_score.fid_score(TrainedModel.from_config(config, workdir))
    assert math.isfinite(result["fid"]) and math.isfinite(result["inception_score"])
    assert "sfid" not in result and "precision" not in result
    assert "no images" in result["sfid_skipped"] and "no images" in result[
        "precision_recall_skipped"]  # fmt: skip
    assert result["sample_protocol"]["reference"]["sha256"] == weights.sha256_file(path)


def test_protocol_fields_are_checked(run):
    from ddpm_jax.experiment import ExperimentConfig, eval_protocol

    config, _ = run
    parsed = ExperimentConfig.from_config(config)
    assert eval_protocol.seeds(parsed.eval, 42) == (42,)  # None: the sampling seed.
    assert eval_protocol.likelihoods(parsed.eval) == ("bound",)
    assert eval_protocol.likelihoods(parsed.eval, "edm") == ("ode",)
    for field, value, message in [
        ("fid_seeds", (1, 1), "distinct"),
        ("fid_seeds", (), "non-empty"),
        ("fid_reference", "val", "'train', 'test', 'file'"),
        ("reference_file", "ref.npz", "fid_reference = 'file'"),
        ("likelihood", "elbo", "'bound', 'ode', 'both'"),
        ("ode_num_probes", 0, ">= 1"),
        ("ode_dequantization", "uniform", "'score_sde', 'centred'"),
    ]:
        bad = small_config(config.data.data_dir)
        bad.eval[field] = value
        with pytest.raises(ConfigError, match=rf"config\.eval\.{field} = .*{re.escape(message)}"):
            ExperimentConfig.from_config(bad)
    both = small_config(config.data.data_dir)
    both.eval.likelihood = "both"
    with pytest.raises(ConfigError, match=r"config\.eval\.likelihood = 'both'.*'edm'"):
        eval_protocol.likelihoods(ExperimentConfig.from_config(both).eval, "edm")


@pytest.mark.slow
def test_every_metric_end_to_end_with_random_inception_weights(run, tmp_path):
    """The real FID Inception (random weights and logits layer from an .npz, as a converted
    file is loaded): every metric of the JSON is finite."""
    config, workdir = run
    path = tmp_path / "inception.npz"
    flat = traverse_util.flatten_dict(inception.random_variables(0), sep="/")
    rng = np.random.default_rng(1)
    flat[weights.LOGITS_KERNEL] = (0.05 * rng.standard_normal((2048, 1008))).astype(np.float32)
    flat[weights.LOGITS_BIAS] = np.zeros(1008, np.float32)
    weights.save_variables_npz(path, flat)
    config = small_config(config.data.data_dir)
    config.eval.inception_weights = str(path)
    config.eval.inception_sha256 = weights.sha256_file(path)
    config.eval.fid_cache_dir = str(tmp_path / "cache")
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("eval", wd.LOCK_FILE))
    result = evaluate.evaluate(config, str(copy))
    for m in METRICS:
        assert math.isfinite(result[m]), m
    assert json.load(open(copy / "eval" / f"bpd_step{STEP}.json"))["fid"] == result["fid"]


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
