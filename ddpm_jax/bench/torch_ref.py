"""The PyTorch reference: diffusers' `UNet2DModel` configured as ddpm_jax's U-Net.

For Ho et al.'s CIFAR-10 model (ch 128, ch_mult (1, 2, 2, 2), two ResNet blocks per level,
single-head attention at 16×16, GroupNorm(32), dropout 0.1) diffusers builds the same layers
with the same parameter count, 35,746,307. Parameters are randomly initialised; no weights
are ever downloaded or loaded. The timed work mirrors ddpm_jax's:

  train step: x_t = sqrt(ᾱ_t) x_0 + sqrt(1-ᾱ_t) ε at random t, x̂_0 = net(x_t, t) (dropout
    on), loss mean(SNR_t ||x̂_0 - x_0||²) (ddpm_jax's default L_simple weighting), backward,
    global-norm clipping, Adam, and the EMA update that ddpm_jax's step also does;
  forward: net(x_t, t) without gradients, dropout off;
  sampling: the same respaced ancestral chain (x̂_0 clipped, posterior mean, β noise).
Compute dtype: float32, or bfloat16 autocast with float32 parameters (ddpm_jax's bfloat16).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ml_collections
import numpy as np

from ddpm_jax import models, timesteps
from ddpm_jax.bench.common import (
    BenchSettings,
    flop_rates,
    host_max_rss_bytes,
    rates,
    sampling_figures,
    time_steps,
)
from ddpm_jax.experiment import ExperimentConfig
from ddpm_jax.models.config import num_groups


def diffusers_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`UNet2DModel(**kwargs)` arguments for the U-Net of `config.model`.

    Raises:
      ValueError: for model features the reference cannot express (BigGAN resampling,
        resampling without convolution, several heads, learned variance outputs).
    """
    m = models.ModelConfig.from_config(config)
    if m.resblock_updown or not m.conv_resample:
        raise ValueError(
            "The torch reference supports model.resblock_updown=False and "
            "model.conv_resample=True only (Ho et al.'s U-Net)."
        )
    if m.num_heads != 1:
        raise ValueError("The torch reference supports model.num_heads=1 only.")
    widths = tuple(m.ch * k for k in m.ch_mult)
    sizes = [m.image_size // 2**i for i in range(len(m.ch_mult))]
    down = tuple("AttnDownBlock2D" if s in m.attn_resolutions else "DownBlock2D" for s in sizes)
    up = tuple("AttnUpBlock2D" if s in m.attn_resolutions else "UpBlock2D" for s in sizes[::-1])
    kwargs = dict(
        sample_size=m.image_size,
        in_channels=m.in_channels,
        out_channels=m.output_channels,
        block_out_channels=widths,
        layers_per_block=m.num_res_blocks,
        down_block_types=down,
        up_block_types=up,
        # diffusers uses one group count for every layer: model.norm_groups when set, else
        # ddpm_jax's count for the base width (32 for ch >= 64), which matches
        # min(32, C // 2) at every layer when ch >= 64.
        norm_num_groups=num_groups(m.ch) if m.norm_groups is None else m.norm_groups,
        norm_eps=1e-6,
        dropout=m.dropout,
        attention_head_dim=None,  # one head of all channels, as Ho et al.
        downsample_padding=0,  # TensorFlow-style SAME padding of the stride-2 convolution.
        flip_sin_to_cos=False,  # [sin, cos] embedding with Ho et al.'s frequencies.
        freq_shift=1,
    )
    if m.num_classes > 0:
        kwargs["num_class_embeds"] = m.num_classes + 1
    return kwargs


def measure(
    config: ml_collections.ConfigDict, settings: BenchSettings, device: str, peak_tflops,
    flops_per_image: dict[str, float | None],
) -> dict[str, Any]:  # fmt: skip
    """Measures the reference on `device` ("cpu" or "cuda") with `settings`.

    Args:
      config: the experiment config (model, diffusion schedule, optimiser, dtype).
      settings: the same settings as the ddpm_jax run.
      device: torch device type.
      peak_tflops: peak TFLOP/s per device for MFU, or None.
      flops_per_image: {"train": ..., "forward": ...} from ddpm_jax's cost analysis, used for
        the reference's achieved FLOP/s (the same architecture does the same work).

    Returns:
      A JSON-ready dict like ddpm_jax's: "params", "train", "forward", "sampling", "memory".
    """
    import torch
    from diffusers import UNet2DModel

    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(threads)
    torch.manual_seed(settings.seed)
    dev = torch.device(device)
    dtype = str(config.model.dtype)
    autocast_dtype = {"float32": None, "bfloat16": torch.bfloat16}[dtype]

    def autocast():
        return torch.autocast(dev.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)

    def sync(_=None):
        if dev.type == "cuda":
            torch.cuda.synchronize()

    logging.info("torch reference: %s, %d threads.", device, threads)
    net = UNet2DModel(**diffusers_kwargs(config)).to(dev)
    num_params = sum(p.numel() for p in net.parameters())
    sched = ExperimentConfig.from_config(config).diffusion.make_schedule()
    T, B = sched.num_timesteps, settings.batch_size
    size, ch = int(config.data.image_size), int(config.data.channels)
    sqrt_ac = torch.tensor(np.asarray(sched.sqrt_alphas_cumprod), device=dev)
    sqrt_1m_ac = torch.tensor(np.asarray(sched.sqrt_one_minus_alphas_cumprod), device=dev)
    snr = torch.tensor(np.asarray(sched.snr), device=dev)
    gen = torch.Generator(device=dev).manual_seed(settings.seed)
    x0 = torch.rand((B, ch, size, size), generator=gen, device=dev) * 2 - 1
    labels = (
        torch.zeros((B,), dtype=torch.long, device=dev) if config.model.num_classes > 0 else None
    )
    result: dict[str, Any] = {
        "framework": f"torch {torch.__version__} eager, diffusers UNet2DModel",
        "device": device,
        "threads": torch.get_num_threads(),
        "params": num_params,
        "dtype": dtype,
    }
    per_image = flops_per_image

    if "train" in settings.parts:
        optim = config.optim
        opt = torch.optim.Adam(
            net.parameters(), lr=float(optim.learning_rate), betas=(optim.b1, optim.b2),
            eps=float(optim.eps),
        )  # fmt: skip
        params = [p for p in net.parameters()]
        ema = [p.detach().clone() for p in params]
        decay = float(optim.ema_decay)
        net.train()

        def train_step():
            t = torch.randint(0, T, (B,), generator=gen, device=dev)
            noise = torch.randn(x0.shape, generator=gen, device=dev)
            x_t = sqrt_ac[t].view(-1, 1, 1, 1) * x0 + sqrt_1m_ac[t].view(-1, 1, 1, 1) * noise
            with autocast():
                pred = net(x_t, t, class_labels=labels).sample
            err = (pred.float() - x0).square().mean(dim=(1, 2, 3))
            loss = (snr[t] * err).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, float(optim.grad_clip_norm))
            opt.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema, params, 1.0 - decay)
            return loss

        for _ in range(settings.warmup):
            train_step()
        sync()
        timing = time_steps(train_step, sync, steps=settings.steps, repeats=settings.repeats)
        r = rates(timing["median_s"], B)
        result["train"] = {
            "step_s": timing,
            **r,
            **flop_rates(per_image.get("train"), r["images_per_s"], peak_tflops, 1),
        }

    net.eval()
    t_fwd = torch.randint(0, T, (B,), generator=gen, device=dev)
    if "forward" in settings.parts:

        @torch.inference_mode()
        def forward():
            with autocast():
                return net(x0, t_fwd, class_labels=labels).sample

        for _ in range(settings.warmup):
            forward()
        sync()
        timing = time_steps(forward, sync, steps=settings.steps, repeats=settings.repeats)
        r = rates(timing["median_s"], B)
        result["forward"] = {
            "step_s": timing,
            **r,
            **flop_rates(per_image.get("forward"), r["images_per_s"], peak_tflops, 1),
        }

    # The reference times the ancestral chain only; another sampler has no torch figure.
    if "sampling" in settings.parts and settings.sampler == "ancestral":
        result["sampling"] = _sampling(
            torch, net, config, settings, dev, autocast, sync, gen, labels, result
        )
    if dev.type == "cuda":
        result["memory"] = {
            "kind": "torch.cuda.max_memory_allocated",
            "bytes": int(torch.cuda.max_memory_allocated()),
        }
    else:
        result["memory"] = {
            "kind": "host max RSS (whole process, ddpm_jax's run included)",
            "bytes": host_max_rss_bytes(),
        }
    return result


def _sampling(torch, net, config, settings, dev, autocast, sync, gen, labels, result):
    """The respaced ancestral chain of `ddpm_jax.sampling.sample` (fixed variance, clipped x̂_0)."""
    d = config.diffusion
    if d.parameterization != "x0":
        raise ValueError("The torch reference samples x0-parameterised models only.")
    sched = ExperimentConfig.from_config(config).diffusion.make_schedule()
    T, K, B = sched.num_timesteps, settings.sample_steps, settings.batch_size
    ts = (
        timesteps.spaced_timesteps(T, K, settings.sample_spacing, np.asarray(sched.alphas_cumprod))
        if K < T
        else np.arange(T)
    )
    sub = timesteps.respaced_schedule(sched, ts)
    coef1 = np.asarray(sub.posterior_mean_coef1, np.float64)
    coef2 = np.asarray(sub.posterior_mean_coef2, np.float64)
    if d.variance == "fixedsmall":
        log_var = np.asarray(sub.posterior_log_variance_clipped, np.float64)
    else:
        betas = np.asarray(sub.betas, np.float64)
        post = np.asarray(sub.posterior_variance, np.float64)
        log_var = np.log(np.append(post[1] if K > 1 else betas[0], betas[1:]))
    sigma = np.exp(0.5 * log_var)
    size, ch = int(config.data.image_size), int(config.data.channels)
    shape = (B, ch, size, size)

    @torch.inference_mode()
    def chain():
        x = torch.randn(shape, generator=gen, device=dev)
        for i in range(K - 1, -1, -1):
            t = torch.full((B,), int(ts[i]), dtype=torch.long, device=dev)
            with autocast():
                x0_hat = net(x, t, class_labels=labels).sample.float()
            if d.clip_denoised:
                x0_hat = x0_hat.clamp(-1.0, 1.0)
            x = float(coef1[i]) * x0_hat + float(coef2[i]) * x
            if i > 0:
                x = x + float(sigma[i]) * torch.randn(shape, generator=gen, device=dev)
        return x.clamp(-1.0, 1.0)

    if settings.warmup:
        chain()
    sync()
    timing = time_steps(chain, sync, steps=1, repeats=settings.repeats)
    return sampling_figures(timing, K, T, B, result.get("forward"))
