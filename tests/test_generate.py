"""Sampling from a workdir: `load_sampler` and `--mode=sample` (`write_samples`)."""

import dataclasses
import json
import logging
import os

import jax
import numpy as np
import pytest
from numerics import assert_f32_close

import ddpm_jax
from configs import tiny
from ddpm_jax import sampling, train
from ddpm_jax.experiment import SamplingOptions, changes
from ddpm_jax.inference import write_samples
from ddpm_jax.inference.trained_model import TrainedModel, chunk_sizes
from ddpm_jax.runtime import checkpointing
from ddpm_jax.runtime import sharding as shd
from ddpm_jax.runtime import workdir as wd

STEP = 3


def small_config(data_dir):
    """configs/tiny.py with T = 16: every chain and bound here runs in about a second."""
    config = tiny.get_config()
    config.data.data_dir = str(data_dir)
    config.diffusion.num_timesteps = 16
    config.eval.bpd_timestep_chunk = 8
    config.sampling.batch_size = 8
    config.sampling.num_samples = 20
    config.sampling.seed = 7
    return config


def make_workdir(workdir, config):
    """A workdir with config.json and one checkpoint (step 3) of random parameters.

    The EMA parameters differ from `params`, so restoring the wrong subtree shows.
    No training step is compiled: the leaves are drawn with numpy from the abstract state.
    """
    abstract = train.build(config, shd.make_mesh()).abstract
    rng = np.random.default_rng(0)

    def draw(leaf):
        if not np.issubdtype(leaf.dtype, np.floating):
            return np.zeros(leaf.shape, leaf.dtype)
        return (0.2 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    state = jax.tree.map(draw, abstract)
    state = dataclasses.replace(state, step=np.int32(STEP))
    wd.write_config(config, str(workdir))
    with checkpointing.Checkpointer(str(workdir), save_every_steps=1, async_save=False) as ckpt:
        ckpt.save(STEP, state, {"data_step": STEP}, force=True)
    return state


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    config = small_config(tmp_path_factory.mktemp("tfds"))
    workdir = tmp_path_factory.mktemp("run")
    state = make_workdir(workdir, config)
    return config, str(workdir), state


@pytest.fixture(scope="module")
def sampler(run):
    return ddpm_jax.load_sampler(run[1])


def test_load_sampler_restores_only_the_ema_params(run, sampler):
    _, _, state = run
    assert sampler.step == STEP
    leaves = jax.tree.leaves(sampler.params)
    assert len(leaves) == len(jax.tree.leaves(state.ema_params))
    for got, ema in zip(leaves, jax.tree.leaves(state.ema_params), strict=True):
        np.testing.assert_array_equal(np.asarray(got), ema)
    assert not np.array_equal(np.asarray(leaves[0]), jax.tree.leaves(state.params)[0])


def test_sample_shape_dtype_determinism(sampler):
    images = sampler.sample(13, seed=1)  # chunks of 8 and 5 (padded to 8 on 8 devices)
    assert images.shape == (13, 8, 8, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, sampler.sample(13, seed=1))
    np.testing.assert_array_equal(images, sampler.sample(13, jax.random.key(1)))
    assert not np.array_equal(images, sampler.sample(13, seed=2))
    assert images.std() > 0


def test_padding_chunking_and_device_count_change_no_image(sampler):
    """A device count that divides neither the chunks nor N: same images, padding dropped."""
    reference = sampler.sample_float(13, seed=1)
    assert reference.dtype == np.float32 and np.abs(reference).max() <= 1.0
    # A prefix of the request, and 3 devices (chunks 8 -> 9 and 5 -> 6 rows).
    np.testing.assert_allclose(sampler.sample_float(5, seed=1), reference[:5], atol=1e-5)
    mesh3 = shd.make_mesh(devices=jax.devices()[:3])
    on3 = dataclasses.replace(
        sampler, mesh=mesh3, params=jax.device_put(sampler.params, shd.replicated(mesh3))
    )
    np.testing.assert_allclose(on3.sample_float(13, seed=1), reference, atol=1e-5)


def test_image_keys_match_the_documented_derivation(run, sampler):
    """Image j of chunk c is `sample` with split(fold_in(fold_in(key, c), j))[0]: an oracle."""
    config = sampler.config
    got = sampler.sample_float(10, seed=3)[9]  # chunk 1, image 1
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(3), 1), 1)
    expected = sampling.sample(
        sampler.experiment.model_fn(sampler.params),
        sampler.sched,
        (1, 8, 8, 1),
        jax.random.split(key)[0],
        parameterization=config.diffusion.parameterization,
        variance=config.diffusion.variance,
        clip_denoised=config.diffusion.clip_denoised,
    )[0]
    np.testing.assert_allclose(got, np.asarray(expected), atol=1e-5)


def test_bad_requests_raise_clear_errors(run, sampler):
    _, workdir, _ = run
    with pytest.raises(ValueError, match="num_images"):
        sampler.sample(0)
    with pytest.raises(ValueError, match="sampler"):
        sampler.sample(2, sampler="euler_a")
    with pytest.raises(ValueError, match="eta"):
        sampler.sample(2, eta=0.5)
    with pytest.raises(ValueError, match="num_steps"):
        sampler.sample(2, num_steps=17)
    with pytest.raises(ValueError, match="unconditional"):
        sampler.sample(2, labels=np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="guidance_scale"):
        sampler.sample(2, guidance_scale=2.0)
    with pytest.raises(ValueError, match="key or seed"):
        sampler.sample(2, 1, seed=1)
    with pytest.raises(ValueError, match=r"model\.ch"):
        ddpm_jax.load_sampler(workdir, config_overrides={"model.ch": 64})
    with pytest.raises(ValueError, match=r"sampling\.nope"):
        ddpm_jax.load_sampler(workdir, config_overrides={"sampling.nope": 1})
    with pytest.raises(ValueError, match=r"'learned_range'.* only between 'fixedsmall' and"):
        ddpm_jax.load_sampler(workdir, config_overrides={"diffusion.variance": "learned_range"})
    with pytest.raises(FileNotFoundError, match="step 4"):
        ddpm_jax.load_sampler(workdir, step=4)


def test_overrides_and_ddim(run):
    sampler = ddpm_jax.load_sampler(
        run[1], config_overrides={"sampling.sampler": "ddim", "sampling.num_steps": 4}
    )
    assert sampler.options() == SamplingOptions(
        "ddim", 4, 0.0, 1.0, 2, "endpoints", None, None, 7.0, 0.0, 0.0, None, 1.0
    )
    images = sampler.sample(3, seed=0)
    assert images.shape == (3, 8, 8, 1)
    np.testing.assert_array_equal(images, sampler.sample(3, seed=0))  # η = 0: deterministic


def test_fast_samplers_and_spacings_share_one_program_per_chain_length(run):
    sampler = ddpm_jax.load_sampler(run[1])
    kw = dict(sampler="dpm_solver++", num_steps=5, order=2)
    a = sampler.sample_float(3, seed=0, timestep_spacing="logsnr", **kw)
    b = sampler.sample_float(3, seed=0, timestep_spacing="trailing", **kw)
    c = sampler.sample_float(3, seed=0, sampler="unipc", num_steps=5, timestep_spacing="even")
    assert not np.array_equal(a, b) and a.shape == c.shape == (3, 8, 8, 1)
    programs = [k for k in sampler._compiled if k != "model_fn"]
    assert len(programs) == 2  # (dpm_solver++, 5 steps) and (unipc, 5 steps)
    with pytest.raises(ValueError, match=r"config\.sampling\.order = 3: applies to"):
        sampler.sample(2, sampler="ddim", order=3)
    with pytest.raises(ValueError, match=r"config\.sampling\.timestep_spacing = 'uniform'"):
        sampler.sample(2, timestep_spacing="uniform")


def test_model_fn_is_the_jitted_network_of_the_workdir(run, sampler):
    x = np.random.default_rng(0).standard_normal((3, 8, 8, 1)).astype(np.float32)
    t = np.array([0, 5, 15], np.int32)
    want = sampler.experiment.model_fn(sampler.params)(x, t)
    assert_f32_close(sampler.model_fn(x, t), want)  # two compilations of one network.


def test_resolve_config_keeps_trained_fields_and_warns(run, caplog):
    config, workdir, _ = run
    cli = small_config(config.data.data_dir)
    cli.model.ch = 64
    cli.sampling.num_samples = 5
    cli.data.data_dir = "/elsewhere"
    with caplog.at_level(logging.WARNING):
        merged = changes.resolve_config(cli, workdir)
    assert merged.model.ch == 32 and merged.sampling.num_samples == 5
    assert merged.data.data_dir == "/elsewhere"  # where the data is, not what was trained
    warnings = [r.getMessage() for r in caplog.records if "trained field" in r.getMessage()]
    assert len(warnings) == 1 and "model.ch (64 -> 32)" in warnings[0]
    cli.data.data_dir = None  # unset: where training had it
    assert changes.resolve_config(cli, workdir).data.data_dir == config.data.data_dir

    # A sampling choice given on the command line (--config.diffusion.variance) is applied
    # after the resolution, and the warning does not claim it was ignored.
    cli.model.ch, cli.diffusion.variance = 32, "fixedsmall"
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        merged = changes.run_config(cli, workdir, {"diffusion.variance": "fixedsmall"})
    assert merged.diffusion.variance == "fixedsmall" and merged.sampling.num_samples == 5
    assert not [r for r in caplog.records if "trained field" in r.getMessage()]
    assert changes.run_config(cli, workdir).diffusion.variance == config.diffusion.variance


def _listing(directory):
    return {f: os.stat(os.path.join(directory, f)).st_mtime_ns for f in os.listdir(directory)}


def test_generate_writes_chunks_and_resumes(run, sampler):
    config, workdir, _ = run
    out = os.path.join(workdir, wd.SAMPLES_SUBDIR)
    path = write_samples.write_samples(config, workdir)
    assert path == os.path.join(out, "samples.npz")
    names = [f"chunk_{i:05d}" for i in range(3)]
    assert set(os.listdir(out)) == {
        *(n + ext for n in names for ext in (".npz", ".png")),
        "samples.npz",
        "meta.json",
    }
    sizes = [np.load(os.path.join(out, n + ".npz"))["images"].shape[0] for n in names]
    assert sizes == chunk_sizes(20, 8) == [8, 8, 4]
    first = np.load(path)["images"]
    assert first.shape == (20, 8, 8, 1) and first.dtype == np.uint8
    # The same images as the public sampler with the config's seed.
    np.testing.assert_array_equal(first, sampler.sample(20, seed=config.sampling.seed))
    assert json.load(open(os.path.join(out, "meta.json")))["checkpoint_step"] == STEP

    # Resume: one chunk lost and a partial write left behind; only that chunk is redrawn.
    before = _listing(out)
    os.remove(os.path.join(out, "chunk_00001.npz"))
    with open(os.path.join(out, "chunk_00001.npz.tmp"), "wb") as f:
        f.write(b"partial")
    write_samples.write_samples(config, workdir)
    after = _listing(out)
    for name in ("chunk_00000.npz", "chunk_00000.png", "chunk_00002.npz", "chunk_00002.png"):
        assert after[name] == before[name], name
    assert after["chunk_00001.npz"] != before["chunk_00001.npz"]
    assert "chunk_00001.npz.tmp" not in after
    np.testing.assert_array_equal(np.load(path)["images"], first)  # = the fresh full run

    # Settings that would change the existing chunks are refused.
    other = small_config(config.data.data_dir)
    other.sampling.seed = 8
    with pytest.raises(ValueError, match="seed"):
        write_samples.write_samples(other, workdir)
    # A sampling choice among the trained fields reaches the chains (and so is refused here).
    with pytest.raises(ValueError, match="clip_denoised"):
        write_samples.write_samples(
            config, workdir, config_overrides={"diffusion.clip_denoised": False}
        )


def test_sampler_is_importable_from_the_package_top():
    from ddpm_jax.inference import trained_model

    assert ddpm_jax.TrainedModel is TrainedModel
    assert ddpm_jax.load_sampler is trained_model.load_sampler


def test_class_conditional_labels_and_guidance(tmp_path):
    config = small_config(tmp_path / "tfds")
    config.model.num_classes = 10
    make_workdir(tmp_path / "run", config)
    sampler = ddpm_jax.load_sampler(str(tmp_path / "run"))
    given = np.array([0, 0, 0, 9, 9, 10], np.int32)  # 10: the null (unconditional) class
    images, labels = sampler.sample(6, seed=0, labels=given, guidance_scale=2.0, return_labels=True)
    np.testing.assert_array_equal(labels, given)
    assert images.shape == (6, 8, 8, 1)
    other = sampler.sample(6, seed=0, labels=np.full(6, 5, np.int32), guidance_scale=2.0)
    assert not np.array_equal(images, other)  # the label conditions the chain
    _, drawn = sampler.sample(6, seed=0, guidance_scale=2.0, return_labels=True)
    assert drawn.dtype == np.int32 and drawn.min() >= 0 and drawn.max() < 10
    assert len(set(drawn.tolist())) > 1
    with pytest.raises(ValueError, match="labels must lie in"):
        sampler.sample(2, labels=np.array([0, 11]))
