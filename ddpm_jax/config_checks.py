"""Typed views of the config and the checks that run before anything is compiled.

A run that is going to fail on its config fails here, in seconds, with a message that names
the field and the fix.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ddpm_jax import diffusion, schedules

# Fields every experiment config must have (configs/default.py defines them all).
REQUIRED_FIELDS = {
    "data": ("name", "split", "image_size", "channels", "random_flip"),
    "model": ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "dtype"),
    "diffusion": ("schedule", "num_timesteps", "parameterization", "weighting", "variance"),
    "training": (
        "batch_size",
        "num_train_steps",
        "log_every_steps",
        "checkpoint_every_steps",
        "sample_every_steps",
        "seed",
        "grad_accum_steps",
    ),
    "optim": ("learning_rate", "warmup_steps", "grad_clip_norm", "ema_decay", "ema_warmup"),
    "sampling": ("sampler", "num_steps", "batch_size"),
    "eval": ("batch_size",),
    "mesh": ("fsdp", "fsdp_min_size"),
}


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """The `config.diffusion` group, typed and checked."""

    schedule: str = "linear"
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    parameterization: str = "x0"
    weighting: str = "eps_mse"
    min_snr_gamma: float = 5.0
    variance: str = "fixedlarge"
    clip_denoised: bool = True

    def __post_init__(self):
        checks = [
            ("schedule", schedules.SCHEDULES),
            ("parameterization", diffusion.PARAMETERIZATIONS),
            ("weighting", diffusion.WEIGHTINGS),
            ("variance", diffusion.VARIANCES),
        ]
        for field, allowed in checks:
            if getattr(self, field) not in allowed:
                raise ValueError(
                    f"config.diffusion.{field} = {getattr(self, field)!r} is not one of {allowed}."
                )
        if not isinstance(self.num_timesteps, int) or self.num_timesteps < 1:
            raise ValueError(
                f"config.diffusion.num_timesteps must be an int >= 1, got {self.num_timesteps!r}."
            )

    @classmethod
    def from_config(cls, config: Any) -> DiffusionConfig:
        d = config.diffusion
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        unknown = sorted(set(d.keys()) - known)
        if unknown:
            raise ValueError(
                f"config.diffusion has unknown field(s) {unknown}; known: {sorted(known)}."
            )
        return cls(**values)


def _positive_int(config: Any, path: str, allow_zero: bool = False) -> int:
    group, field = path.split(".")
    value = config[group][field]
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"config.{path} must be an integer >= {low}, got {value!r}.")
    return value


def validate_config(config: Any, *, num_devices: int, process_count: int) -> None:
    """Checks a training config against itself and the device mesh, before any compilation.

    Raises:
      ValueError: naming the first offending field and the fix.
    """
    for group, fields in REQUIRED_FIELDS.items():
        if group not in config:
            raise ValueError(
                f"config has no group {group!r}; start from configs/default.py get_config()."
            )
        missing = [f for f in fields if f not in config[group]]
        if missing:
            raise ValueError(
                f"config.{group} is missing field(s) {missing}; start from configs/default.py."
            )
    DiffusionConfig.from_config(config)
    from ddpm_jax import models  # the model config checks its own fields.

    models.ModelConfig.from_config(config)
    batch = _positive_int(config, "training.batch_size")
    for path in ("training.num_train_steps", "training.log_every_steps"):
        _positive_int(config, path)
    _positive_int(config, "training.checkpoint_every_steps")
    _positive_int(config, "training.sample_every_steps", allow_zero=True)
    _positive_int(config, "training.num_sample_images")
    _positive_int(config, "mesh.fsdp_min_size", allow_zero=True)
    accum = _positive_int(config, "training.grad_accum_steps")
    if batch % process_count:
        raise ValueError(
            f"config.training.batch_size = {batch} is not divisible by the {process_count} "
            f"processes; use a multiple of {process_count}."
        )
    per_step = accum * num_devices
    if batch % per_step:
        raise ValueError(
            f"config.training.batch_size = {batch} must be divisible by grad_accum_steps × "
            f"devices = {accum} × {num_devices} = {per_step}; use e.g. "
            f"{max(per_step, batch // per_step * per_step)}."
        )
    if config.sampling.sampler not in ("ancestral", "ddim"):
        raise ValueError(
            f"config.sampling.sampler = {config.sampling.sampler!r} is not one of "
            "('ancestral', 'ddim')."
        )
    steps = config.sampling.num_steps
    if not isinstance(steps, int) or not 0 <= steps <= config.diffusion.num_timesteps:
        raise ValueError(
            f"config.sampling.num_steps must be 0 (all steps) or in [1, "
            f"{config.diffusion.num_timesteps}], got {steps!r}."
        )
    if not 0.0 <= float(config.optim.ema_decay) < 1.0:
        raise ValueError(f"config.optim.ema_decay must be in [0, 1), got {config.optim.ema_decay}.")
