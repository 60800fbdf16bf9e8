"""Diffusers' `UNet2DModel` and `DDPMScheduler` configs as this package's config groups.

    model, image_size, channels = model_group(unet_config, where="…/config.json")
    diffusion = diffusion_group(scheduler_config, where="…/scheduler_config.json")

Ho et al.'s U-Net in diffusers is `UNet2DModel` with `DownBlock2D`/`AttnDownBlock2D` and
`UpBlock2D`/`AttnUpBlock2D` blocks, Ho's timestep embedding (`flip_sin_to_cos=False,
freq_shift=1`: [sin, cos] at frequencies exp(-ln(10⁴)·i/(half-1))), GroupNorm eps 1e-6 and the
TensorFlow-style stride-2 padding (`downsample_padding=0`: pad 0 before, 1 after, as our
'SAME'). A field set to anything ddpm_jax's U-Net (`ddpm_jax.models`) cannot compute exactly
is refused with a `ConfigError` that names it: nothing is imported half-way. A field absent
from the file takes diffusers' default, as diffusers itself would read the file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ddpm_jax.errors import ConfigError
from ddpm_jax.models.config import ModelConfig, num_groups

# UNet2DModel.__init__'s defaults (diffusers 0.42), for fields a config.json leaves out.
UNET_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,  # only read by time_embedding_type="learned".
}

# field -> (the values ddpm_jax computes exactly, what they mean in ddpm_jax's U-Net).
UNET_REQUIRED: dict[str, tuple[tuple[Any, ...], str]] = {
    "center_input_sample": ((False,), "inputs are used as given, in [-1, 1]"),
    "time_embedding_type": (("positional",), "the sinusoidal timestep embedding"),
    "flip_sin_to_cos": ((False,), "Ho et al.'s [sin, cos] order of the timestep embedding"),
    "freq_shift": ((1,), "Ho et al.'s frequencies exp(-ln(10^4) i / (half - 1))"),
    "act_fn": (("silu", "swish"), "SiLU activations"),
    "mid_block_type": (("UNetMidBlock2D",), "the middle ResNet-attention-ResNet block"),
    "mid_block_scale_factor": ((1,), "unscaled residual connections"),
    "resnet_time_scale_shift": (("default",), "the timestep embedding added before the norm"),
    "add_attention": ((True,), "an attention layer in the middle block"),
    "class_embed_type": ((None,), "unconditional models"),
    "num_class_embeds": ((None,), "unconditional models"),
    "downsample_type": (("conv",), "stride-2 3x3 convolutions between levels"),
    "upsample_type": (("conv",), "nearest-neighbour 2x and a 3x3 convolution"),
}
DOWN_BLOCKS = {"DownBlock2D": False, "AttnDownBlock2D": True}  # type -> has attention
UP_BLOCKS = {"UpBlock2D": False, "AttnUpBlock2D": True}
NORM_EPS = 1e-6  # ddpm_jax's GroupNorm epsilon (`models.layers.GroupNorm`).

# DDPMScheduler.__init__'s defaults (diffusers 0.42).
SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "variance_type": "fixed_small",
    "clip_sample": True,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "clip_sample_range": 1.0,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}
BETA_SCHEDULES = {  # diffusers -> ddpm_jax.schedules (the same betas, computed in float64)
    "linear": "linear",
    "scaled_linear": "quad",
    "squaredcos_cap_v2": "cosine",
    "sigmoid": "sigmoid",
}
VARIANCES = {  # the _log variants are the same distributions, parameterised by log σ².
    "fixed_small": "fixedsmall",
    "fixed_small_log": "fixedsmall",
    "fixed_large": "fixedlarge",
    "fixed_large_log": "fixedlarge",
}
PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
# How a chain with fewer steps picks them in diffusers: a sampling choice, not the model's.
SCHEDULER_SAMPLING_ONLY = ("timestep_spacing", "steps_offset")


def _refuse(where: str, field: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"{where}: {field} = {value!r}: {why}; the model is not imported.")


def _merged(given: Mapping[str, Any], defaults: Mapping[str, Any], where: str) -> dict[str, Any]:
    """`defaults` updated with `given`; a field diffusers does not define must be null."""
    unknown = sorted(k for k in given if not k.startswith("_") and k not in defaults)
    for k in unknown:
        if given[k] is not None:
            raise _refuse(where, k, given[k], "a field ddpm_jax does not know how to import")
    return {**defaults, **{k: v for k, v in given.items() if k in defaults}}


def _class(given: Mapping[str, Any], where: str, expected: str) -> None:
    name = given.get("_class_name", expected)
    if name != expected:
        raise _refuse(where, "_class_name", name, f"only diffusers' {expected} can be imported")


def model_group(unet: Mapping[str, Any], where: str) -> tuple[dict[str, Any], int, int]:
    """`config.model` fields, image size and channels of a `UNet2DModel` config.json.

    Args:
      unet: the parsed config.json of the U-Net.
      where: the file's path, for messages.

    Returns:
      (model fields, data.image_size, data.channels); the model fields are those of
      `ModelConfig` without image size and channels, checked by building one.

    Raises:
      ConfigError: naming the first field whose value ddpm_jax's U-Net cannot express.
    """
    _class(unet, where, "UNet2DModel")
    cfg = _merged(unet, UNET_DEFAULTS, where)
    for field, (allowed, meaning) in UNET_REQUIRED.items():
        if cfg[field] not in allowed:
            ok = " or ".join(repr(a) for a in allowed)
            raise _refuse(where, field, cfg[field], f"ddpm_jax's U-Net has {meaning} ({ok})")
    if not math.isclose(float(cfg["norm_eps"]), NORM_EPS, rel_tol=1e-6):
        raise _refuse(where, "norm_eps", cfg["norm_eps"], "ddpm_jax's GroupNorm uses eps 1e-6")

    widths = _int_list(cfg["block_out_channels"], "block_out_channels", where)
    levels = len(widths)
    down = _blocks(cfg["down_block_types"], DOWN_BLOCKS, "down_block_types", levels, where)
    up = _blocks(cfg["up_block_types"], UP_BLOCKS, "up_block_types", levels, where)
    if up[::-1] != down:
        raise _refuse(
            where,
            "up_block_types",
            cfg["up_block_types"],
            f"attention must be at the same levels as in down_block_types "
            f"{cfg['down_block_types']} (ddpm_jax's attn_resolutions)",
        )
    ch = widths[0]
    if any(w % ch for w in widths):
        raise _refuse(
            where,
            "block_out_channels",
            widths,
            f"every width must be a multiple of the first, {ch} (model.ch_mult)",
        )
    if cfg["time_embedding_dim"] not in (None, 4 * ch):
        raise _refuse(
            where,
            "time_embedding_dim",
            cfg["time_embedding_dim"],
            f"ddpm_jax's timestep MLP has 4 * block_out_channels[0] = {4 * ch} features",
        )
    if levels > 1 and cfg["downsample_padding"] != 0:
        raise _refuse(
            where,
            "downsample_padding",
            cfg["downsample_padding"],
            "ddpm_jax pads the stride-2 convolution as TensorFlow's 'SAME' (0 before, "
            "1 after), which is diffusers' downsample_padding=0; 1 pads both sides",
        )
    size = _image_size(cfg["sample_size"], where)
    channels = _positive_int(cfg["in_channels"], "in_channels", where)
    if cfg["out_channels"] != channels:
        raise _refuse(
            where,
            "out_channels",
            cfg["out_channels"],
            f"ddpm_jax imports networks whose output has the input's {channels} "
            "channels (a prediction of x_0, ε or v; no learned variance)",
        )
    attn_widths = [w for w, a in zip(widths, down, strict=True) if a] + [widths[-1]]
    groups = _positive_int(cfg["norm_num_groups"], "norm_num_groups", where)
    if cfg["attn_norm_num_groups"] not in (None, groups):
        raise _refuse(
            where,
            "attn_norm_num_groups",
            cfg["attn_norm_num_groups"],
            f"ddpm_jax's middle attention normalises as its other layers, with "
            f"norm_num_groups = {groups} groups",
        )
    model = {
        "ch": ch,
        "ch_mult": tuple(w // ch for w in widths),
        "num_res_blocks": _positive_int(cfg["layers_per_block"], "layers_per_block", where),
        "attn_resolutions": tuple(size // 2**i for i, a in enumerate(down) if a),
        "dropout": float(cfg["dropout"]),
        "num_heads": _num_heads(cfg["attention_head_dim"], attn_widths, where),
        "resblock_updown": False,
        "conv_resample": True,
        "out_channels": None,
        "num_classes": 0,
        "norm_groups": None,
    }
    from ddpm_jax.experiment import defaults  # the fields this import does not set.

    try:
        default_groups = ModelConfig.from_dict(defaults.group("model", **model), size, channels)
    except ConfigError as e:
        raise ConfigError(f"{where}: the U-Net it describes does not build: {e}") from e
    # diffusers normalises every layer with norm_num_groups groups; ddpm_jax's own rule
    # (min(32, C // 2)) agrees for C >= 64 with 32 groups, as in all of Ho et al.'s models.
    if any(num_groups(c) != groups for c, _ in default_groups.norm_widths()):
        model["norm_groups"] = groups
        try:
            ModelConfig.from_dict(defaults.group("model", **model), size, channels)
        except ConfigError as e:
            raise _refuse(where, "norm_num_groups", groups, str(e)) from e
    return model, size, channels


def diffusion_group(scheduler: Mapping[str, Any], where: str) -> dict[str, Any]:
    """`config.diffusion` fields of a `DDPMScheduler` scheduler_config.json.

    Returns:
      {"schedule", "num_timesteps", "beta_start", "beta_end", "parameterization", "variance",
      "clip_denoised"}.

    Raises:
      ConfigError: naming the first field that ddpm_jax's forward and reverse processes
        cannot express (trained betas, a learned variance, thresholding, zero-SNR rescaling).
    """
    _class(scheduler, where, "DDPMScheduler")
    cfg = _merged(scheduler, SCHEDULER_DEFAULTS, where)
    if cfg["trained_betas"] is not None:
        raise _refuse(
            where,
            "trained_betas",
            "[...]",
            f"ddpm_jax computes its betas from a named schedule ({', '.join(BETA_SCHEDULES)})",
        )
    checks = (
        ("beta_schedule", BETA_SCHEDULES),
        ("variance_type", VARIANCES),
        ("prediction_type", PREDICTIONS),
    )
    for field, table in checks:
        if cfg[field] not in table:
            raise _refuse(where, field, cfg[field], f"ddpm_jax can import {', '.join(table)}")
    for field in ("thresholding", "rescale_betas_zero_snr"):
        if cfg[field] is not False:
            raise _refuse(where, field, cfg[field], "ddpm_jax has no such reverse process")
    clip = cfg["clip_sample"]
    if not isinstance(clip, bool):
        raise _refuse(where, "clip_sample", clip, "must be true or false")
    if clip and float(cfg["clip_sample_range"]) != 1.0:
        raise _refuse(
            where,
            "clip_sample_range",
            cfg["clip_sample_range"],
            "ddpm_jax clips the predicted x_0 to [-1, 1] (diffusion.clip_denoised)",
        )
    return {
        "schedule": BETA_SCHEDULES[cfg["beta_schedule"]],
        "num_timesteps": _positive_int(cfg["num_train_timesteps"], "num_train_timesteps", where),
        "beta_start": float(cfg["beta_start"]),
        "beta_end": float(cfg["beta_end"]),
        "parameterization": PREDICTIONS[cfg["prediction_type"]],
        "variance": VARIANCES[cfg["variance_type"]],
        "clip_denoised": clip,
    }


def _int_list(value: Any, field: str, where: str) -> list[int]:
    if not isinstance(value, list | tuple) or not value:
        raise _refuse(where, field, value, "must be a non-empty list of integers")
    return [_positive_int(v, field, where) for v in value]


def _positive_int(value: Any, field: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _refuse(where, field, value, "must be an integer >= 1")
    return value


def _blocks(types: Any, known: Mapping[str, bool], field: str, n: int, where: str) -> list[bool]:
    """Whether each block has attention; diffusers drops a "UNetRes" prefix as well."""
    if not isinstance(types, list | tuple) or len(types) != n:
        raise _refuse(
            where, field, types, f"must list one block per entry of block_out_channels ({n})"
        )
    names = [t[7:] if isinstance(t, str) and t.startswith("UNetRes") else t for t in types]
    for t, name in zip(types, names, strict=True):
        if name not in known:
            raise _refuse(
                where, field, types, f"{t!r} is not one of Ho et al.'s blocks ({', '.join(known)})"
            )
    return [known[name] for name in names]


def _image_size(value: Any, where: str) -> int:
    if isinstance(value, list | tuple):
        if len(value) != 2 or value[0] != value[1]:
            raise _refuse(where, "sample_size", value, "ddpm_jax's images are square")
        value = value[0]
    return _positive_int(value, "sample_size", where)


def _num_heads(head_dim: Any, widths: list[int], where: str) -> int:
    """One head count for every attention layer: diffusers has width // attention_head_dim."""
    if head_dim is None:  # diffusers: one head of all the channels (Ho et al.).
        return 1
    head_dim = _positive_int(head_dim, "attention_head_dim", where)
    if any(w % head_dim for w in widths):
        raise _refuse(
            where,
            "attention_head_dim",
            head_dim,
            f"must divide the width of every attention layer {sorted(set(widths))}",
        )
    heads = {w // head_dim for w in widths}
    if len(heads) != 1:
        raise _refuse(
            where,
            "attention_head_dim",
            head_dim,
            f"gives {sorted(heads)} heads in the attention layers of widths "
            f"{sorted(set(widths))} (the middle one included); ddpm_jax has one "
            "model.num_heads for all of them",
        )
    return heads.pop()
