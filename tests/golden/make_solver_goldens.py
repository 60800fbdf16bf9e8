"""Writes tests/golden/solvers.npz: diffusers' multistep schedulers, step by step.

Run once, where torch and diffusers are installed (the tests themselves need neither):

    pip install torch diffusers && python tests/golden/make_solver_goldens.py

For each case it records the timesteps `set_timesteps` chose and the sample after every step of
`DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_type="midpoint",
lower_order_final=True, final_sigmas_type="zero")` or `UniPCMultistepScheduler(solver_type="bh2",
predict_x0=True, lower_order_final=True)`, driven by a model that is linear in x_t with
coefficients stored in the file: so ddpm_jax's solver, fed the same x_T, timesteps and model,
must reproduce every step. The schedulers get ddpm_jax's own float32 ᾱ (from float64 betas), so
that the two start from the same numbers.
"""

import os

import diffusers
import numpy as np
import torch

T = 1000
SHAPE = (5, 6)
MEAN, STD = 0.3, 0.5  # data x_0 ~ N(MEAN, STD² I): E[x_0 | x_t] is linear in x_t.
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "solvers.npz")

# (name, scheduler, order, diffusers prediction type, timestep spacing, K)
CASES = [
    ("dpmpp1_sample_linspace10", "dpm", 1, "sample", "linspace", 10),
    ("dpmpp2_eps_linspace10", "dpm", 2, "epsilon", "linspace", 10),
    ("dpmpp2_eps_trailing20", "dpm", 2, "epsilon", "trailing", 20),
    ("dpmpp2_v_leading16", "dpm", 2, "v_prediction", "leading", 16),
    ("dpmpp3_eps_linspace12", "dpm", 3, "epsilon", "linspace", 12),
    ("dpmpp3_sample_trailing20", "dpm", 3, "sample", "trailing", 20),
    ("unipc1_v_linspace8", "unipc", 1, "v_prediction", "linspace", 8),
    ("unipc2_eps_linspace10", "unipc", 2, "epsilon", "linspace", 10),
    ("unipc2_sample_trailing20", "unipc", 2, "sample", "trailing", 20),
    ("unipc3_eps_leading12", "unipc", 3, "epsilon", "leading", 12),
]
SPACING_KS = (1, 2, 5, 7, 10, 16, 20, 50, 99, 100, 250, 333, 500, 999)


def ddpm_jax_alphas_cumprod() -> np.ndarray:
    """float32 ᾱ as `ddpm_jax.schedules.make_schedule(linear betas)` computes it."""
    betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)
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
        out[f"coef_{name}_a"], out[f"coef_{name}_b"] = a.astype(np.float32), b.astype(np.float32)
    return out


def make_scheduler(kind: str, order: int, prediction: str, spacing: str, ac: np.ndarray):
    kw = dict(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
              solver_order=order, prediction_type=prediction, timestep_spacing=spacing,
              lower_order_final=True, final_sigmas_type="zero")  # fmt: skip
    if kind == "dpm":
        s = diffusers.DPMSolverMultistepScheduler(
            algorithm_type="dpmsolver++", solver_type="midpoint", **kw
        )
    else:
        s = diffusers.UniPCMultistepScheduler(solver_type="bh2", predict_x0=True, **kw)
    s.alphas_cumprod = torch.from_numpy(ac)
    s.alpha_t = torch.sqrt(s.alphas_cumprod)
    s.sigma_t = torch.sqrt(1 - s.alphas_cumprod)
    s.lambda_t = torch.log(s.alpha_t) - torch.log(s.sigma_t)
    s.sigmas = ((1 - s.alphas_cumprod) / s.alphas_cumprod) ** 0.5
    return s


def main():
    ac = ddpm_jax_alphas_cumprod()
    coef = coefficients(ac)
    rng = np.random.default_rng(0)
    out = {"alphas_cumprod": ac, **coef, "mean_std": np.array([MEAN, STD])}
    for name, kind, order, prediction, spacing, K in CASES:
        s = make_scheduler(kind, order, prediction, spacing, ac)
        s.set_timesteps(K)
        x_T = rng.standard_normal(SHAPE).astype(np.float32)
        a = torch.from_numpy(coef[f"coef_{prediction}_a"])
        b = torch.from_numpy(coef[f"coef_{prediction}_b"])
        x = torch.from_numpy(x_T)
        steps = []
        for t in s.timesteps:
            model_output = a[t] * x + b[t]
            x = s.step(model_output, t, x).prev_sample
            steps.append(x.numpy().copy())
        out[f"{name}/timesteps"] = s.timesteps.numpy().astype(np.int64)
        out[f"{name}/x_T"] = x_T
        out[f"{name}/steps"] = np.stack(steps)
    for spacing in ("linspace", "leading", "trailing"):
        for K in SPACING_KS:
            s = make_scheduler("dpm", 2, "epsilon", spacing, ac)
            s.set_timesteps(K)
            u = make_scheduler("unipc", 2, "epsilon", spacing, ac)
            u.set_timesteps(K)
            assert np.array_equal(s.timesteps.numpy(), u.timesteps.numpy()), (spacing, K)
            out[f"spacing/{spacing}/{K}"] = s.timesteps.numpy().astype(np.int64)
    out["versions"] = np.array([diffusers.__version__, torch.__version__])
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
