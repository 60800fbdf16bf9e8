"""Writes tests/golden/pretrained/: small diffusers-format DDPM repositories and their outputs.

Run once, where torch and diffusers are installed (the tests themselves need neither):

    pip install torch diffusers safetensors && python tests/golden/make_pretrained_fixtures.py

Two repositories with random weights, in the two layouts Ho et al.'s models use on the hub:

- `digits8_root/`: config.json, scheduler_config.json and diffusion_pytorch_model.safetensors
  at the root (as google/ddpm-cifar10-32), 8×8×1 images, 3 levels of 8 channels,
  attention at 4×4, GroupNorm(4), attention keys renamed to the old `query/key/value/proj_attn`
  names (as diffusers' earliest checkpoints have them), ε-prediction, fixed_large, T = 100.
- `rgb16_subfolders/`: model_index.json, unet/ and scheduler/ (as google/ddpm-church-256),
  16×16×3 images, 3 levels, two ResNet blocks per level, attention at 8×8 and 4×4 with two
  heads of 8 channels, GroupNorm(8), float16 weights with the `to_q/to_k/to_v/to_out.0` names,
  v-prediction, cosine (squaredcos_cap_v2) betas, fixed_small, no clipping, T = 50.

Each has `reference.npz`: inputs x [B, C, H, W], t [B] and diffusers' `UNet2DModel` output
[B, C, H, W] (float32, on the CPU). `ho_configs/` holds the configs of google/ddpm-cifar10-32
(root) and google/ddpm-celebahq-256 (unet/), written out here from their public values, and
`cifar10_state_dict_shapes.json`, every tensor name and shape of diffusers' CIFAR-10 U-Net
(built with random weights, none downloaded): the tests check the name mapping on it.
"""

import json
import os
import shutil

import diffusers
import numpy as np
import safetensors.torch
import torch

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")
LEGACY = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}

DIGITS8 = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    block_out_channels=(8, 8, 8),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=4,
    norm_eps=1e-6,
    attention_head_dim=None,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
)
DIGITS8_SCHEDULER = dict(
    num_train_timesteps=100,
    beta_start=1e-3,
    beta_end=0.2,
    beta_schedule="linear",
    variance_type="fixed_large",
    clip_sample=True,
    prediction_type="epsilon",
)
RGB16 = dict(
    sample_size=16,
    in_channels=3,
    out_channels=3,
    block_out_channels=(8, 16, 16),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    norm_eps=1e-6,
    attention_head_dim=8,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    dropout=0.1,
)
RGB16_SCHEDULER = dict(
    num_train_timesteps=50,
    beta_schedule="squaredcos_cap_v2",
    variance_type="fixed_small",
    clip_sample=False,
    prediction_type="v_prediction",
    timestep_spacing="trailing",
)

CIFAR10 = {
    "_class_name": "UNet2DModel",
    "_diffusers_version": "0.16.0.dev0",
    "act_fn": "silu",
    "add_attention": True,
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "class_embed_type": None,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "out_channels": 3,
    "resnet_time_scale_shift": "default",
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
CIFAR10_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "_diffusers_version": "0.1.0",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "clip_sample": True,
    "num_train_timesteps": 1000,
    "trained_betas": None,
    "variance_type": "fixed_large",
}
CELEBAHQ = {
    "_class_name": "UNet2DModel",
    "_diffusers_version": "0.0.4",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 128, 256, 256, 512, 512],
    "center_input_sample": False,
    "down_block_types": [
        "DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "resnet_time_scale_shift": "default",
    "sample_size": 256,
    "time_embedding_type": "positional",
    "up_block_types": [
        "UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D",
    ],
}  # fmt: skip


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Draws every parameter afresh: norm weights near 1, small biases, weights ~ 1/sqrt(fan_in)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(noise / np.sqrt(fan_in))


def reference(model, channels, size, num_timesteps, seed) -> dict[str, np.ndarray]:
    """diffusers' output for three fixed (x_t, t)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((3, channels, size, size), generator=gen)
    t = torch.tensor([0, num_timesteps // 3, num_timesteps - 1], dtype=torch.int64)
    with torch.no_grad():
        out = model(x, t).sample
    return {"x": x.numpy(), "t": t.numpy(), "out": out.numpy().astype(np.float32)}


def write_json(path: str, value) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")


def make_repo(name, unet_kwargs, scheduler_kwargs, seed, *, subfolders, legacy, fp16) -> None:
    root = os.path.join(OUT, name)
    shutil.rmtree(root, ignore_errors=True)
    unet_dir = os.path.join(root, "unet") if subfolders else root
    sched_dir = os.path.join(root, "scheduler") if subfolders else root
    model = diffusers.UNet2DModel(**unet_kwargs).eval()
    randomize(model, seed)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if fp16:  # the reference runs on the float16-rounded weights, in float32.
        state = {k: v.half() for k, v in state.items()}
        model.load_state_dict({k: v.float() for k, v in state.items()})
    model.save_config(unet_dir)
    if legacy:
        renamed = {}
        for key, value in state.items():
            for new, old in LEGACY.items():
                if ".attentions." in key:
                    key = key.replace(new, old)
            renamed[key] = value
        state = renamed
    path = os.path.join(unet_dir, "diffusion_pytorch_model.safetensors")
    safetensors.torch.save_file(state, path, metadata={"format": "pt"})
    diffusers.DDPMScheduler(**scheduler_kwargs).save_config(sched_dir)
    if subfolders:
        write_json(
            os.path.join(root, "model_index.json"),
            {
                "_class_name": "DDPMPipeline",
                "_diffusers_version": diffusers.__version__,
                "scheduler": ["diffusers", "DDPMScheduler"],
                "unet": ["diffusers", "UNet2DModel"],
            },
        )
    ref = reference(
        model,
        unet_kwargs["in_channels"],
        unet_kwargs["sample_size"],
        scheduler_kwargs["num_train_timesteps"],
        seed + 1,
    )
    np.savez(os.path.join(root, "reference.npz"), **ref)
    n = sum(v.numel() for v in state.values())
    print(f"{name}: {len(state)} tensors, {n} parameters, max |out| {np.abs(ref['out']).max():.3g}")


def make_ho_configs() -> None:
    root = os.path.join(OUT, "ho_configs")
    shutil.rmtree(root, ignore_errors=True)
    write_json(os.path.join(root, "ddpm-cifar10-32", "config.json"), CIFAR10)
    write_json(os.path.join(root, "ddpm-cifar10-32", "scheduler_config.json"), CIFAR10_SCHEDULER)
    write_json(os.path.join(root, "ddpm-celebahq-256", "unet", "config.json"), CELEBAHQ)
    kwargs = {k: v for k, v in CIFAR10.items() if not k.startswith("_")}
    model = diffusers.UNet2DModel(**kwargs)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    write_json(os.path.join(root, "cifar10_state_dict_shapes.json"), shapes)
    print(f"ho_configs: CIFAR-10 U-Net with {len(shapes)} tensors")


def main() -> None:
    torch.manual_seed(0)
    make_repo("digits8_root", DIGITS8, DIGITS8_SCHEDULER, 1, subfolders=False, legacy=True,
              fp16=False)  # fmt: skip
    make_repo("rgb16_subfolders", RGB16, RGB16_SCHEDULER, 2, subfolders=True, legacy=False,
              fp16=True)  # fmt: skip
    make_ho_configs()


if __name__ == "__main__":
    main()
