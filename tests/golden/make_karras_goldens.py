"""Writes tests/golden/karras.npz: diffusers' Heun and Euler on Karras σ's, step by step.

Run once, where torch and diffusers are installed (the tests themselves need neither):

    pip install torch diffusers && python tests/golden/make_karras_goldens.py

For each case it records `init_noise_sigma`, the sigmas and timesteps `set_timesteps` chose and
the sample after every `step` of `HeunDiscreteScheduler(use_karras_sigmas=True)` or
`EulerDiscreteScheduler(use_karras_sigmas=True)` (defaults otherwise: "linspace" spacing, final
sigma zero), driven the way diffusers' pipelines drive them (`scale_model_input`, then the
model, then `step`) by a model that is linear in x_t, prediction = a(t) x_t + b(t), with a and b
tabulated per integer timestep in the file and interpolated linearly at fractional t. The
schedulers get ddpm_jax's own float32 ᾱ (from float64 betas), with diffusers' clamp
ᾱ_{T−1} = 2⁻²⁴ for the zero-terminal-SNR schedule. It also records diffusers'
`rescale_zero_terminal_snr` of a few β schedules, computed in float64.

No case has N = 1: diffusers' "linspace" spacing of one timestep is t = 0, so its one-step
grid is [σ_min, 0]; ddpm_jax's is EDM's [σ_max, 0].
"""

import math
import os

import diffusers
import numpy as np
import torch
from diffusers.schedulers.scheduling_euler_discrete import rescale_zero_terminal_snr

T = 1000
SHAPE = (4, 6)
MEAN, STD = 0.3, 0.5  # data x_0 ~ N(MEAN, STD² I): E[x_0 | x_t] is linear in x_t.
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "karras.npz")

# (name, scheduler, diffusers prediction type, schedule, N)
CASES = [
    ("heun_epsilon_linear_10", "heun", "epsilon", "linear", 10),
    ("heun_sample_linear_5", "heun", "sample", "linear", 5),
    ("heun_v_prediction_linear_18", "heun", "v_prediction", "linear", 18),
    ("heun_epsilon_linear_2", "heun", "epsilon", "linear", 2),
    ("heun_v_prediction_cosine_12", "heun", "v_prediction", "cosine", 12),
    ("heun_sample_zsnr_8", "heun", "sample", "zsnr", 8),
    ("euler_epsilon_linear_10", "euler", "epsilon", "linear", 10),
    ("euler_sample_linear_7", "euler", "sample", "linear", 7),
    ("euler_v_prediction_linear_25", "euler", "v_prediction", "linear", 25),
    ("euler_epsilon_linear_2", "euler", "epsilon", "linear", 2),
    ("euler_v_prediction_zsnr_10", "euler", "v_prediction", "zsnr", 10),
    ("euler_epsilon_zsnr_6", "euler", "epsilon", "zsnr", 6),
]


def cosine_betas(n: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """ddpm_jax's "cosine" schedule (Nichol & Dhariwal), float64."""
    steps = np.arange(n + 1, dtype=np.float64) / n
    f = np.cos((steps + s) / (1.0 + s) * math.pi / 2) ** 2
    ac = f / f[0]
    return np.minimum(1.0 - ac[1:] / ac[:-1], max_beta)


def betas_of(schedule: str, n: int = T) -> np.ndarray:
    linear = np.linspace(1e-4, 0.02, n, dtype=np.float64)
    if schedule == "linear":
        return linear
    if schedule == "cosine":
        return cosine_betas(n)
    if schedule == "zsnr":
        return rescale_zero_terminal_snr(torch.from_numpy(linear)).numpy()
    raise ValueError(schedule)


def ddpm_jax_alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """float32 ᾱ as `ddpm_jax.schedules.make_schedule(betas)` computes it."""
    return np.cumprod(1.0 - betas).astype(np.float32)


def coefficients(ac: np.ndarray) -> dict[str, np.ndarray]:
    """Per-t (a, b) with prediction = a[t] x_t + b[t] for each prediction type (float32)."""
    ac = ac.astype(np.float64)
    sa, s1 = np.sqrt(ac), np.sqrt(1.0 - ac)
    g = sa * STD**2 / (ac * STD**2 + 1.0 - ac)  # x̂_0 = MEAN + g (x_t - sa MEAN)
    x0 = (g, MEAN * (1.0 - g * sa))
    eps = ((1.0 - sa * x0[0]) / s1, -sa * x0[1] / s1)  # (x_t - sa x̂_0) / s1
    v = (sa * eps[0] - s1 * x0[0], sa * eps[1] - s1 * x0[1])  # sa ε̂ - s1 x̂_0
    out = {}
    for name, (a, b) in (("sample", x0), ("epsilon", eps), ("v_prediction", v)):
        out[f"{name}_a"], out[f"{name}_b"] = a.astype(np.float32), b.astype(np.float32)
    return out


def interp(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """table at fractional t: linear between floor(t) and floor(t) + 1 (float32)."""
    lo = torch.clamp(torch.floor(t), 0, table.shape[0] - 2).long()
    w = t - lo.to(t.dtype)
    return table[lo] * (1 - w) + table[lo + 1] * w


def make_scheduler(kind: str, prediction: str, ac: np.ndarray):
    kw = dict(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
              prediction_type=prediction, use_karras_sigmas=True)  # fmt: skip
    cls = diffusers.HeunDiscreteScheduler if kind == "heun" else diffusers.EulerDiscreteScheduler
    s = cls(**kw)
    s.alphas_cumprod = torch.from_numpy(ac)
    return s


def main():
    out = {"mean_std": np.array([MEAN, STD])}
    for schedule in ("linear", "cosine", "zsnr"):
        betas = betas_of(schedule)
        ac = ddpm_jax_alphas_cumprod(betas)
        out[f"{schedule}/betas"] = betas
        out[f"{schedule}/alphas_cumprod"] = ac
        for name, value in coefficients(ac).items():
            out[f"{schedule}/coef_{name}"] = value
    rng = np.random.default_rng(0)
    for name, kind, prediction, schedule, n in CASES:
        ac = out[f"{schedule}/alphas_cumprod"].copy()
        if ac[-1] == 0.0:
            ac[-1] = 2.0**-24  # diffusers' clamp under rescale_betas_zero_snr
        s = make_scheduler(kind, prediction, ac)
        s.set_timesteps(n)
        x_T = rng.standard_normal(SHAPE).astype(np.float32)
        a = torch.from_numpy(out[f"{schedule}/coef_{prediction}_a"])
        b = torch.from_numpy(out[f"{schedule}/coef_{prediction}_b"])
        x = torch.from_numpy(x_T) * s.init_noise_sigma
        steps, model_t = [], []
        for t in s.timesteps:
            x_in = s.scale_model_input(x, t)
            x = s.step(interp(a, t) * x_in + interp(b, t), t, x).prev_sample
            steps.append(x.numpy().copy())
            model_t.append(float(t))
        out[f"{name}/init_noise_sigma"] = np.float32(s.init_noise_sigma)
        out[f"{name}/sigmas"] = s.sigmas.numpy()
        out[f"{name}/timesteps"] = np.array(model_t, np.float32)
        out[f"{name}/x_T"] = x_T
        out[f"{name}/steps"] = np.stack(steps)
    for schedule, n in (("linear", 1000), ("cosine", 1000), ("linear", 10)):
        betas = betas_of(schedule, n)
        out[f"rescale/{schedule}_{n}/betas"] = betas
        out[f"rescale/{schedule}_{n}/rescaled"] = rescale_zero_terminal_snr(
            torch.from_numpy(betas)
        ).numpy()
    out["versions"] = np.array([diffusers.__version__, torch.__version__])
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
