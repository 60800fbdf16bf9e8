"""The config of a run, parsed once into frozen, checked, typed views: the ConfigDict stops here.

    cfg = ExperimentConfig.from_config(config)      # every field of every group checked
    cfg.check_devices(num_devices, process_count)    # what depends on the mesh
    cfg.diffusion.reverse                            # ReverseProcess(parameterization, ...)

Each group of the config (every field defined and documented, with its default, in
`ddpm_jax/experiment/defaults.py`, the one source of defaults) has its view here,
`data.DataConfig` and `models.ModelConfig` included; the views state no defaults of their own.
A bad value fails here, in seconds and before anything compiles, with one message naming the
field, the value and what is allowed (`ddpm_jax.fields`). The views are hashable, so they can
key compiled functions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ddpm_jax import (
    diffusion,
    fields,
    losses,
    posthoc_ema,
    schedules,
)
from ddpm_jax.data.config import DataConfig
from ddpm_jax.errors import ConfigError
from ddpm_jax.experiment import edm_config, eval_protocol
from ddpm_jax.experiment.edm_config import EDMConfig
from ddpm_jax.experiment.sampling_config import SamplingConfig
from ddpm_jax.models.config import ModelConfig

GROUPS = ("data", "model", "diffusion", "edm", "training", "optim", "sampling", "eval", "mesh")


@dataclasses.dataclass(frozen=True)
class ReverseProcess:
    """How the network's output becomes the reverse step p_θ(x_{t-1}|x_t): one value.

    Attributes:
      parameterization: what the network predicts: "x0", "eps" or "v".
      variance: the reverse-step variance, one of `diffusion.VARIANCES`: fixed ("fixedsmall",
        "fixedlarge") or predicted by the network ("learned", "learned_range").
      clip_denoised: clip x̂_0 to [-1, 1] before forming the mean.
    """

    parameterization: str
    variance: str
    clip_denoised: bool

    def kwargs(self) -> dict[str, Any]:
        """The keywords of `diffusion.p_mean_variance`, `sampling.sample`, `bits_per_dim`."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """The `config.diffusion` group: the forward process, the objective, the reverse step."""

    schedule: str
    num_timesteps: int
    beta_start: float
    beta_end: float
    parameterization: str
    weighting: str
    min_snr_gamma: float
    variance: str
    clip_denoised: bool
    vlb_weight: float
    timestep_proposal: str
    formulation: str
    rescale_zero_terminal_snr: bool

    def __post_init__(self):
        fields.choice("diffusion.schedule", self.schedule, schedules.SCHEDULES)
        fields.integer("diffusion.num_timesteps", self.num_timesteps, 1, 100_000)
        fields.number(
            "diffusion.beta_start", self.beta_start, 0.0, 1.0, low_open=True, high_open=True
        )
        fields.number("diffusion.beta_end", self.beta_end, 0.0, 1.0, low_open=True, high_open=True)
        if self.schedule in ("linear", "quad", "sigmoid") and self.beta_start > self.beta_end:
            raise ConfigError(
                f"config.diffusion.beta_start = {self.beta_start!r} is larger than "
                f"config.diffusion.beta_end = {self.beta_end!r}: the {self.schedule!r} schedule "
                "adds noise at a growing rate, so beta_start must be <= beta_end (Ho et al.: "
                "1e-4 and 0.02)."
            )
        fields.choice(
            "diffusion.parameterization", self.parameterization, diffusion.PARAMETERIZATIONS
        )
        fields.choice("diffusion.weighting", self.weighting, losses.WEIGHTINGS)
        fields.number("diffusion.min_snr_gamma", self.min_snr_gamma, 0.0, low_open=True)
        fields.choice("diffusion.variance", self.variance, diffusion.VARIANCES)
        fields.boolean("diffusion.clip_denoised", self.clip_denoised)
        fields.number("diffusion.vlb_weight", self.vlb_weight, 0.0, hint=" 0.001: L_hybrid.")
        if self.vlb_weight and not diffusion.is_learned(self.variance):
            raise fields.fail(
                "diffusion.vlb_weight",
                self.vlb_weight,
                f"trains a learned variance, but config.diffusion.variance = {self.variance!r}; "
                "set variance to 'learned_range' (or 'learned'), or vlb_weight to 0.",
            )
        if self.vlb_weight and self.weighting == "elbo":
            raise fields.fail(
                "diffusion.vlb_weight",
                self.vlb_weight,
                "must be 0 with config.diffusion.weighting = 'elbo': with a learned variance "
                "that weighting already trains mean and variance on the true bound.",
            )
        fields.choice(
            "diffusion.timestep_proposal", self.timestep_proposal, ("uniform", "loss_aware")
        )
        edm_config.check_diffusion(self)  # formulation, zero terminal SNR.
        try:
            self.betas()
        except ValueError as e:
            raise ConfigError(
                f"config.diffusion (schedule {self.schedule!r}, num_timesteps "
                f"{self.num_timesteps}, beta_start {self.beta_start}, beta_end "
                f"{self.beta_end}) gives no valid schedule: {e}"
            ) from e

    @classmethod
    def from_config(cls, config: Any) -> DiffusionConfig:
        """Reads `config.diffusion` of an experiment config."""
        return fields.view_of_group(cls, "diffusion", fields.group_values(config, "diffusion"))

    @property
    def reverse(self) -> ReverseProcess:
        """The reverse-process triple (parameterization, variance, clip_denoised)."""
        return ReverseProcess(self.parameterization, self.variance, self.clip_denoised)

    def betas(self) -> np.ndarray:
        """β_1..β_T, float64 [T] (rescaled to ᾱ_T = 0 with `rescale_zero_terminal_snr`)."""
        betas = schedules.get_beta_schedule(
            self.schedule, self.num_timesteps, beta_start=self.beta_start, beta_end=self.beta_end
        )
        if self.rescale_zero_terminal_snr:
            betas = schedules.rescale_zero_terminal_snr(betas)
        return betas

    def make_schedule(self) -> schedules.Schedule:
        """The `Schedule` of this forward process."""
        return schedules.make_schedule(self.betas())


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """The `config.training` group: batch, run length, cadences, seed, resume controls."""

    batch_size: int
    num_train_steps: int
    log_every_steps: int
    checkpoint_every_steps: int
    keep_checkpoints: int
    keep_period: int | None
    sample_every_steps: int
    num_sample_images: int
    grad_accum_steps: int
    seed: int
    resume_step: int | None
    allow_config_change: bool
    label_dropout: float

    def __post_init__(self):
        fields.integer("training.batch_size", self.batch_size, 1)
        fields.integer("training.num_train_steps", self.num_train_steps, 1)
        fields.integer("training.log_every_steps", self.log_every_steps, 1)
        fields.integer("training.checkpoint_every_steps", self.checkpoint_every_steps, 1)
        fields.integer("training.keep_checkpoints", self.keep_checkpoints, 1)
        fields.integer(
            "training.keep_period", self.keep_period, 0, none_ok=True, hint=" 0 or None: off."
        )
        fields.integer("training.sample_every_steps", self.sample_every_steps, 0, hint=" 0: off.")
        fields.integer("training.num_sample_images", self.num_sample_images, 1)
        fields.integer("training.grad_accum_steps", self.grad_accum_steps, 1)
        fields.integer("training.seed", self.seed, 0, 2**31 - 1)
        fields.integer("training.resume_step", self.resume_step, 0, none_ok=True)
        fields.boolean("training.allow_config_change", self.allow_config_change)
        fields.number("training.label_dropout", self.label_dropout, 0.0, 1.0, high_open=True,
                      hint=" Ho & Salimans: 0.1.")  # fmt: skip
        if self.batch_size % self.grad_accum_steps:
            raise ConfigError(
                f"config.training.batch_size = {self.batch_size} is not divisible by "
                f"config.training.grad_accum_steps = {self.grad_accum_steps}: each update "
                "averages grad_accum_steps equal micro-batches."
            )
        if self.resume_step is not None and self.resume_step > self.num_train_steps:
            raise ConfigError(
                f"config.training.resume_step = {self.resume_step} is past "
                f"config.training.num_train_steps = {self.num_train_steps}."
            )


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The `config.optim` group: Adam with warm-up and clipping, and the EMA of the weights."""

    learning_rate: float
    warmup_steps: int
    b1: float
    b2: float
    eps: float
    grad_clip_norm: float | None
    ema_decay: float
    ema_warmup: bool
    ema_profiles: tuple[float, ...]
    ema_snapshot_every: int
    ema_halflife_kimg: float | None
    ema_rampup_ratio: float | None

    def __post_init__(self):
        fields.number("optim.learning_rate", self.learning_rate, 0.0, low_open=True,
                      hint=" Ho et al. use 2e-4.")  # fmt: skip
        fields.integer("optim.warmup_steps", self.warmup_steps, 0, hint=" 0: no warm-up.")
        fields.number("optim.b1", self.b1, 0.0, 1.0, high_open=True)
        fields.number("optim.b2", self.b2, 0.0, 1.0, high_open=True)
        fields.number("optim.eps", self.eps, 0.0, low_open=True)
        fields.number("optim.grad_clip_norm", self.grad_clip_norm, 0.0, low_open=True,
                      none_ok=True, hint=" None: no clipping.")  # fmt: skip
        fields.number("optim.ema_decay", self.ema_decay, 0.0, 1.0, high_open=True)
        fields.boolean("optim.ema_warmup", self.ema_warmup)
        self._check_ema_profiles()
        edm_config.check_ema_halflife(self)

    def _check_ema_profiles(self) -> None:
        """Post-hoc EMA (`ddpm_jax.posthoc_ema`): σ_rel in (0, 1/√12], distinct; snapshots
        only of profiles that are tracked."""
        profiles = fields.number_tuple(
            "optim.ema_profiles", self.ema_profiles, 0.0, posthoc_ema.SIGMA_REL_MAX,
            low_open=True, nonempty=False,
            hint=" σ_rel is the EMA's width relative to the training length; 1/√12 ≈ 0.2887 "
            "is already the plain average of all steps. EDM2 tracks (0.05, 0.10).",
        )  # fmt: skip
        if len(set(profiles)) != len(profiles):
            raise fields.fail("optim.ema_profiles", self.ema_profiles, "lists a σ_rel twice.")
        object.__setattr__(self, "ema_profiles", profiles)
        fields.integer("optim.ema_snapshot_every", self.ema_snapshot_every, 0, hint=" 0: off.")
        if self.ema_snapshot_every and not profiles:
            raise fields.fail(
                "optim.ema_snapshot_every",
                self.ema_snapshot_every,
                "saves snapshots of the power EMAs of config.optim.ema_profiles, which is "
                "empty; set it, e.g. to (0.05, 0.10), or set ema_snapshot_every to 0.",
            )


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """The `config.eval` group: the bits/dim pass over a split and FID."""

    split: str
    batch_size: int
    bpd_timestep_chunk: int
    num_examples: int
    fid_num_samples: int
    inception_weights: str | None
    inception_sha256: str | None
    fid_cache_dir: str | None
    fid_reference_examples: int
    ema: str | None
    fid_seeds: tuple[int, ...] | None
    fid_reference: str
    reference_file: str | None
    reference_sha256: str | None
    likelihood: str | None
    ode_trace: str
    ode_num_probes: int
    ode_solver: str
    ode_rtol: float
    ode_atol: float
    ode_dequantization: str

    def __post_init__(self):
        fields.string("eval.split", self.split)
        fields.integer("eval.batch_size", self.batch_size, 1)
        fields.integer("eval.bpd_timestep_chunk", self.bpd_timestep_chunk, 1)
        fields.integer("eval.num_examples", self.num_examples, 0, hint=" 0: the whole split.")
        fields.integer("eval.fid_num_samples", self.fid_num_samples, 0, hint=" 0: no FID.")
        if self.fid_num_samples == 1:
            raise fields.fail("eval.fid_num_samples", 1, "must be 0 (no FID) or >= 2.")
        fields.string("eval.inception_weights", self.inception_weights, none_ok=True)
        object.__setattr__(
            self, "inception_sha256", fields.sha256("eval.inception_sha256", self.inception_sha256)
        )
        fields.string("eval.fid_cache_dir", self.fid_cache_dir, none_ok=True)
        fields.integer("eval.fid_reference_examples", self.fid_reference_examples, 0,
                       hint=" 0: the whole reference split.")  # fmt: skip
        fields.file_name(
            "eval.ema", self.ema, none_ok=True,
            hint=" None: the checkpoint's EMA; `ddpm-jax ema` names the others.",
        )  # fmt: skip
        eval_protocol.check(self)  # seeds, reference, likelihood and ODE fields.


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The `config.mesh` group: how parameters are laid out over the devices."""

    fsdp: bool
    fsdp_min_size: int

    def __post_init__(self):
        fields.boolean("mesh.fsdp", self.fsdp)
        fields.integer("mesh.fsdp_min_size", self.fsdp_min_size, 0)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Every group of a run's config, parsed and checked."""

    data: DataConfig
    model: ModelConfig
    diffusion: DiffusionConfig
    edm: EDMConfig
    training: TrainingConfig
    optim: OptimConfig
    sampling: SamplingConfig
    eval: EvalConfig
    mesh: MeshConfig

    @classmethod
    def from_config(cls, config: Any) -> ExperimentConfig:
        """Parses and checks a whole config (an ml_collections ConfigDict or nested mapping).

        Raises:
          ConfigError: for the first bad field, naming it, its value and what is allowed.
        """
        if isinstance(config, ExperimentConfig):
            return config
        groups = {g: fields.group_values(config, g) for g in GROUPS}
        extra = sorted(set(config.keys()) - set(GROUPS))
        if extra:
            raise ConfigError(
                f"config has unknown group(s) {extra}; the groups are {list(GROUPS)}."
            )
        data = DataConfig.from_dict(groups["data"])
        model = ModelConfig.from_dict(groups["model"], data.image_size, data.channels)
        view = cls(
            data=data,
            model=model,
            diffusion=fields.view_of_group(DiffusionConfig, "diffusion", groups["diffusion"]),
            edm=fields.view_of_group(EDMConfig, "edm", groups["edm"]),
            training=fields.view_of_group(TrainingConfig, "training", groups["training"]),
            optim=fields.view_of_group(OptimConfig, "optim", groups["optim"]),
            sampling=fields.view_of_group(SamplingConfig, "sampling", groups["sampling"]),
            eval=fields.view_of_group(EvalConfig, "eval", groups["eval"]),
            mesh=fields.view_of_group(MeshConfig, "mesh", groups["mesh"]),
        )
        view.sampling.options.check(view.diffusion, model.num_classes)
        eval_protocol.likelihoods(view.eval, eval_protocol.formulation(view))
        learned = diffusion.is_learned(view.diffusion.variance)
        channels = 2 * data.channels if learned else data.channels
        if model.out_channels not in (None, channels):
            why = (
                f"{data.channels} for the {view.diffusion.parameterization} prediction and "
                f"{data.channels} for the learned variance"
                if learned
                else f"the {view.diffusion.parameterization} prediction of each image channel"
            )
            raise ConfigError(
                f"config.model.out_channels = {model.out_channels!r} must be None or {channels} "
                f"with config.diffusion.variance = {view.diffusion.variance!r} and "
                f"config.data.channels = {data.channels}: the network outputs {why}."
            )
        if learned and model.out_channels is None:  # the network follows the variance.
            view = dataclasses.replace(
                view, model=dataclasses.replace(model, out_channels=channels)
            )
        return view

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image."""
        return self.data.image_size, self.data.image_size, self.data.channels

    def check_devices(self, num_devices: int, process_count: int, *, mode: str = "train") -> None:
        """Checks what depends on the mesh: batches that split over devices and processes.

        Args:
          num_devices: devices of the mesh (all processes).
          process_count: processes of the run.
          mode: "train" checks the training batch; "eval" the evaluation batch.
        """
        if mode == "train":
            batch, accum = self.training.batch_size, self.training.grad_accum_steps
            if batch % process_count:
                raise ConfigError(
                    f"config.training.batch_size = {batch} is not divisible by the "
                    f"{process_count} processes; use a multiple of {process_count}."
                )
            per_step = accum * num_devices
            if batch % per_step:
                raise ConfigError(
                    f"config.training.batch_size = {batch} must be divisible by "
                    f"grad_accum_steps × devices = {accum} × {num_devices} = {per_step}; use "
                    f"e.g. {max(per_step, batch // per_step * per_step)}."
                )
        elif mode == "eval":
            multiple, batch = int(np.lcm(num_devices, process_count)), self.eval.batch_size
            if batch % multiple:
                raise ConfigError(
                    f"config.eval.batch_size = {batch} must be a multiple of {multiple} to "
                    f"split over {num_devices} devices in {process_count} process(es); use "
                    f"e.g. {max(multiple, batch // multiple * multiple)}."
                )
