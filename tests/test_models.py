"""Tests of the U-Net: sizes against Ho et al., exact-zero init, numerical equivalences
(jit, remat, bfloat16), layers against independent references, and config validation."""

import math
import pathlib
import sys
import types

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

# configs/ is not an installed package: `python -m pytest` from the root finds it, a bare
# `pytest` needs the repository root on the path.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from numerics import assert_f32_close

from configs import celeba_hq256, cifar10, lsun256, tiny
from ddpm_jax.models import (
    ModelConfig,
    UNet,
    abstract_variables,
    count_params,
    create_model,
    forward_flops,
    group_norm,
    layers,
    timestep_embedding,
)
from ddpm_jax.models.attention import AttnBlock
from ddpm_jax.models.layers import GroupNorm, num_groups

CIFAR10_PARAMS = 35_746_307  # Ho et al.'s "35.7M"; same count as a reference implementation.


# The tiny config minus its second level: ~4× cheaper to compile (eager and remat tests).
MICRO = {"ch_mult": (1,), "attn_resolutions": (8,)}


def tiny_model_config(**overrides) -> ModelConfig:
    config = tiny.get_config()
    for key, value in overrides.items():
        config.model[key] = value
    return ModelConfig.from_config(config)


def random_variables(module, *inputs, seed: int = 0):
    """Random variables of `module.init(key, *inputs)`'s shapes, drawn in numpy (no flax
    init, nothing compiled).

    Every layer is non-zero, so zero-initialised layers cannot hide a difference: kernels
    N(0, 1/fan_in), biases N(0, 0.1²), norm scales 1 + N(0, 0.1²), embeddings N(0, 1).
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        z = rng.standard_normal(leaf.shape).astype(np.float32)
        if name == "kernel":
            return jnp.asarray(z / np.sqrt(math.prod(leaf.shape[:-1])))
        if name == "scale":
            return jnp.asarray(1.0 + 0.1 * z)
        return jnp.asarray(z if name == "embedding" else 0.1 * z)

    abstract = jax.eval_shape(module.init, jax.random.key(0), *inputs)
    return jax.tree_util.tree_map_with_path(draw, abstract)


def tiny_inputs(cfg: ModelConfig, batch=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, cfg.image_size, cfg.image_size, cfg.in_channels))
    return jnp.asarray(x, jnp.float32), jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)


@pytest.fixture(scope="module")
def tiny_setup():
    """Tiny model, inputs, flax-initialised and random variables, and one jitted apply
    (compiled once for the module's tests)."""
    model = UNet(tiny_model_config(dropout=0.0))
    x, t = tiny_inputs(model.config)
    # rbg keys compile the initialisers' random bits ~2× faster than threefry on CPU.
    variables = jax.jit(model.init)(jax.random.key(1, impl="rbg"), x, t)
    return types.SimpleNamespace(
        model=model,
        x=x,
        t=t,
        variables=variables,
        params=random_variables(model, x, t),
        apply=jax.jit(model.apply),
    )


# --------------------------------------------------------------------------- sizes


def test_cifar10_parameter_count_is_ho_et_al():
    model = create_model(cifar10.get_config())
    n = count_params(abstract_variables(model)["params"])
    assert n == CIFAR10_PARAMS
    assert round(n / 1e6, 1) == 35.7  # the paper's figure (n is 0.13% above 35.7e6)


@pytest.mark.parametrize("module", [celeba_hq256, lsun256], ids=["celeba_hq256", "lsun256"])
def test_256_parameter_count_is_ho_et_al(module):
    config = module.get_config()
    assert config.data.image_size == 256
    n = count_params(abstract_variables(create_model(config)))
    assert abs(n - 114e6) / 114e6 < 1e-2, n


@pytest.mark.parametrize(
    "module", [cifar10, celeba_hq256, lsun256], ids=["cifar10", "celeba_hq256", "lsun256"]
)
def test_output_shape_equals_input_shape_big_configs(module):
    model = create_model(module.get_config())
    cfg = model.config
    x = jax.ShapeDtypeStruct((2, cfg.image_size, cfg.image_size, cfg.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.int32)
    out = jax.eval_shape(model.apply, abstract_variables(model, 2), x, t)
    assert out.shape == x.shape and out.dtype == jnp.float32


def test_tiny_forward_shape_and_exact_zero_at_init(tiny_setup):
    s = tiny_setup
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(s.variables))
    out = s.apply(s.variables, s.x, s.t)
    assert out.shape == s.x.shape and out.dtype == jnp.float32
    np.testing.assert_array_equal(out, 0.0)


def test_param_tree_follows_ho_et_al_skip_structure(tiny_setup):
    """Up-path blocks see [h, skip] concatenations; each up level has num_res_blocks + 1
    blocks, and the last one consumes conv_in's output."""
    params = tiny_setup.variables["params"]
    ch = 32  # tiny: ch 32, ch_mult (1, 2), 1 block per level: skips [32 | 32, 32 | 64]
    assert params["up_1_block_0"]["conv0"]["kernel"].shape == (3, 3, 64 + 64, 2 * ch)
    assert params["up_1_block_1"]["conv0"]["kernel"].shape == (3, 3, 64 + 32, 2 * ch)
    assert params["up_0_block_0"]["conv0"]["kernel"].shape == (3, 3, 64 + 32, ch)
    assert params["up_0_block_1"]["conv0"]["kernel"].shape == (3, 3, 32 + 32, ch)
    assert "up_0_block_2" not in params and "up_1_block_2" not in params
    assert "up_1_attn_0" in params and "down_1_attn_0" in params and "up_0_attn_0" not in params


# --------------------------------------------------------------------------- equivalences


def test_jit_and_eager_agree():
    model = UNet(tiny_model_config(**MICRO))
    x, t = tiny_inputs(model.config, batch=2)
    params = random_variables(model, x, t)
    t = jnp.full((2,), 123, jnp.int32)
    jitted = jax.jit(model.apply)(params, x, t)
    with jax.disable_jit():
        eager = model.apply(params, x, jnp.int32(123))  # a scalar t is broadcast to [B]
    assert float(jnp.abs(jitted).mean()) > 1e-2  # a non-trivial comparison
    np.testing.assert_allclose(jitted, eager, rtol=1e-4, atol=1e-4)


def test_unet_gives_the_same_output_and_gradients_on_both_group_norm_paths(monkeypatch):
    """The whole network with every GroupNorm forced to either formulation of its statistics
    (the CPU's and the other backends'): same output and parameter gradients to float32
    rounding."""
    model = UNet(tiny_model_config(**MICRO, dropout=0.0))
    x, t = tiny_inputs(model.config, batch=2)
    variables = random_variables(model, x, t)
    w = jax.random.normal(jax.random.key(7), x.shape)
    results = {}
    for stats in STATS:

        def forced(*args, stats=stats, **kwargs):
            return group_norm.group_norm(*args, **{**kwargs, "stats": stats})

        monkeypatch.setattr(layers, "group_norm", forced)

        def loss(v):
            out = model.apply(v, x, t)
            return jnp.sum(w * out), out

        results[stats] = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables)
    (_, out_c), grads_c = results["per_channel"]
    (_, out_g), grads_g = results["per_group"]
    assert float(jnp.abs(out_c).mean()) > 1e-2  # a non-trivial comparison
    np.testing.assert_allclose(out_c, out_g, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(grads_c), jax.tree.leaves(grads_g), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))


def test_output_depends_on_timestep(tiny_setup):
    s = tiny_setup
    out = s.apply(s.params, s.x, s.t)
    assert float(jnp.abs(s.apply(s.params, s.x, s.t + 1) - out).max()) > 1e-4


def test_bfloat16_matches_float32(tiny_setup):
    """bfloat16 compute (float32 params, GroupNorm and softmax) stays within 5% relative L2
    error of float32 (bfloat16 has an 8-bit mantissa: ~0.4% per rounding, a few dozen
    roundings deep)."""
    s = tiny_setup
    model16 = UNet(tiny_model_config(dropout=0.0, dtype="bfloat16"))
    out32 = s.apply(s.params, s.x, s.t)
    out16 = jax.jit(model16.apply)(s.params, s.x, s.t)
    assert out16.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
    assert 0.0 < rel < 5e-2, rel


def test_remat_gives_same_output_and_gradients():
    model = UNet(tiny_model_config(dropout=0.1, **MICRO))
    model_remat = UNet(tiny_model_config(dropout=0.1, remat=True, **MICRO))
    x, t = tiny_inputs(model.config, batch=2)
    params = random_variables(model, x, t)

    def loss(model):
        def f(p):
            out = model.apply(p, x, t, train=True, rngs={"dropout": jax.random.key(3)})
            return jnp.mean(out**2), out

        return jax.jit(jax.value_and_grad(f, has_aux=True))

    (l1, out1), g1 = loss(model)(params)
    (l2, out2), g2 = loss(model_remat)(params)
    np.testing.assert_allclose(out1, out2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    assert jax.tree_util.tree_structure(g1) == jax.tree_util.tree_structure(g2)
    # Some gradients are exactly zero in exact arithmetic (e.g. the attention key bias, which
    # softmax ignores), so compare on the scale of the largest gradient.
    scale = max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(g1))
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale), g1, g2
    )


def test_dropout_only_when_training():
    model = UNet(tiny_model_config(dropout=0.5, **MICRO))
    x, t = tiny_inputs(model.config, batch=2)
    params = random_variables(model, x, t)
    apply = jax.jit(model.apply, static_argnames="train")
    eval_out = apply(params, x, t, train=False)
    no_dropout = UNet(tiny_model_config(dropout=0.0, **MICRO))
    assert_f32_close(eval_out, jax.jit(no_dropout.apply)(params, x, t))
    train_a = apply(params, x, t, train=True, rngs={"dropout": jax.random.key(5)})
    train_b = apply(params, x, t, train=True, rngs={"dropout": jax.random.key(6)})
    assert not np.allclose(train_a, eval_out, atol=1e-3)
    assert not np.allclose(train_a, train_b, atol=1e-3)
    np.testing.assert_array_equal(
        train_a, apply(params, x, t, train=True, rngs={"dropout": jax.random.key(5)})
    )
    with pytest.raises(flax.errors.InvalidRngError):
        apply(params, x, t, train=True)


# --------------------------------------------------------------------------- components


def test_timestep_embedding_formula():
    # dim 4: half = 2, frequencies exp(-ln(1e4) * [0, 1] / 1) = [1, 1e-4].
    emb = timestep_embedding(jnp.array([0, 1, 500]), 4)
    expected = np.array(
        [
            [0.0, 0.0, 1.0, 1.0],
            [np.sin(1.0), np.sin(1e-4), np.cos(1.0), np.cos(1e-4)],
            [np.sin(500.0), np.sin(0.05), np.cos(500.0), np.cos(0.05)],
        ]
    )
    np.testing.assert_allclose(emb, expected, rtol=1e-5, atol=1e-6)
    # Width 128 (CIFAR-10's ch), against the formula in float64.
    t = np.array([0, 3, 999])
    freqs = np.exp(-np.log(10_000.0) * np.arange(64) / 63)
    ref = np.concatenate([np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)], axis=1)
    emb = timestep_embedding(jnp.asarray(t), 128)
    assert emb.shape == (3, 128) and emb.dtype == jnp.float32
    np.testing.assert_allclose(emb, ref, atol=2e-4)  # float32 phases of up to ~1000 rad


# Both formulations of the statistics (models.group_norm), forced on this CPU; "auto" picks
# "per_channel" here. Every GroupNorm test runs on both.
STATS = ["per_channel", "per_group"]


@pytest.mark.parametrize("stats", STATS)
@pytest.mark.parametrize("channels, groups", [(2, 1), (32, 16), (96, 32), (256, 32)])
def test_group_norm_matches_flax_reference(channels, groups, stats):
    """Against flax's GroupNorm with the documented min(32, C // 2) groups, on inputs whose
    mean is large next to their spread (the one-pass variance must still be accurate)."""
    x = 3.0 + 0.5 * jax.random.normal(jax.random.key(channels), (2, 4, 4, channels))
    variables = random_variables(GroupNorm(), x)
    ref = jax.jit(flax.linen.GroupNorm(num_groups=groups, epsilon=1e-6).apply)(variables, x)
    ours = jax.jit(GroupNorm(stats=stats).apply)(variables, x)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
    out16 = jax.eval_shape(
        GroupNorm(dtype=jnp.bfloat16, stats=stats).apply, variables, x.astype(jnp.bfloat16)
    )
    assert out16.dtype == jnp.bfloat16


def _group_norm_float64(x, scale, bias, groups, eps=1e-6):
    """Two-pass group normalization in float64: the oracle."""
    x = np.asarray(x, np.float64)
    b, c = x.shape[0], x.shape[-1]
    xg = x.reshape(b, -1, groups, c // groups)
    mean = xg.mean(axis=(1, 3), keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=(1, 3), keepdims=True)
    y = ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape)
    return y * np.asarray(scale, np.float64) + np.asarray(bias, np.float64)


@pytest.mark.parametrize("stats", STATS)
@pytest.mark.parametrize("offset, atol", [(0.0, 1e-5), (1e3, 2e-3), (1e4, 2e-2)])
def test_group_norm_far_from_zero_matches_float64(offset, atol, stats):
    """Activations whose mean dwarfs their spread (offset/std up to 1e4): a plain one-pass
    E[x²] - E[x]² loses every digit there (errors of order 1e3 at offset 1e4); the shifted
    statistics stay within float32's resolution of the inputs themselves (offset * 2^-24)."""
    x = offset + jax.random.normal(jax.random.key(1), (2, 8, 8, 64))
    block = GroupNorm(stats=stats)
    variables = random_variables(block, x)
    ours = jax.jit(block.apply)(variables, x)
    p = variables["params"]
    ref = _group_norm_float64(x, p["scale"], p["bias"], num_groups(64))
    np.testing.assert_allclose(ours, ref, atol=atol)


@pytest.mark.parametrize("stats", STATS)
def test_group_norm_bfloat16_input_matches_float64(stats):
    """bfloat16 activations with a large common offset: statistics in float32 from the
    bfloat16 values are exact to float32, so the only error is the bfloat16 output cast."""
    x = (300.0 + jax.random.normal(jax.random.key(2), (2, 8, 8, 64))).astype(jnp.bfloat16)
    block = GroupNorm(dtype=jnp.bfloat16, stats=stats)
    variables = random_variables(block, x)
    ours = jax.jit(block.apply)(variables, x)
    assert ours.dtype == jnp.bfloat16
    p = variables["params"]
    ref = _group_norm_float64(np.asarray(x, np.float32), p["scale"], p["bias"], num_groups(64))
    np.testing.assert_allclose(np.asarray(ours, np.float32), ref, atol=0.05, rtol=1e-2)


@pytest.mark.parametrize("stats", STATS)
def test_group_norm_gradient_matches_float64_difference(stats):
    """The shift is held constant for the gradient; the gradient is still that of the
    exact normalization (checked against jax's own two-pass formula in float32 at a
    scale where both are accurate)."""
    x = 2.0 + jax.random.normal(jax.random.key(3), (2, 4, 4, 32))
    block = GroupNorm(stats=stats)
    variables = random_variables(block, x)
    g = num_groups(32)

    def two_pass(x):
        xg = x.reshape(2, -1, g, 32 // g)
        mean = xg.mean(axis=(1, 3), keepdims=True)
        var = jnp.square(xg - mean).mean(axis=(1, 3), keepdims=True)
        y = ((xg - mean) * jax.lax.rsqrt(var + 1e-6)).reshape(x.shape)
        return y * variables["params"]["scale"] + variables["params"]["bias"]

    w = jax.random.normal(jax.random.key(4), x.shape)
    ours = jax.grad(lambda x: jnp.sum(w * block.apply(variables, x)))(x)
    ref = jax.grad(lambda x: jnp.sum(w * two_pass(x)))(x)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("offset", [0.0, 1e3, 1e4])
def test_group_norm_silu_value_and_gradients_match_float64_on_every_path(offset):
    """GroupNorm + fused SiLU on every path ("auto" included): the value of a weighted sum
    and its gradients (input, scale, bias) against the float64 two-pass formula's, also far
    from zero. Errors grow like offset · 2^-24 (float32's resolution of the mean); a plain
    one-pass E[x²] - E[x]² would be off by O(1) at 1e4."""
    x = offset + jax.random.normal(jax.random.key(5), (2, 4, 4, 96))
    w = np.asarray(jax.random.normal(jax.random.key(6), x.shape), np.float64)
    variables = random_variables(GroupNorm(), x)
    g = num_groups(96)

    with jax.enable_x64():

        def oracle(x, v):
            xg = x.reshape(2, -1, g, 96 // g)
            mean = xg.mean(axis=(1, 3), keepdims=True)
            var = jnp.square(xg - mean).mean(axis=(1, 3), keepdims=True)
            y = ((xg - mean) / jnp.sqrt(var + 1e-6)).reshape(x.shape)
            y = y * v["params"]["scale"] + v["params"]["bias"]
            return jnp.sum(w * y / (1 + jnp.exp(-y)))

        x64, v64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), (x, variables))
        ref = jax.value_and_grad(oracle, argnums=(0, 1))(x64, v64)
        ref = jax.tree.map(np.asarray, ref)

    rtol = 8 * offset * 2.0**-24 + 1e-5
    for stats in ("auto", *STATS):
        block = GroupNorm(activation="silu", stats=stats)

        def f(x, v, block=block):
            return jnp.sum(w.astype(np.float32) * block.apply(v, x))

        ours = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(x, variables)
        for o, r in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
            err = np.abs(np.asarray(o, np.float64) - r).max() / np.abs(r).max()
            assert err < rtol, (stats, err, rtol)


def test_group_norm_rejects_unknown_options():
    x = jnp.ones((1, 2, 2, 4))
    with pytest.raises(ValueError, match="stats"):
        GroupNorm(stats="fast").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="activation"):
        GroupNorm(activation="relu").init(jax.random.key(0), x)


@pytest.mark.parametrize("num_heads", [1, 4])
def test_attention_matches_numpy_reference(num_heads):
    b, h, w, c = 2, 4, 4, 32
    x = jax.random.normal(jax.random.key(0), (b, h, w, c))
    block = AttnBlock(num_heads=num_heads)
    variables = random_variables(block, x)
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables["params"])
    xn = np.asarray(x, np.float64)
    # Reference: GroupNorm (16 groups of 2 channels) by hand, then per-head softmax attention.
    g = xn.reshape(b, h * w, 16, 2)
    norm = (g - g.mean((1, 3), keepdims=True)) / np.sqrt(g.var((1, 3), keepdims=True) + 1e-6)
    norm = norm.reshape(b, h * w, c) * p["norm"]["scale"] + p["norm"]["bias"]
    q, k, v = (norm @ p[n]["kernel"] + p[n]["bias"] for n in "qkv")
    d = c // num_heads
    out = np.zeros_like(q)
    for head in range(num_heads):
        sl = slice(head * d, (head + 1) * d)
        logits = q[..., sl] @ k[..., sl].transpose(0, 2, 1) / np.sqrt(d)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        out[..., sl] = weights @ v[..., sl]
    ref = xn.reshape(b, h * w, c) + out @ p["proj_out"]["kernel"] + p["proj_out"]["bias"]
    np.testing.assert_allclose(block.apply(variables, x), ref.reshape(b, h, w, c), atol=1e-4)


def test_attention_is_identity_at_init(tiny_setup):
    variables = {"params": tiny_setup.variables["params"]["mid_attn"]}  # flax-initialised
    x = jax.random.normal(jax.random.key(0), (1, 4, 4, 64))
    np.testing.assert_array_equal(jax.jit(AttnBlock(num_heads=2).apply)(variables, x), x)


@pytest.mark.parametrize(
    "overrides",
    [
        {"resblock_updown": True},
        {"conv_resample": False},
        {"num_heads": 4, "ch_mult": (1, 2, 2), "image_size": 16},
        {"out_channels": 2},
    ],
    ids=["resblock_updown", "no_conv_resample", "multihead_3_levels", "out_channels_2"],
)
def test_architecture_variants_run(overrides):
    config, overrides = tiny.get_config(), dict(overrides)
    if "image_size" in overrides:
        config.data.image_size = overrides.pop("image_size")
    for key, value in overrides.items():
        config.model[key] = value
    model = create_model(config)
    x, t = tiny_inputs(model.config, batch=2)
    params = random_variables(model, x, t)
    out = jax.jit(model.apply)(params, x, t)
    assert out.shape == (*x.shape[:3], model.config.output_channels)
    assert np.isfinite(np.asarray(out)).all() and float(jnp.abs(out).max()) > 1e-3
    names = set(params["params"])
    if overrides.get("conv_resample") is False:  # parameter-free resampling
        assert not any("sample" in name for name in names)
    if overrides.get("resblock_updown"):  # resampling ResNet blocks, with their time input
        assert "temb_proj" in params["params"]["down_0_downsample"]
        assert "temb_proj" in params["params"]["up_1_upsample"]


def test_class_conditioning():
    model = UNet(tiny_model_config(num_classes=10, dropout=0.0))
    x, t = tiny_inputs(model.config, batch=2)
    params = random_variables(model, x, t)
    assert params["params"]["class_embed"]["embedding"].shape == (11, 4 * 32)  # + null class
    apply = jax.jit(model.apply)
    out_a = apply(params, x, t, jnp.array([0, 1]))
    out_b = apply(params, x, t, jnp.array([2, 3]))
    out_null = apply(params, x, t, jnp.array([10, 10]))
    assert float(jnp.abs(out_a - out_b).max()) > 1e-3
    assert_f32_close(apply(params, x, t), out_null)  # y=None: the null class
    with pytest.raises(ValueError, match="num_classes"):
        jax.eval_shape(UNet(tiny_model_config()).init, jax.random.key(0), x, t, jnp.array([0, 1]))


def test_bad_inputs_raise(tiny_setup):
    s = tiny_setup
    with pytest.raises(ValueError, match="x must have shape"):
        s.apply(s.variables, s.x[:, :4], s.t)
    with pytest.raises(ValueError, match="t must have shape"):
        s.apply(s.variables, s.x, s.t[:2])


def test_forward_flops_match_an_independent_count():
    """XLA's count vs multiply-adds of every conv / dense (only taps on real pixels, as
    XLA counts them for SAME padding) plus the two attention matmuls, times two."""
    config = tiny.get_config()
    model = create_model(config)
    cfg = model.config
    variables = abstract_variables(model, 1)
    x = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    _, state = jax.eval_shape(
        lambda v, x, t: model.apply(v, x, t, capture_intermediates=True, mutable=["intermediates"]),
        variables,
        x,
        t,
    )
    outputs = flax.traverse_util.flatten_dict(state["intermediates"])
    params = flax.traverse_util.flatten_dict(variables["params"])
    count = 0
    for path, (out,) in outputs.items():
        module = path[:-1]
        if len(module) == 1 and "attn" in module[0]:
            _, h, w, c = out.shape
            count += 2 * 2 * (h * w) ** 2 * c  # q kᵀ and weights · v
        kernel = params.get((*module, "kernel"))
        if kernel is None:
            continue
        if kernel.ndim == 2:  # dense / 1×1
            count += 2 * math.prod(out.shape) * kernel.shape[0]
            continue
        stride = 2 if len(module) > 1 and "downsample" in module[-2] else 1
        n_out = out.shape[1]
        n_in, pad_lo = n_out * stride, (1 if stride == 1 else 0)
        taps = sum(0 <= o * stride - pad_lo + j < n_in for o in range(n_out) for j in range(3))
        count += 2 * taps**2 * kernel.shape[2] * kernel.shape[3]
    flops = forward_flops(config, batch_size=1)
    # The remainder is elementwise work (GroupNorm, SiLU, softmax, additions): a few percent.
    assert count <= flops <= 1.1 * count, (flops, count)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("resblock_updown", [False, True])
def test_validation_sees_every_group_norm(resblock_updown):
    """The widths that validation checks are exactly those of the network's GroupNorms."""
    config = cifar10.get_config()
    config.model.resblock_updown = resblock_updown
    model = create_model(config)
    params = flax.traverse_util.flatten_dict(abstract_variables(model)["params"])
    actual = sorted(leaf.shape[0] for path, leaf in params.items() if path[-1] == "scale")
    assert actual == sorted(c for c, _ in model.config.norm_widths())


def test_create_model_accepts_model_config():
    cfg = tiny_model_config()
    assert create_model(cfg).config is cfg
    assert cfg.output_channels == 1 and cfg.resolutions == (8, 4)
    hash(cfg)  # frozen and hashable: usable as a static argument


@pytest.mark.parametrize(
    "group, field, value",
    [
        ("data", "image_size", 10),  # with ch_mult (1, 2, 2): not divisible by 4
        ("model", "attn_resolutions", (3,)),
        ("model", "ch", 80),  # 80 and 160 channels, 32 groups
        ("model", "num_heads", 3),
        ("model", "dtype", "float16"),
        ("model", "dropout", 1.0),
        ("model", "ch_mult", ()),
        ("model", "num_res_blocks", 0),
        ("model", "num_classes", -1),
        ("model", "out_channels", 0),
        ("model", "unknown_field", 1),
    ],
)
def test_bad_config_raises_value_error_naming_the_field(group, field, value):
    config = tiny.get_config()
    if field == "image_size":
        config.model.ch_mult = (1, 2, 2)  # needs image_size divisible by 4
    if field == "unknown_field":
        with config.unlocked():
            config.model[field] = value
    else:
        config[group][field] = value
    with pytest.raises(ValueError, match=field):
        create_model(config)
