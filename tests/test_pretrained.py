"""Importing diffusers DDPM repositories (Ho et al.'s releases): numerics, refusals, downloads.

The fixtures in tests/golden/pretrained/ are small diffusers repositories with random weights
and the outputs of diffusers' own `UNet2DModel` on them (tests/golden/make_pretrained_fixtures.py,
run once with torch); these tests need neither torch nor the network.
"""

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import ddpm_jax
from ddpm_jax import files, models
from ddpm_jax.errors import ConfigError, DataError, DataNotFoundError, UserError, WorkdirError
from ddpm_jax.evaluation import evaluate
from ddpm_jax.experiment import changes, defaults
from ddpm_jax.models import layers
from ddpm_jax.pretrained import (
    diffusers_unet,
    import_diffusers,
    importer,
    make_config,
    repo,
    weights,
)
from ddpm_jax.runtime import checkpointing
from ddpm_jax.runtime import workdir as wd
from ddpm_jax.train import loop

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden" / "pretrained"
DIGITS8 = GOLDEN / "digits8_root"  # root layout, legacy attention names, float32, 8×8×1
RGB16 = GOLDEN / "rgb16_subfolders"  # unet/ + scheduler/, float16, two heads, 16×16×3
HO = GOLDEN / "ho_configs"


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A TFDS data_dir for the embedded digits (built on first use)."""
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """Both fixtures imported once: {name: workdir}."""
    out = {}
    for name, source, data_name in (("digits8", DIGITS8, "digits"), ("rgb16", RGB16, None)):
        workdir = str(tmp_path_factory.mktemp(name) / "w")
        import_diffusers(str(source), workdir, data_name=data_name)
        out[name] = workdir
    return out


@pytest.fixture(scope="module")
def samplers(imported):
    """`ddpm_jax.load_sampler` of each imported workdir."""
    return {name: ddpm_jax.load_sampler(workdir) for name, workdir in imported.items()}


def copy_repo(source: Path, dest: Path, edit_unet=None, edit_scheduler=None) -> Path:
    """A copy of a fixture repository with its config.json / scheduler_config.json edited."""
    shutil.copytree(source, dest)
    unet = dest / ("unet/config.json" if (dest / "unet").is_dir() else "config.json")
    sched = dest / ("scheduler" if (dest / "scheduler").is_dir() else ".") / "scheduler_config.json"
    for path, edit in ((unet, edit_unet), (sched, edit_scheduler)):
        if edit:
            cfg = json.loads(path.read_text())
            edit(cfg)
            path.write_text(json.dumps(cfg))
    return dest


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("name, fixture", [("digits8", DIGITS8), ("rgb16", RGB16)])
def test_imported_network_equals_diffusers(samplers, name, fixture):
    ref = np.load(fixture / "reference.npz")
    sampler = samplers[name]
    x = np.transpose(ref["x"], (0, 2, 3, 1))  # NCHW -> NHWC
    out = np.asarray(sampler.model_fn(x, ref["t"].astype(np.int32)))
    want = np.transpose(ref["out"], (0, 2, 3, 1))
    assert np.abs(out - want).max() / np.abs(want).max() < 1e-5


def test_configs_written(imported):
    digits = changes.read_config(imported["digits8"])
    assert digits.data.name == "digits" and (digits.data.image_size, digits.data.channels) == (8, 1)
    m = digits.model
    assert (m.ch, tuple(m.ch_mult), m.num_res_blocks, tuple(m.attn_resolutions)) == (
        8,
        (1, 1, 1),
        1,
        (4,),
    )
    assert (m.num_heads, m.norm_groups, m.dropout) == (1, 4, 0.0)  # 16 channels: 4, not 8.
    d = digits.diffusion
    assert (d.parameterization, d.variance, d.clip_denoised, d.schedule) == (
        "eps",
        "fixedlarge",
        True,
        "linear",
    )
    assert (d.num_timesteps, d.beta_start, d.beta_end) == (100, 1e-3, 0.2)
    rgb = changes.read_config(imported["rgb16"])
    assert rgb.data.name == "unknown"  # nothing says what it is of.
    assert (rgb.model.num_heads, rgb.model.norm_groups, rgb.model.num_res_blocks) == (2, 8, 2)
    assert tuple(rgb.model.attn_resolutions) == (8, 4) and rgb.model.dropout == 0.1
    r = rgb.diffusion
    assert (r.parameterization, r.variance, r.clip_denoised, r.schedule, r.num_timesteps) == (
        "v",
        "fixedsmall",
        False,
        "cosine",
        50,
    )


def test_checkpoint_state_and_provenance(imported, samplers):
    workdir = imported["rgb16"]
    assert checkpointing.complete_steps(workdir) == [0]
    params = checkpointing.restore_subtree(imported["digits8"], "params")[0]
    ema = samplers["digits8"].params  # what sampling restores: "ema_params".
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), params, ema))
    assert int(checkpointing.restore_subtree(workdir, "step")[0]) == 0
    with open(os.path.join(wd.checkpoint_dir(workdir), "0", "extra", "metadata")) as f:
        extra = json.load(f)
    assert extra["imported_from"] == str(RGB16) and extra["revision"] is None
    assert extra["data_step"] == 0
    names = [
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ]
    assert sorted(extra["sha256"]) == names
    for n in names:
        assert extra["sha256"][n] == hashlib.sha256((RGB16 / n).read_bytes()).hexdigest()


def test_ddim_sample_and_bits_per_dim(imported, samplers, tfds_dir):
    workdir = imported["digits8"]
    sampler = samplers["digits8"]
    images = sampler.sample(4, seed=0, sampler="ddim", num_steps=5)
    assert images.shape == (4, 8, 8, 1) and images.dtype == np.uint8
    config = changes.read_config(workdir)
    config.data.data_dir = tfds_dir
    config.eval.num_examples = 2
    config.eval.batch_size = 8  # one row per fake device.
    results = evaluate.evaluate(config, workdir)
    assert results["num_examples"] == 2 and np.isfinite(results["bpd"]) and results["bpd"] > 0


def test_import_into_a_workdir_with_checkpoints_is_refused(imported):
    with pytest.raises(WorkdirError, match="already holds checkpoints"):
        import_diffusers(str(DIGITS8), imported["digits8"])


def test_import_over_another_config_is_refused(tmp_path):
    wd.write_config({"data": {"name": "cifar10"}}, str(tmp_path))
    with pytest.raises(WorkdirError, match=r"already has a config.json of another run"):
        import_diffusers(str(DIGITS8), str(tmp_path))
    assert not os.path.exists(wd.checkpoint_dir(str(tmp_path)))


@pytest.mark.parametrize(
    "source, data_name, name, eval_split",
    [
        ("google/ddpm-cifar10-32", None, "cifar10", "test"),
        ("google/ddpm-ema-church-256", None, "lsun/church_outdoor", "validation"),
        ("/data/models/ddpm-celebahq-256", None, "celeb_a_hq/256", "train"),
        ("/data/models/ddpm-celebahq-finetuned-butterflies", None, "unknown", "test"),
        ("/data/models/x", "celeb_a_hq/256", "celeb_a_hq/256", "train"),
        ("/data/models/x", "digits", "digits", "test"),
    ],
)
def test_dataset_of_a_model(source, data_name, name, eval_split):
    r = repo.Repo(source, None, {}, "config.json", "w", "scheduler_config.json")
    fields, split = importer.data_fields(r, data_name)
    assert fields["name"] == name and split == eval_split


def test_training_an_imported_workdir_is_refused(imported, tfds_dir):
    """Its own config, so no field changed: the refusal comes from the checkpoint's extra."""
    workdir = imported["digits8"]
    config = changes.read_config(workdir)
    config.data.data_dir = tfds_dir
    config.training.batch_size = 8
    config.training.allow_config_change = True  # batch_size: a refused change otherwise.
    before = Path(workdir, "config.json").read_text()
    with pytest.raises(WorkdirError, match=r"imported from .*fine-tuning from imported weights"):
        loop.train(config, workdir)
    assert checkpointing.complete_steps(workdir) == [0]
    assert Path(workdir, "config.json").read_text() == before


# --------------------------------------------------------------------------- Ho et al.'s configs


def test_ho_cifar10_config_is_the_papers_model():
    source = HO / "ddpm-cifar10-32"
    files = {n: str(source / n) for n in ("config.json", "scheduler_config.json")}
    r = repo.Repo(str(source), None, files, "config.json", "x", "scheduler_config.json")
    config = make_config(r)
    m = config.model
    assert (m.ch, tuple(m.ch_mult), m.num_res_blocks, tuple(m.attn_resolutions)) == (
        128,
        (1, 2, 2, 2),
        2,
        (16,),
    )
    assert (m.num_heads, m.norm_groups) == (1, None)  # ddpm_jax's own GroupNorm(32) rule.
    assert (config.data.name, config.data.image_size, config.data.channels) == ("cifar10", 32, 3)
    d = config.diffusion
    assert (d.parameterization, d.variance, d.schedule, d.num_timesteps) == (
        "eps",
        "fixedlarge",
        "linear",
        1000,
    )
    assert (d.beta_start, d.beta_end, d.clip_denoised) == (1e-4, 0.02, True)


def test_ho_celebahq_config():
    path = HO / "ddpm-celebahq-256" / "unet" / "config.json"
    model, size, channels = diffusers_unet.model_group(json.loads(path.read_text()), str(path))
    assert (size, channels, model["ch_mult"], model["attn_resolutions"]) == (
        256,
        3,
        (1, 1, 2, 2, 4, 4),
        (16,),
    )
    assert model["norm_groups"] is None and model["num_heads"] == 1


def legacy_names(names):
    """Today's attention tensor names as diffusers' checkpoints before 0.15 had them."""
    out = []
    for k in names:
        if ".attentions." in k:
            for new, old in weights.LEGACY_ATTENTION.items():
                k = k.replace(f".{old}.", f".{new}.")
        out.append(k)
    return out


@pytest.mark.parametrize("legacy", [False, True], ids=["to_q", "query"])
def test_cifar10_tensor_names_fill_every_leaf(legacy):
    """diffusers' CIFAR-10 U-Net (names and shapes only) fills our CIFAR-10 U-Net exactly."""
    shapes = json.loads((HO / "cifar10_state_dict_shapes.json").read_text())
    shapes = {k: tuple(v) for k, v in shapes.items()}
    if legacy:
        shapes = dict(zip(legacy_names(shapes), shapes.values(), strict=True))
        assert "mid_block.attentions.0.proj_attn.weight" in shapes
        shapes = weights.modern_names(shapes, "cifar10")
    cfg = models.ModelConfig.from_dict(defaults.group("model"), 32, 3)  # Ho et al.'s CIFAR-10
    abstract = models.abstract_variables(models.UNet(cfg))["params"]
    mapping = weights.plan(shapes, abstract, 4, "cifar10")
    assert len(mapping) == len(jax.tree.leaves(abstract)) == len(shapes) == 328
    expected = {
        ("up_1_attn_0", "proj_out", "kernel"): (
            "up_blocks.2.attentions.0.to_out.0.weight",
            "linear",
        ),
        ("up_3_upsample", "conv", "kernel"): ("up_blocks.0.upsamplers.0.conv.weight", "conv"),
        ("down_1_block_0", "skip", "kernel"): (
            "down_blocks.1.resnets.0.conv_shortcut.weight",
            "conv1x1",
        ),
        ("mid_block_1", "norm1", "scale"): ("mid_block.resnets.1.norm2.weight", "vector"),
        ("temb", "dense0", "kernel"): ("time_embedding.linear_1.weight", "linear"),
        ("norm_out", "bias"): ("conv_norm_out.bias", "vector"),
    }
    for path, want in expected.items():
        assert mapping[path] == want


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "edit, source, wanted",
    [
        (
            lambda c: c.update(layers_per_block=2),
            DIGITS8,
            "missing .*down_blocks.0.resnets.1.conv1",
        ),
        (
            lambda c: c.update(layers_per_block=1),
            RGB16,
            "left over .*down_blocks.0.resnets.1.conv1",
        ),
        (
            lambda c: c.update(block_out_channels=[8, 8, 16]),
            DIGITS8,
            "of another shape .*down_blocks.2",
        ),
    ],
    ids=["more_blocks", "fewer_blocks", "wider"],
)
def test_weights_that_do_not_fit_the_config_name_the_tensors(tmp_path, edit, source, wanted):
    src = copy_repo(source, tmp_path / "repo", edit_unet=edit)
    workdir = tmp_path / "w"
    with pytest.raises(DataError, match=wanted):
        import_diffusers(str(src), str(workdir))
    assert not workdir.exists()  # nothing written.


UNET_REFUSALS = [
    ("resnet_time_scale_shift", "scale_shift"),
    ("downsample_padding", 1),
    ("flip_sin_to_cos", True),
    ("freq_shift", 0),
    ("norm_eps", 1e-5),
    ("center_input_sample", True),
    ("act_fn", "gelu"),
    ("class_embed_type", "timestep"),
    ("num_class_embeds", 10),
    ("time_embedding_type", "fourier"),
    ("add_attention", False),
    ("mid_block_scale_factor", 2),
    ("attention_head_dim", 3),
    ("attn_norm_num_groups", 2),
    ("out_channels", 2),
    ("down_block_types", ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]),
    ("up_block_types", ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]),
    ("block_out_channels", [8, 12, 8]),
    ("_class_name", "UNet2DConditionModel"),
    ("transformer_layers_per_block", 2),  # a field diffusers' UNet2DModel does not have.
]
SCHEDULER_REFUSALS = [
    ("variance_type", "learned_range"),
    ("prediction_type", "flow"),
    ("beta_schedule", "laplace"),
    ("trained_betas", [0.1] * 100),
    ("thresholding", True),
    ("rescale_betas_zero_snr", True),
    ("clip_sample_range", 2.0),
    ("_class_name", "DDIMScheduler"),
]


@pytest.mark.parametrize("field, value", UNET_REFUSALS, ids=[f for f, _ in UNET_REFUSALS])
def test_unet_config_we_cannot_express_is_refused_naming_the_field(tmp_path, field, value):
    src = copy_repo(DIGITS8, tmp_path / "repo", edit_unet=lambda c: c.update({field: value}))
    with pytest.raises(ConfigError, match=rf"config.json: {field} = "):
        import_diffusers(str(src), str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("field, value", SCHEDULER_REFUSALS, ids=[f for f, _ in SCHEDULER_REFUSALS])
def test_scheduler_config_we_cannot_express_is_refused(tmp_path, field, value):
    src = copy_repo(DIGITS8, tmp_path / "repo", edit_scheduler=lambda c: c.update({field: value}))
    with pytest.raises(ConfigError, match=rf"scheduler_config.json: {field} = "):
        import_diffusers(str(src), str(tmp_path / "w"))


def test_defaults_of_absent_fields_are_diffusers_defaults():
    """A config.json without downsample_padding means diffusers' 1, which is refused."""
    cfg = json.loads((DIGITS8 / "config.json").read_text())
    del cfg["downsample_padding"]
    with pytest.raises(ConfigError, match="downsample_padding = 1"):
        diffusers_unet.model_group(cfg, "config.json")


def test_norm_groups_must_divide_every_width():
    with pytest.raises(ConfigError, match=r"model.norm_groups = 3 does not divide the 8 channels"):
        models.ModelConfig.from_dict(
            defaults.group("model", ch=8, ch_mult=(1, 1), norm_groups=3, attn_resolutions=(4,)),
            8,
            1,
        )


def test_norm_groups_sets_every_groupnorm():
    """16 channels: 8 groups by ddpm_jax's rule, 4 with norm_groups=4 (a different function)."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 16))
    default = layers.GroupNorm().apply({"params": {"scale": np.ones(16), "bias": np.zeros(16)}}, x)
    four = layers.GroupNorm(groups=4).apply(
        {"params": {"scale": np.ones(16), "bias": np.zeros(16)}}, x
    )
    g = np.asarray(x).reshape(2, 16, 4, 4)
    want = (g - g.mean(axis=(1, 3), keepdims=True)) / np.sqrt(
        g.var(axis=(1, 3), keepdims=True) + 1e-6
    )
    np.testing.assert_allclose(np.asarray(four), want.reshape(2, 4, 4, 16), atol=1e-5)
    assert not np.allclose(np.asarray(default), np.asarray(four), atol=1e-3)


class Marker:
    """Unpickling this object creates a file: proof that a pickle was loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_pickled_weights_are_refused_without_unpickling(tmp_path):
    src = tmp_path / "repo"
    src.mkdir()
    for name in ("config.json", "scheduler_config.json"):
        shutil.copy(DIGITS8 / name, src / name)
    marker = tmp_path / "unpickled"
    (src / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"x": Marker(str(marker))}))
    with pytest.raises(DataError, match=r"\.bin, a pickle.*convert-bin"):
        import_diffusers(str(src), str(tmp_path / "w"))
    assert not marker.exists() and not (tmp_path / "w").exists()


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("torch") is not None, reason="torch is installed"
)
def test_convert_bin_without_torch_says_so(tmp_path):
    with pytest.raises(UserError, match="convert-bin needs PyTorch"):
        repo.convert_bin(str(tmp_path))


def test_missing_scheduler_config_is_named(tmp_path):
    src = tmp_path / "repo"
    src.mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        shutil.copy(DIGITS8 / name, src / name)
    with pytest.raises(DataNotFoundError, match=r"scheduler_config.json"):
        import_diffusers(str(src), str(tmp_path / "w"))


# --------------------------------------------------------------------------- the hub


class FakeHub:
    """A stand-in for `huggingface_hub.HfApi` serving a fixture directory at one commit."""

    COMMIT = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, root: Path, cache: Path, tamper: str | None = None):
        self.root, self.cache, self.tamper = root, cache, tamper
        self.downloads = []

    def model_info(self, repo_id, *, revision=None, files_metadata=False, timeout=None):
        assert files_metadata and timeout
        siblings = []
        for path in sorted(p for p in self.root.rglob("*") if p.is_file()):
            name = str(path.relative_to(self.root))
            entry = {"rfilename": name, "blob_id": repo.git_blob_sha1(str(path))}
            if name.endswith((".safetensors", ".bin")):
                entry["lfs"] = {"sha256": files.sha256_file(str(path))}
            siblings.append(entry)
        return {"sha": self.COMMIT, "siblings": siblings}

    def hf_hub_download(self, repo_id, filename, *, revision, cache_dir=None, etag_timeout=None):
        self.downloads.append((filename, revision))
        out = self.cache / revision / filename
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.root / filename, out)
        if filename == self.tamper:
            with open(out, "ab") as f:
                f.write(b" ")
        return str(out)


def test_hub_download_is_pinned_and_checked(tmp_path):
    api = FakeHub(RGB16, tmp_path / "cache")
    result = import_diffusers("google/ddpm-church-256@main", str(tmp_path / "w"), api=api)
    assert sorted(api.downloads) == [
        ("scheduler/scheduler_config.json", FakeHub.COMMIT),
        ("unet/config.json", FakeHub.COMMIT),
        ("unet/diffusion_pytorch_model.safetensors", FakeHub.COMMIT),
    ]  # only what is read, at the resolved commit (not at "main").
    assert result.extra["imported_from"] == "google/ddpm-church-256"
    assert result.extra["revision"] == FakeHub.COMMIT
    assert result.config.data.name == "lsun/church_outdoor"


@pytest.mark.parametrize(
    "tampered, what",
    [
        ("unet/diffusion_pytorch_model.safetensors", "SHA-256"),
        ("unet/config.json", "git object id"),
    ],
)
def test_hub_file_that_does_not_match_its_checksum_is_refused(tmp_path, tampered, what):
    api = FakeHub(RGB16, tmp_path / "cache", tamper=tampered)
    with pytest.raises(DataError, match=f"{tampered}: the downloaded file .* has {what}"):
        import_diffusers("google/ddpm-church-256", str(tmp_path / "w"), api=api)
    assert not (tmp_path / "w").exists()


def test_hub_repository_with_only_a_bin_is_refused_before_downloading(tmp_path):
    src = tmp_path / "hubrepo"
    src.mkdir()
    for name in ("config.json", "scheduler_config.json"):
        shutil.copy(DIGITS8 / name, src / name)
    (src / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    api = FakeHub(src, tmp_path / "cache")
    with pytest.raises(DataError, match=r"hf download someone/ddpm.*convert-bin DIR"):
        import_diffusers("someone/ddpm", str(tmp_path / "w"), api=api)
    assert api.downloads == []


def test_unreachable_hub_fails_in_seconds(tmp_path):
    from huggingface_hub import HfApi

    start = time.perf_counter()
    with pytest.raises(DataNotFoundError, match=r"google/ddpm-cifar10-32.*hf download"):
        import_diffusers(
            "google/ddpm-cifar10-32", str(tmp_path / "w"), api=HfApi(endpoint="http://127.0.0.1:9")
        )
    assert time.perf_counter() - start < 15


def run_cli(args, tmp_path, **env):
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HOME": str(tmp_path / "hf"), **env}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "ddpm_jax.pretrained", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc, time.perf_counter() - start


def test_cli_offline_hub_id_fails_fast_with_one_line(tmp_path):
    proc, elapsed = run_cli(
        ["--source=google/ddpm-cifar10-32", f"--workdir={tmp_path / 'w'}"],
        tmp_path,
        HF_HUB_OFFLINE="1",
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(
        "error: Cannot reach the Hugging Face hub for google/ddpm-cifar10-32"
    )
    assert "hf download google/ddpm-cifar10-32 --local-dir DIR" in lines[0]
    assert elapsed < 30 and not (tmp_path / "w").exists()


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"^--source=/nonexistent/ddpm: no such directory"):
        import_diffusers("/nonexistent/ddpm", str(tmp_path / "w"))
