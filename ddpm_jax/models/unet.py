"""Ho et al.'s U-Net x̂_θ(x_t, t) (Denoising Diffusion Probabilistic Models, 2020, App. B).

conv_in -> down path (num_res_blocks ResNet blocks per level, attention at the configured
resolutions, every output pushed on a skip stack, downsampling between levels) -> middle
(ResNet, attention, ResNet) -> up path (num_res_blocks + 1 blocks per level, each taking
the concatenation with one popped skip, upsampling between levels) -> GN -> SiLU -> conv_out
(zero-initialised, so the network outputs exactly zero at initialisation).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.models.attention import AttnBlock
from ddpm_jax.models.config import ModelConfig
from ddpm_jax.models.embedding import TimestepEmbed
from ddpm_jax.models.layers import Downsample, GroupNorm, ResnetBlock, Upsample, conv3x3


class UNet(nn.Module):
    """The denoiser network; see `ModelConfig` for the architecture's settings.

    Attributes:
      config: a validated `ModelConfig` (build it with `ModelConfig.from_config`).
    """

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.typing.ArrayLike,
        y: jax.typing.ArrayLike | None = None,
        *,
        train: bool = False,
    ) -> jax.Array:
        """Maps noisy images x_t and their timesteps to the network's prediction (x̂_0).

        Args:
          x: noisy images x_t, float [B, H, W, C] with H = W = image_size, C = in_channels.
          t: integer timesteps [B] (or a scalar, broadcast to [B]).
          y: class labels int [B] in [0, num_classes]; num_classes is the null class, also
            used when y is None. Only for class-conditional models (num_classes > 0).
          train: enables dropout; `apply` then needs `rngs={'dropout': key}`.

        Returns:
          float32 [B, H, W, output_channels].
        """
        cfg = self.config
        dtype = cfg.compute_dtype
        expected = (cfg.image_size, cfg.image_size, cfg.in_channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"x must have shape [B, {', '.join(map(str, expected))}], got {x.shape}."
            )
        batch = x.shape[0]
        t = jnp.asarray(t)
        if t.ndim == 0:
            t = jnp.broadcast_to(t, (batch,))
        if t.shape != (batch,):
            raise ValueError(f"t must have shape [B]=[{batch}] or be a scalar, got {t.shape}.")

        temb = TimestepEmbed(cfg.ch, dtype=dtype, name="temb")(t)
        if cfg.num_classes > 0:
            y = jnp.full((batch,), cfg.num_classes, jnp.int32) if y is None else jnp.asarray(y)
            if y.shape != (batch,):
                raise ValueError(f"y must have shape [B]=[{batch}], got {y.shape}.")
            temb = temb + nn.Embed(
                cfg.num_classes + 1,
                4 * cfg.ch,
                dtype=dtype,
                param_dtype=jnp.float32,
                name="class_embed",
            )(y)
        elif y is not None:
            raise ValueError("y was given but model.num_classes = 0 (an unconditional model).")

        # Rematerialise per block; argument 3 of ResnetBlock.__call__ (train) is static.
        res_block = nn.remat(ResnetBlock, static_argnums=(3,)) if cfg.remat else ResnetBlock
        attn_block = nn.remat(AttnBlock) if cfg.remat else AttnBlock

        def resnet(h: jax.Array, out_ch: int, name: str, resample: str | None = None) -> jax.Array:
            block = res_block(
                out_ch,
                cfg.dropout,
                resample=resample,
                dtype=dtype,
                norm_groups=cfg.norm_groups,
                name=name,
            )
            return block(h, temb, train)

        def maybe_attn(h: jax.Array, name: str) -> jax.Array:
            if h.shape[1] not in cfg.attn_resolutions:
                return h
            attn = attn_block(
                num_heads=cfg.num_heads, dtype=dtype, norm_groups=cfg.norm_groups, name=name
            )
            return attn(h)

        last = len(cfg.ch_mult) - 1
        h = conv3x3(cfg.ch, dtype=dtype, name="conv_in")(x.astype(dtype))
        hs = [h]
        for level, mult in enumerate(cfg.ch_mult):
            for i in range(cfg.num_res_blocks):
                h = resnet(h, cfg.ch * mult, f"down_{level}_block_{i}")
                h = maybe_attn(h, f"down_{level}_attn_{i}")
                hs.append(h)
            if level != last:
                if cfg.resblock_updown:
                    h = resnet(h, h.shape[-1], f"down_{level}_downsample", resample="down")
                else:
                    down = Downsample(
                        cfg.conv_resample, dtype=dtype, name=f"down_{level}_downsample"
                    )
                    h = down(h)
                hs.append(h)

        h = resnet(h, h.shape[-1], "mid_block_0")
        h = attn_block(
            num_heads=cfg.num_heads, dtype=dtype, norm_groups=cfg.norm_groups, name="mid_attn"
        )(h)
        h = resnet(h, h.shape[-1], "mid_block_1")

        for level in reversed(range(len(cfg.ch_mult))):
            for i in range(cfg.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                h = resnet(h, cfg.ch * cfg.ch_mult[level], f"up_{level}_block_{i}")
                h = maybe_attn(h, f"up_{level}_attn_{i}")
            if level != 0:
                if cfg.resblock_updown:
                    h = resnet(h, h.shape[-1], f"up_{level}_upsample", resample="up")
                else:
                    h = Upsample(cfg.conv_resample, dtype=dtype, name=f"up_{level}_upsample")(h)
        assert not hs, "every skip connection is consumed"

        h = GroupNorm(dtype, groups=cfg.norm_groups, activation="silu", name="norm_out")(h)
        h = conv3x3(cfg.output_channels, dtype=dtype, scale=0.0, name="conv_out")(h)
        return h.astype(jnp.float32)


def create_model(config: Any) -> UNet:
    """Builds the U-Net from an experiment ConfigDict (or a ready `ModelConfig`).

    The config is validated here, before anything is traced or compiled.

    Raises:
      ValueError: naming the field, for an inconsistent model/data configuration.
    """
    model_config = config if isinstance(config, ModelConfig) else ModelConfig.from_config(config)
    return UNet(model_config)
