"""`ModelConfig`: the typed, frozen, validated configuration of the U-Net.

The ConfigDict stops here: `ModelConfig.from_config(config)` reads `config.model` plus
`config.data.image_size` / `config.data.channels`, checks every field before anything is
traced or compiled, and the network only ever sees the resulting frozen dataclass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from ddpm_jax import fields
from ddpm_jax.errors import ConfigError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Group normalization uses Ho et al.'s 32 groups, but keeps at least two channels per group
# (min(32, C // 2) groups): with one channel per group the per-channel time-embedding shift
# added before a block's second norm would be normalised away exactly (C = 32, tiny models).
# Widths of 64 and above must therefore be multiples of 32; ch a multiple of 32 always works.
MAX_GROUPS = 32


def num_groups(channels: int) -> int:
    """Number of GroupNorm groups for `channels` channels: max(1, min(32, channels // 2))."""
    return max(1, min(MAX_GROUPS, channels // 2))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of Ho et al.'s U-Net x̂_θ(x_t, t).

    Attributes:
      image_size: height = width of the input images, in pixels.
      in_channels: channels of the input images (e.g. 3 for RGB).
      ch: base channel count; level i has ch * ch_mult[i] channels.
      ch_mult: channel multiplier per resolution level (level i is image_size / 2**i).
      num_res_blocks: ResNet blocks per level on the way down (num_res_blocks + 1 going up).
      attn_resolutions: spatial sizes (in pixels) at which self-attention follows each block.
      dropout: dropout rate inside ResNet blocks (active only with `train=True`).
      num_heads: attention heads (1 = Ho et al.'s single-head attention).
      resblock_updown: resample with ResNet blocks (BigGAN style) instead of plain layers.
      conv_resample: plain resampling layers carry a 3×3 convolution (Ho et al.: True).
      out_channels: output channels; None means in_channels. A learned variance doubles it.
      num_classes: 0 = unconditional; K > 0 adds a class embedding with K + 1 entries, the
        last (id K) being the null class used for classifier-free guidance.
      dtype: computation dtype name, "float32" or "bfloat16" (parameters stay float32).
      remat: rematerialise each ResNet / attention block in the backward pass.
      norm_groups: None: each GroupNorm on C channels has `num_groups(C)` groups; an int:
        every GroupNorm has that many (as diffusers' `norm_num_groups`, for imported models).
    """

    image_size: int
    in_channels: int
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    dropout: float
    num_heads: int
    resblock_updown: bool
    conv_resample: bool
    out_channels: int | None
    num_classes: int
    dtype: str
    remat: bool
    norm_groups: int | None

    def __post_init__(self):
        # Normalise sequences to tuples so the config stays hashable (a static jit argument).
        object.__setattr__(self, "ch_mult", fields.int_tuple("model.ch_mult", self.ch_mult, 1))
        object.__setattr__(
            self,
            "attn_resolutions",
            fields.int_tuple("model.attn_resolutions", self.attn_resolutions, 1, nonempty=False),
        )
        self.validate()

    @classmethod
    def from_config(cls, config: Any) -> ModelConfig:
        """Builds the model config from a full experiment ConfigDict (or mapping).

        Args:
          config: an object with `model` (the fields above, minus image_size/in_channels)
            and `data` (`image_size`, `channels`) groups, e.g. `defaults.get_config()`.

        Raises:
          ConfigError: naming the offending field, if a field is missing or unknown or the
            architecture is inconsistent.
        """
        data = fields.group_values(config, "data")
        return cls.from_dict(
            fields.group_values(config, "model"), data.get("image_size"), data.get("channels")
        )

    @classmethod
    def from_dict(cls, model: Mapping[str, Any], image_size: int, channels: int) -> ModelConfig:
        """Builds from the fields of `config.model` (all required) and the data's image size
        and channels."""
        return fields.view_of_group(
            cls, "model", model, image_size=image_size, in_channels=channels
        )

    @property
    def output_channels(self) -> int:
        """Channels of the network output (`out_channels`, or `in_channels` when None)."""
        return self.in_channels if self.out_channels is None else self.out_channels

    @property
    def compute_dtype(self) -> Any:
        """The jnp dtype of activations and matmuls."""
        return DTYPES[self.dtype]

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Spatial size at each level, from image_size down."""
        return tuple(self.image_size // 2**i for i in range(len(self.ch_mult)))

    def norm_widths(self) -> list[tuple[int, str]]:
        """Input widths of every GroupNorm in the network, with a description of each."""
        widths = []
        chans = [self.ch * m for m in self.ch_mult]
        skips = [self.ch]  # channels of every tensor pushed on the skip stack
        c = self.ch
        attn = [r in self.attn_resolutions for r in self.resolutions]
        for level, c_out in enumerate(chans):
            for _ in range(self.num_res_blocks):
                widths += [(c, f"down level {level}")] + [(c_out, f"down level {level}")] * (
                    1 + attn[level]
                )
                c = c_out
                skips.append(c)
            if level != len(chans) - 1:
                if self.resblock_updown:
                    widths += [(c, f"down level {level}")] * 2
                skips.append(c)
        widths += [(c, "middle")] * 5  # two ResNet blocks and an attention block
        for level in reversed(range(len(chans))):
            for _ in range(self.num_res_blocks + 1):
                c_in = c + skips.pop()
                c = chans[level]
                widths += [(c_in, f"up level {level} (concatenated skip)")]
                widths += [(c, f"up level {level}")] * (1 + attn[level])
            if level != 0 and self.resblock_updown:
                widths += [(c, f"up level {level}")] * 2
        widths.append((c, "output"))
        return widths

    def validate(self) -> None:
        """Raises `ConfigError`, naming the field, for any inconsistent setting."""
        fields.integer("data.image_size", self.image_size, 1)
        fields.integer("data.channels", self.in_channels, 1)
        fields.integer("model.ch", self.ch, 1)
        fields.integer("model.num_res_blocks", self.num_res_blocks, 1)
        fields.integer("model.num_heads", self.num_heads, 1)
        fields.integer("model.num_classes", self.num_classes, 0, hint=" 0: unconditional.")
        fields.integer("model.out_channels", self.out_channels, 1, none_ok=True)
        fields.number("model.dropout", self.dropout, 0.0, 1.0, high_open=True)
        fields.choice("model.dtype", self.dtype, tuple(DTYPES))
        fields.boolean("model.resblock_updown", self.resblock_updown)
        fields.boolean("model.conv_resample", self.conv_resample)
        fields.boolean("model.remat", self.remat)
        fields.integer("model.norm_groups", self.norm_groups, 1, none_ok=True)
        factor = 2 ** (len(self.ch_mult) - 1)
        if self.image_size % factor:
            raise ConfigError(
                f"config.data.image_size = {self.image_size} must be divisible by "
                f"2**(len(ch_mult)-1) = {factor} for config.model.ch_mult = {self.ch_mult}: "
                "change image_size or ch_mult."
            )
        bad = sorted(set(self.attn_resolutions) - set(self.resolutions))
        if bad:
            raise ConfigError(
                f"config.model.attn_resolutions = {self.attn_resolutions} contains {bad}, which "
                f"never occur: the U-Net's resolutions are {self.resolutions}."
            )
        for c, where in self.norm_widths():
            if self.norm_groups is not None:
                if c % self.norm_groups:
                    raise ConfigError(
                        f"config.model.norm_groups = {self.norm_groups} does not divide the {c} "
                        f"channels at {where} (ch = {self.ch}, ch_mult = {self.ch_mult}): use "
                        "a divisor of every width, or None for min(32, channels // 2) groups."
                    )
            elif c % num_groups(c):
                raise ConfigError(
                    f"config.model.ch = {self.ch} with ch_mult = {self.ch_mult} gives {c} "
                    f"channels at {where}, not divisible by its {num_groups(c)} GroupNorm "
                    "groups (min(32, channels // 2)): use a ch that is a multiple of 32."
                )
        for level, res in enumerate(self.resolutions):
            c = self.ch * self.ch_mult[level]
            if res in self.attn_resolutions and c % self.num_heads:
                raise ConfigError(
                    f"config.model.num_heads = {self.num_heads} does not divide the {c} "
                    f"channels of the attention layers at resolution {res}."
                )
