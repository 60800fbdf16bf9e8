"""The config of the EDM formulation and of EDM's samplers: the `config.edm` view and the checks
that `experiment.config`'s views make for `diffusion.formulation` and the heun/euler fields.

Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models"): an
EDM model is the U-Net preconditioned as a denoiser D(x; σ), trained over continuous σ with
`config.edm`'s loss (`ddpm_jax.edm.denoiser_loss`); its samplers, "heun" and "euler" on the
Karras grid (`config.sampling.sigma_min`, ..., `s_noise`), also run DDPM models
(`ddpm_jax.edm_discrete`). The defaults are `defaults.py`'s, as for every group.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ddpm_jax import diffusion, edm, edm_discrete, fields
from ddpm_jax.errors import ConfigError
from ddpm_jax.experiment import defaults

FORMULATIONS = ("ddpm", "edm")
# The Karras grid's range of an EDM model where config.sampling leaves it None (EDM's values).
EDM_SIGMA_RANGE = (0.002, 80.0)
# The DDPM-only fields of config.diffusion that an EDM model leaves at their defaults: EDM's
# loss has its own weight λ(σ) and draws σ itself, and its network is an x_0-denoiser.
DDPM_ONLY_FIELDS = (
    "weighting",
    "vlb_weight",
    "timestep_proposal",
    "parameterization",
    "rescale_zero_terminal_snr",
)
# The fields of config.sampling that only heun/euler read.
KARRAS_FIELDS = ("sigma_min", "sigma_max", "rho", "s_churn", "s_min", "s_max", "s_noise")


def _refuse_changed(view: Any, group: str, names: tuple[str, ...], why: str) -> None:
    """Raises `fields.fail` for the first of `names` that `view` (a view of config.<group>)
    sets away from its default; `why` is formatted with that `default`."""
    group_defaults = defaults.group(group)
    for name in names:
        value, default = getattr(view, name), group_defaults[name]
        if value != default:
            raise fields.fail(f"{group}.{name}", value, why.format(default=default))


@dataclasses.dataclass(frozen=True)
class EDMConfig:
    """The `config.edm` group: what an EDM model is trained with (`ddpm_jax.edm`).

    Attributes:
      sigma_data: σ_d of the preconditioning and of the loss weight λ(σ) (EDM: 0.5).
      p_mean, p_std: the training noise levels, ln σ ~ N(p_mean, p_std²) (EDM: -1.2, 1.2).
    """

    sigma_data: float
    p_mean: float
    p_std: float

    def __post_init__(self):
        fields.number("edm.sigma_data", self.sigma_data, 0.0, low_open=True,
                      hint=" EDM: 0.5 for images in [-1, 1].")  # fmt: skip
        fields.number("edm.p_mean", self.p_mean, hint=" EDM: -1.2.")
        fields.number("edm.p_std", self.p_std, 0.0, low_open=True, hint=" EDM: 1.2.")


def check_diffusion(d: Any) -> None:
    """`config.diffusion`'s formulation and zero-SNR fields (d: a `DiffusionConfig`)."""
    fields.choice("diffusion.formulation", d.formulation, FORMULATIONS)
    fields.boolean("diffusion.rescale_zero_terminal_snr", d.rescale_zero_terminal_snr)
    if d.rescale_zero_terminal_snr and d.parameterization == "eps":
        raise fields.fail(
            "diffusion.rescale_zero_terminal_snr",
            True,
            "needs config.diffusion.parameterization 'v' or 'x0', not 'eps': at zero terminal "
            "SNR x_T is pure noise, from which ε gives no x̂_0 (and the losses and the bound "
            "would divide by SNR = 0).",
        )
    if d.formulation != "edm":
        return
    _refuse_changed(
        d,
        "diffusion",
        DDPM_ONLY_FIELDS,
        "applies to config.diffusion.formulation = 'ddpm' only (EDM's loss is config.edm's); "
        "leave it at {default!r} or set formulation to 'ddpm'.",
    )
    if diffusion.is_learned(d.variance):
        raise fields.fail(
            "diffusion.variance",
            d.variance,
            "a learned variance applies to config.diffusion.formulation = 'ddpm' only (an EDM "
            "model predicts x_0 alone); use 'fixedlarge' or formulation 'ddpm'.",
        )


def check_ema_halflife(optim: Any) -> None:
    """`config.optim`'s half-life form of the EMA (optim: an `OptimConfig`)."""
    fields.number("optim.ema_halflife_kimg", optim.ema_halflife_kimg, 0.0, low_open=True,
                  none_ok=True, hint=" EDM: 500.")  # fmt: skip
    fields.number("optim.ema_rampup_ratio", optim.ema_rampup_ratio, 0.0, low_open=True,
                  none_ok=True, hint=" EDM: 0.05.")  # fmt: skip
    if optim.ema_rampup_ratio is not None and optim.ema_halflife_kimg is None:
        raise fields.fail(
            "optim.ema_rampup_ratio",
            optim.ema_rampup_ratio,
            "ramps up the half-life form of the EMA, but config.optim.ema_halflife_kimg is "
            "None; set ema_halflife_kimg (EDM: 500) or ema_rampup_ratio to None.",
        )


def check_karras_fields(options: Any) -> None:
    """The heun/euler fields of `options` (a `SamplingOptions`), alone: each in its range,
    and at its default unless the sampler is "heun" or "euler"."""
    for name in ("sigma_min", "sigma_max"):
        fields.number(f"sampling.{name}", getattr(options, name), 0.0, low_open=True,
                      none_ok=True, hint=" None: the model's range.")  # fmt: skip
    lo, hi = options.sigma_min, options.sigma_max
    if lo is not None and hi is not None and lo > hi:
        raise fields.fail("sampling.sigma_min", lo,
                          f"must be <= config.sampling.sigma_max = {hi!r}.")  # fmt: skip
    fields.number("sampling.rho", options.rho, 0.0, low_open=True, hint=" EDM: 7.")
    fields.number("sampling.s_churn", options.s_churn, 0.0, hint=" 0: no churn.")
    fields.number("sampling.s_min", options.s_min, 0.0)
    fields.number("sampling.s_max", options.s_max, options.s_min, none_ok=True,
                  hint=" (config.sampling.s_min or more); None: ∞.")  # fmt: skip
    fields.number("sampling.s_noise", options.s_noise, 0.0)
    if options.sampler in edm.SOLVERS:
        return
    solvers = " and ".join(map(repr, edm.SOLVERS))
    _refuse_changed(
        options,
        "sampling",
        KARRAS_FIELDS,
        f"applies to the samplers {solvers} only, but config.sampling.sampler = "
        f"{options.sampler!r}; leave it at {{default!r}}.",
    )


def check_sampler_for_model(options: Any, d: Any) -> None:
    """Refuses a DDPM chain for an EDM model or longer than T steps, and a heun/euler σ range
    outside a DDPM model's.

    Args:
      options: the `SamplingOptions`.
      d: the model's `DiffusionConfig`.
    """
    karras = options.sampler in edm.SOLVERS
    if d.formulation == "edm" and not karras:
        raise fields.fail(
            "sampling.sampler",
            options.sampler,
            f"works for DDPM models only; an EDM model (config.diffusion.formulation = 'edm') "
            f"samples with {' or '.join(map(repr, edm.SOLVERS))}.",
        )
    if not karras and options.num_steps > d.num_timesteps:
        raise fields.fail(
            "sampling.num_steps",
            options.num_steps,
            f"must be 0 (all steps) or at most config.diffusion.num_timesteps = {d.num_timesteps}.",
        )
    if not karras or d.formulation == "edm":
        return
    if options.sigma_min is None and options.sigma_max is None:
        return
    lo, hi = ddpm_sigma_range(d.make_schedule())
    for name in ("sigma_min", "sigma_max"):
        value = getattr(options, name)
        if value is not None and not lo * (1 - 1e-6) <= value <= hi * (1 + 1e-6):
            raise fields.fail(
                f"sampling.{name}",
                value,
                f"must lie within this DDPM model's σ_t range [{lo:.6g}, {hi:.6g}] (t = 0 and "
                "T - 1), or be None for that range.",
            )


def ddpm_sigma_range(schedule: Any) -> tuple[float, float]:
    """(σ_0, σ_{T-1}) of a DDPM schedule, as `edm_discrete.model_sigmas` computes them."""
    sigmas = edm_discrete.model_sigmas(schedule)
    return float(sigmas[0]), float(sigmas[-1])


def karras_grid(options: Any, d: Any, schedule: Any) -> np.ndarray:
    """The σ grid of a heun/euler chain with `options` on a model (N + 1 levels, ending at 0).

    An EDM model: `edm.karras_sigmas` between `options.sigma_min`/`sigma_max` (None:
    `EDM_SIGMA_RANGE`), float64, as `edm.sample` builds it. A DDPM model: between the given
    values (None: its own σ_0 and σ_{T-1}), rounded to float32, as `edm_discrete.sample`.

    Raises:
      ConfigError: the σ range or the number of steps does not give a grid.
    """
    n = options.num_steps or edm.DEFAULT_NUM_STEPS
    if d.formulation == "edm":
        default_lo, default_hi = EDM_SIGMA_RANGE
    else:
        default_lo, default_hi = ddpm_sigma_range(schedule)
    lo = default_lo if options.sigma_min is None else options.sigma_min
    hi = default_hi if options.sigma_max is None else options.sigma_max
    try:
        grid = edm.karras_sigmas(n, lo, hi, options.rho)
    except ValueError as e:
        raise ConfigError(f"config.sampling (sigma_min {lo}, sigma_max {hi}): {e}") from e
    return grid if d.formulation == "edm" else grid.astype(np.float32)
