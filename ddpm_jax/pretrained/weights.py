"""Diffusers' `UNet2DModel` tensors as the parameter tree of ddpm_jax's U-Net.

    tensors = read_safetensors(path)                      # {name: np.ndarray}, no torch
    params = convert(tensors, abstract_params, levels)    # the `UNet`'s "params" tree

The mapping goes from each leaf of our tree (`ddpm_jax.models.UNet`'s names) to the diffusers
tensor that fills it, so that every leaf is filled once and every tensor used once; anything
left over, missing or of another shape is an error naming the tensors. Names:

    conv_in, conv_out                      conv_in, conv_out
    norm_out                               conv_norm_out
    temb/dense0, temb/dense1               time_embedding.linear_1, .linear_2
    down_{l}_block_{i}                     down_blocks.{l}.resnets.{i}
    down_{l}_attn_{i}                      down_blocks.{l}.attentions.{i}
    down_{l}_downsample/conv               down_blocks.{l}.downsamplers.0.conv
    mid_block_0, mid_attn, mid_block_1     mid_block.resnets.0, .attentions.0, .resnets.1
    up_{l}_block_{i}, up_{l}_attn_{i}      up_blocks.{L-1-l}.resnets.{i}, .attentions.{i}
    up_{l}_upsample/conv                   up_blocks.{L-1-l}.upsamplers.0.conv
    ResNet norm0, conv0, temb_proj,        norm1, conv1, time_emb_proj,
           norm1, conv1, skip              norm2, conv2, conv_shortcut (a 1×1 conv)
    attention norm, q, k, v, proj_out      group_norm, to_q, to_k, to_v, to_out.0
                                           (query, key, value, proj_attn before diffusers 0.15)

Layouts: a 3×3 conv weight [O, I, 3, 3] becomes our HWIO kernel [3, 3, I, O]; a Linear
weight [O, I] and the 1×1 conv shortcut [O, I, 1, 1] become a Dense kernel [I, O]; a
GroupNorm weight is our `scale`. Every array becomes float32.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from ddpm_jax.errors import DataError

PyTree = Any

# diffusers' names of an attention layer's tensors before 0.15, and today's.
LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
RESNET = {
    "norm0": "norm1",
    "conv0": "conv1",
    "temb_proj": "time_emb_proj",
    "norm1": "norm2",
    "conv1": "conv2",
    "skip": "conv_shortcut",
}
ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
LINEAR = {"temb_proj", "q", "k", "v", "proj_out", "dense0", "dense1"}
_BLOCK = re.compile(r"(down|up)_(\d+)_(block|attn)_(\d+)$")
_RESAMPLE = re.compile(r"(down|up)_(\d+)_(downsample|upsample)$")
_SHOWN = 6


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file as numpy arrays (`safetensors.numpy`, no torch).

    Raises:
      DataError: the file is not a readable safetensors file.
    """
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own SafetensorError, OSError, ...
        raise DataError(f"{path} cannot be read as safetensors: {e}") from e


def modern_names(tensors: Mapping[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """The tensors with old attention names (`attentions.N.query.weight`, ...) renamed.

    Raises:
      DataError: a tensor is present under both its old and its new name.
    """
    out: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        parts = name.split(".")  # ...attentions.<n>.<layer>.<weight|bias>
        if len(parts) >= 4 and parts[-4] == "attentions" and parts[-2] in LEGACY_ATTENTION:
            parts[-2] = LEGACY_ATTENTION[parts[-2]]
        new = ".".join(parts)
        if new in out or (new != name and new in tensors):
            raise DataError(f"{where} holds {new} twice (also under the old name {name}).")
        out[new] = value
    return out


def diffusers_name(path: tuple[str, ...], num_levels: int) -> tuple[str, str]:
    """The diffusers tensor of one leaf of our tree, and how to lay it out.

    Args:
      path: the leaf's path in our params tree, e.g. ("down_1_attn_0", "q", "kernel").
      num_levels: levels of the U-Net (len(ch_mult)): our up level l is diffusers' up block
        num_levels - 1 - l.

    Returns:
      (name, layout): layout is "conv" (OIHW -> HWIO), "linear" ([O, I] -> [I, O]),
      "conv1x1" ([O, I, 1, 1] -> [I, O]) or "vector".
    """
    *modules, leaf = path
    tensor = {"kernel": "weight", "scale": "weight", "bias": "bias"}.get(leaf)
    if tensor is None or not modules:
        raise ValueError(f"no diffusers name for parameter {'/'.join(path)}")
    top, layer = modules[0], modules[-1]
    fixed = {"conv_in": "conv_in", "conv_out": "conv_out", "norm_out": "conv_norm_out"}
    if top in fixed and len(modules) == 1:
        prefix = fixed[top]
    elif top == "temb" and len(modules) == 2 and layer in ("dense0", "dense1"):
        prefix = f"time_embedding.linear_{int(layer[-1]) + 1}"
    elif top in ("mid_block_0", "mid_block_1") and len(modules) == 2 and layer in RESNET:
        prefix = f"mid_block.resnets.{top[-1]}.{RESNET[layer]}"
    elif top == "mid_attn" and len(modules) == 2 and layer in ATTENTION:
        prefix = f"mid_block.attentions.0.{ATTENTION[layer]}"
    elif (m := _BLOCK.match(top)) and len(modules) == 2:
        way, level, kind, i = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        block = level if way == "down" else num_levels - 1 - level
        names, group = (RESNET, "resnets") if kind == "block" else (ATTENTION, "attentions")
        if layer not in names:
            raise ValueError(f"no diffusers name for parameter {'/'.join(path)}")
        prefix = f"{way}_blocks.{block}.{group}.{i}.{names[layer]}"
    elif (m := _RESAMPLE.match(top)) and modules[1:] == ["conv"]:
        way, level = m.group(1), int(m.group(2))
        block = level if way == "down" else num_levels - 1 - level
        prefix = f"{way}_blocks.{block}.{m.group(3)}rs.0.conv"
    else:
        raise ValueError(f"no diffusers name for parameter {'/'.join(path)}")
    if leaf != "kernel":
        layout = "vector"
    elif layer == "skip":
        layout = "conv1x1"
    elif layer in LINEAR:
        layout = "linear"
    else:
        layout = "conv"
    return f"{prefix}.{tensor}", layout


def _laid_out(shape: tuple[int, ...], layout: str) -> tuple[int, ...] | None:
    """The shape a source tensor of `shape` has in our layout (None: not of that kind)."""
    if layout == "conv" and len(shape) == 4:
        return (shape[2], shape[3], shape[1], shape[0])
    if layout == "conv1x1" and len(shape) == 4 and shape[2:] == (1, 1):
        return (shape[1], shape[0])
    if layout == "linear" and len(shape) == 2:
        return (shape[1], shape[0])
    if layout == "vector" and len(shape) == 1:
        return shape
    return None


def _lay_out(x: np.ndarray, layout: str) -> np.ndarray:
    if layout == "conv":
        x = np.transpose(x, (2, 3, 1, 0))
    elif layout == "conv1x1":
        x = x[:, :, 0, 0].T
    elif layout == "linear":
        x = x.T
    return np.ascontiguousarray(x, dtype=np.float32)


def plan(
    shapes: Mapping[str, tuple[int, ...]], abstract: PyTree, num_levels: int, where: str
) -> dict[tuple[str, ...], tuple[str, str]]:
    """Which source tensor fills each leaf of `abstract`, checked on shapes alone.

    Args:
      shapes: {diffusers name: shape} (modern names, see `modern_names`).
      abstract: our params tree (nested dicts of arrays or `jax.ShapeDtypeStruct`s).
      num_levels: levels of the U-Net.
      where: the weights file, for messages.

    Returns:
      {our leaf path: (diffusers name, layout)}.

    Raises:
      DataError: naming the leaves with no tensor, the tensors no leaf uses and those of
        another shape, if any.
    """
    leaves = traverse_util.flatten_dict(abstract)
    mapping, missing, wrong = {}, [], []
    for path, leaf in sorted(leaves.items()):
        name, layout = diffusers_name(path, num_levels)
        if name not in shapes:
            missing.append(name)
            continue
        got = _laid_out(tuple(shapes[name]), layout)
        if got != tuple(leaf.shape):
            wrong.append(f"{name} {tuple(shapes[name])} (for {'/'.join(path)} {leaf.shape})")
        mapping[path] = (name, layout)
    used = {name for name, _ in mapping.values()}
    if len(used) != len(mapping):  # `diffusers_name` is one-to-one: a bug otherwise.
        raise AssertionError("two parameters map to one diffusers tensor")
    extra = sorted(set(shapes) - used)
    if missing or extra or wrong:
        parts = []
        for what, names in (
            ("missing (the config.json describes a larger network)", missing),
            ("left over (the network of config.json has no place for them)", extra),
            ("of another shape than the config.json's network needs", wrong),
        ):
            if names:
                more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
                parts.append(f"{len(names)} {what}: {', '.join(names[:_SHOWN])}{more}")
        raise DataError(
            f"{where} does not fit its config.json: tensors {'; '.join(parts)}. Nothing was "
            "imported; check that the weights and config.json come from the same repository."
        )
    return mapping


def convert(
    tensors: Mapping[str, np.ndarray], abstract: PyTree, num_levels: int, where: str
) -> PyTree:
    """Our params tree (float32 numpy arrays) from diffusers' tensors.

    Args:
      tensors: {name: array} of the U-Net, old or new attention names.
      abstract: our params tree, for names and shapes (e.g. `jax.eval_shape` of the init).
      num_levels: levels of the U-Net (len(ch_mult)).
      where: the weights file, for messages.

    Raises:
      DataError: a tensor that is missing, left over, of another shape, or not floating-point.
    """
    tensors = modern_names(tensors, where)
    for name, x in tensors.items():
        if x.dtype.kind != "f" and x.dtype.name != "bfloat16":
            raise DataError(f"{where}: tensor {name} has dtype {x.dtype}, not floating-point.")
    mapping = plan({k: v.shape for k, v in tensors.items()}, abstract, num_levels, where)
    flat = {path: _lay_out(tensors[name], layout) for path, (name, layout) in mapping.items()}
    return traverse_util.unflatten_dict(flat)
