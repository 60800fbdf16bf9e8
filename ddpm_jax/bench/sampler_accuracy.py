"""Quality against steps of every sampler, on data whose exact denoiser is known in closed form.

    results = sampler_accuracy.measure(config, settings)   # part "sampler_accuracy"

(a) Gaussian data x_0 ~ N(μ, s² I): the probability-flow ODE maps x_T to a known endpoint
    μ + s (x_T - sqrt(ᾱ_T) μ) / sqrt(ᾱ_T s² + 1 - ᾱ_T), so a deterministic sampler's error at
    K steps is exact: the RMS distance of its samples to their endpoints, over the data's s.
(b) A mixture of Gaussians in 2-D: the exact denoiser is the softmax-weighted sum of the
    components' posterior means. The reference is the ancestral sampler over all T steps;
    each sampler's distribution error is the sliced Wasserstein-1 distance to it (and to
    draws of the mixture itself), with the error of the mode weights. The distance between two
    independent reference draws of the same size is the noise floor.
(c) The cost of a step of each sampler against one forward pass of the config's U-Net, at the
    benchmark's batch (the solvers' extra arithmetic is elementwise; a step is one call).
(d) The Gaussian of (a) at equal numbers of network evaluations E: Euler and Heun on Karras σ's
    (`edm_discrete`, diffusers' discrete schedulers; Heun's N steps cost 2N - 1), DPM-Solver++
    and UniPC (E steps) on the same model from the same x_T; and EDM's own sampler on the same
    data in its formulation (σ from 80 to 0.002), against the closed form
    x(0) = m + s (x(σ_max) - m)/√(s² + σ_max²).

Schedules: T = 1000, Ho et al.'s linear betas, for (a), (b) and (d).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import edm, edm_discrete, sampling, schedules

T = 1000
STEPS = (5, 10, 20, 50, 100)
# (label, sampler, order); "ancestral" is the respaced ancestral chain (fixedlarge variance).
SAMPLERS = (
    ("ancestral", "ancestral", 2),
    ("ddim", "ddim", 2),
    ("dpm_solver++ 1", "dpm_solver++", 1),
    ("dpm_solver++ 2", "dpm_solver++", 2),
    ("dpm_solver++ 3", "dpm_solver++", 3),
    ("unipc 2", "unipc", 2),
    ("unipc 3", "unipc", 3),
)
SPACINGS = ("logsnr", "linspace", "trailing", "even")
# (d): network evaluations, odd so that Heun's 2N - 1 meets each (N = 3, 5, 10, 20, 50).
EVALUATIONS = (5, 9, 19, 39, 99)
# (label, sampler, order) of (d): "euler"/"heun" run on Karras σ's, the others on "logsnr".
EQUAL_COST_SAMPLERS = (
    ("euler", "euler", 1),
    ("heun", "heun", 2),
    ("dpm_solver++ 2", "dpm_solver++", 2),
    ("dpm_solver++ 3", "dpm_solver++", 3),
    ("unipc 2", "unipc", 2),
    ("unipc 3", "unipc", 3),
)


@dataclasses.dataclass(frozen=True)
class Mixture:
    """x_0 ~ Σ_k w_k N(μ_k, s_k² I) in D dimensions."""

    weights: np.ndarray  # [M]
    means: np.ndarray  # [M, D]
    stds: np.ndarray  # [M]

    def denoiser(self, sched: schedules.Schedule):
        """The exact E[x_0 | x_t] as `model_fn(x_t, t)` (x_0-parameterization).

        At a fractional t (the Karras samplers') ᾱ is that of σ interpolated in log σ between
        the neighbouring timesteps, the inverse of `edm_discrete.sigma_to_t`, so that the
        model stays exact at every σ those samplers ask for.
        """
        w, mu, s2 = (jnp.asarray(a, jnp.float32) for a in (self.weights, self.means, self.stds**2))
        log_sigmas = jnp.log(jnp.asarray(edm_discrete.model_sigmas(sched), jnp.float32))

        def alphas_cumprod(t):
            if jnp.issubdtype(t.dtype, jnp.integer):
                return sched.alphas_cumprod[t]
            lo = jnp.clip(jnp.floor(t), 0, log_sigmas.shape[0] - 2).astype(jnp.int32)
            frac = t - lo
            log_sigma = (1 - frac) * log_sigmas[lo] + frac * log_sigmas[lo + 1]
            return jax.nn.sigmoid(-2.0 * log_sigma)  # 1/(1 + σ²)

        def model_fn(x, t):
            a = alphas_cumprod(t)[:, None, None]  # [B, 1, 1]
            var = a * s2[None, :, None] + 1.0 - a  # [B, M, 1]: Var[x_t | k]
            d = x[:, None, :] - jnp.sqrt(a) * mu[None]  # [B, M, D]
            logp = jnp.log(w)[None] - 0.5 * jnp.sum(d**2 / var + jnp.log(var), axis=-1)
            post = jax.nn.softmax(logp, axis=-1)[..., None]  # p(k | x_t)
            mean_k = mu[None] + jnp.sqrt(a) * s2[None, :, None] / var * d
            return jnp.sum(post * mean_k, axis=1)

        return model_fn

    def draw(self, key: jax.Array, n: int) -> np.ndarray:
        k_key, n_key = jax.random.split(key)
        k = np.asarray(jax.random.choice(k_key, len(self.weights), (n,), p=self.weights))
        z = np.asarray(jax.random.normal(n_key, (n, self.means.shape[1])))
        return self.means[k] + self.stds[k][:, None] * z

    def mode_weights(self, x: np.ndarray) -> np.ndarray:
        nearest = np.argmin(((x[:, None] - self.means[None]) ** 2).sum(-1), axis=1)
        return np.bincount(nearest, minlength=len(self.weights)) / len(x)


MIXTURE = Mixture(
    weights=np.array([0.4, 0.3, 0.2, 0.1]),
    means=np.array([[-0.5, -0.5], [0.5, 0.5], [-0.5, 0.5], [0.6, -0.4]]),
    stds=np.array([0.08, 0.12, 0.05, 0.1]),
)


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, num_projections: int = 256) -> float:
    """Mean over random directions of the 1-D Wasserstein-1 distance of the projections."""
    rng = np.random.default_rng(0)
    dirs = rng.standard_normal((num_projections, a.shape[1]))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    pa, pb = np.sort(a @ dirs.T, axis=0), np.sort(b @ dirs.T, axis=0)
    return float(np.mean(np.abs(pa - pb)))


def _draw(model_fn, sched, shape, key, sampler, order, num_steps, spacing, x_T=None):
    """The chain's final points, not clipped to [-1, 1] (Gaussian endpoints leave it)."""
    kw = dict(parameterization="x0", clip_denoised=False, sampler=sampler,
              num_steps=None if num_steps == T else num_steps,
              timestep_spacing=spacing)  # fmt: skip
    if sampler in ("dpm_solver++", "unipc"):
        kw["order"] = order

    def run(k):
        chain = sampling.reverse_chain(model_fn, sched, shape, k, **kw)
        return chain.run(chain.init(x_T), 0, chain.num_steps).x

    return np.asarray(jax.jit(run)(key), np.float64)


def gaussian_errors(sched, *, mean=0.3, std=0.5, dim=8, n=256) -> dict[str, Any]:
    """(a): RMS distance to the exact ODE endpoint over `std`, per spacing, sampler and K."""
    model = Mixture(np.array([1.0]), np.full((1, dim), mean), np.array([std])).denoiser(sched)
    x_T = jax.random.normal(jax.random.PRNGKey(1), (n, dim))
    a_T = float(sched.alphas_cumprod[-1])
    exact = mean + std * (np.asarray(x_T) - np.sqrt(a_T) * mean) / np.sqrt(a_T * std**2 + 1 - a_T)
    out = {}
    for spacing in SPACINGS:
        out[spacing] = {}
        for label, sampler, order in SAMPLERS[1:]:  # the deterministic ones
            row = {}
            for K in STEPS:
                x = _draw(model, sched, x_T.shape, jax.random.PRNGKey(0), sampler, order, K,
                          spacing, x_T)  # fmt: skip
                row[str(K)] = float(np.sqrt(np.mean((x - exact) ** 2)) / std)
            out[spacing][label] = row
    return out


def _steps_for(solver: str, evaluations: int) -> int:
    """N steps of `solver` that cost `evaluations` network calls (Heun: 2N - 1)."""
    return (evaluations + 1) // 2 if solver == "heun" else evaluations


def _endpoint(denoise, x_T, sigmas, solver):
    """EDM's sampler from x_T · σ_0 down `sigmas`, not clipped (Gaussian endpoints leave it)."""
    run = jax.jit(lambda x: edm.integrate(denoise, x * sigmas[0], sigmas, solver=solver))
    return np.asarray(run(x_T), np.float64)


def equal_cost_errors(sched, *, mean=0.3, std=0.5, dim=8, n=256, spacing="logsnr"):
    """(d): RMS distance to the exact ODE endpoint / std at equal network evaluations.

    "discrete": the DDPM model of (a), every sampler from the same x_T, against (a)'s exact
    endpoint (so the Karras samplers' start x_T σ_max, not x_T √(1 + σ_max²), counts too).
    "edm": `edm.integrate` from x_T · 80 on EDM's grid (σ_min 0.002), exact denoiser of the
    same data, against x(0) = m + s (80 x_T - m)/√(s² + 80²).
    """
    model = Mixture(np.array([1.0]), np.full((1, dim), mean), np.array([std])).denoiser(sched)
    x_T = jax.random.normal(jax.random.PRNGKey(1), (n, dim))
    a_T = float(sched.alphas_cumprod[-1])
    exact = mean + std * (np.asarray(x_T) - np.sqrt(a_T) * mean) / np.sqrt(a_T * std**2 + 1 - a_T)

    def rms(x, target):
        return float(np.sqrt(np.mean((x - target) ** 2)) / std)

    discrete = {}
    denoise = edm_discrete.denoiser(model, sched, parameterization="x0")
    for label, sampler, order in EQUAL_COST_SAMPLERS:
        row = {}
        for e in EVALUATIONS:
            if sampler in edm.SOLVERS:  # diffusers' grid: rounded to float32
                grid = edm_discrete.karras_grid(sched, _steps_for(sampler, e))
                x = _endpoint(denoise, x_T, grid.astype(np.float32), sampler)
            else:
                x = _draw(model, sched, x_T.shape, jax.random.PRNGKey(0), sampler, order, e,
                          spacing, x_T)  # fmt: skip
            row[str(e)] = rms(x, exact)
        discrete[label] = row

    def gaussian(x, sigma):
        return mean + (std**2 / (std**2 + sigma[:, None] ** 2)) * (x - mean)

    sigma_max = 80.0
    exact_edm = mean + std * (np.asarray(x_T) * sigma_max - mean) / np.sqrt(std**2 + sigma_max**2)
    continuous = {}
    for solver in edm.SOLVERS[::-1]:  # euler, heun
        row = {}
        for e in EVALUATIONS:
            grid = edm.karras_sigmas(_steps_for(solver, e), 0.002, sigma_max)
            row[str(e)] = rms(_endpoint(gaussian, x_T, grid, solver), exact_edm)
        continuous[solver] = row
    return {"evaluations": list(EVALUATIONS), "spacing": spacing, "discrete": discrete,
            "edm": continuous}  # fmt: skip


def mixture_errors(sched, *, n=4000, spacing="logsnr") -> dict[str, Any]:
    """(b): sliced W1 to the ancestral-T reference and to the data, and mode-weight error."""
    model = MIXTURE.denoiser(sched)
    shape = (n, MIXTURE.means.shape[1])
    ref = _draw(model, sched, shape, jax.random.PRNGKey(10), "ancestral", 2, T, "endpoints")
    ref2 = _draw(model, sched, shape, jax.random.PRNGKey(11), "ancestral", 2, T, "endpoints")
    data = MIXTURE.draw(jax.random.PRNGKey(12), n)
    data2 = MIXTURE.draw(jax.random.PRNGKey(14), n)
    rows = {}
    for label, sampler, order in SAMPLERS:
        row = {}
        for K in STEPS:
            x = _draw(model, sched, shape, jax.random.PRNGKey(13), sampler, order, K, spacing)
            row[str(K)] = {
                "sw_to_reference": sliced_wasserstein(x, ref),
                "sw_to_data": sliced_wasserstein(x, data),
                "mode_weight_error": float(np.abs(MIXTURE.mode_weights(x) - MIXTURE.weights).max()),
            }
        rows[label] = row
    return {
        "spacing": spacing,
        "num_samples": n,
        "noise_floor_sw": sliced_wasserstein(ref, ref2),
        "data_noise_floor_sw": sliced_wasserstein(data, data2),
        "reference_sw_to_data": sliced_wasserstein(ref, data),
        "samplers": rows,
    }


def step_costs(config, batch_size: int, repeats: int = 3, num_steps: int = 10) -> dict[str, Any]:
    """(c): seconds per reverse step of each sampler on the config's U-Net, and / forward."""
    from ddpm_jax.experiment import Experiment
    from ddpm_jax.experiment.chain_program import ChainProgram, raw_key
    from ddpm_jax.runtime import sharding as shd

    exp = Experiment.from_config(config)
    mesh = shd.make_mesh()
    params = shd.init_sharded(exp.init_params, exp.abstract_params(mesh), jax.random.PRNGKey(0))
    x = jnp.zeros((batch_size, *exp.image_shape), jnp.float32)
    t = jnp.full((batch_size,), 500, jnp.int32)
    forward = jax.jit(lambda p, x, t: exp.model_fn(p)(x, t))
    jax.block_until_ready(forward(params, x, t))
    per_forward = min(_timed(lambda: forward(params, x, t)) for _ in range(repeats))
    out = {"forward_s": per_forward, "num_steps": num_steps, "samplers": {}}
    labels = np.full((batch_size,), -1, np.int32)
    for label, sampler, order in SAMPLERS:
        options = dataclasses.replace(
            exp.config.sampling.options,
            sampler=sampler,
            num_steps=num_steps,
            eta=0.0,
            order=order,
            timestep_spacing="logsnr",
        )
        program = ChainProgram(exp, mesh, batch_size, options)

        def run(program=program):
            return program(params, raw_key(0, 0), 0, labels)[0]

        jax.block_until_ready(run())
        per_step = min(_timed(run) for _ in range(repeats)) / num_steps
        out["samplers"][label] = {"step_s": per_step, "step_over_forward": per_step / per_forward}
        logging.info("sampler cost: %s %.4g s per step", label, per_step)
    return out


def _timed(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def measure(config, batch_size: int, repeats: int = 3) -> dict[str, Any]:
    """All four: {"gaussian": ..., "mixture": ..., "step_cost": ..., "equal_cost": ...}."""
    sched = schedules.make_schedule(schedules.get_beta_schedule("linear", T))
    logging.info("sampler accuracy: Gaussian oracle.")
    gaussian = gaussian_errors(sched)
    logging.info("sampler accuracy: Gaussian oracle at equal network evaluations.")
    equal_cost = equal_cost_errors(sched)
    logging.info("sampler accuracy: mixture of Gaussians.")
    mixture = mixture_errors(sched)
    logging.info("sampler accuracy: cost per step.")
    return {
        "gaussian": gaussian,
        "mixture": mixture,
        "step_cost": step_costs(config, batch_size, repeats),
        "equal_cost": equal_cost,
    }


def format_table(results: dict[str, Any]) -> str:
    """Plain-text tables of `measure`'s results."""
    lines = [f"(a) Gaussian data: RMS error to the exact ODE endpoint / data std, K = {STEPS}"]
    for spacing, rows in results["gaussian"].items():
        lines.append(f"  spacing {spacing!r}")
        for label, row in rows.items():
            lines.append(f"    {label:16s}" + "".join(f"{row[str(K)]:10.2e}" for K in STEPS))
    mix = results["mixture"]
    lines.append(
        f"(b) mixture of 4 Gaussians, {mix['num_samples']} samples, spacing {mix['spacing']!r}: "
        f"sliced W1 to ancestral-{T} (two reference draws: {mix['noise_floor_sw']:.4f}, two "
        f"data draws: {mix['data_noise_floor_sw']:.4f}; reference to data "
        f"{mix['reference_sw_to_data']:.4f}) / max mode-weight error"
    )
    for label, row in mix["samplers"].items():
        cells = "".join(
            f"  {row[str(K)]['sw_to_reference']:.4f}/{row[str(K)]['mode_weight_error']:.3f}"
            for K in STEPS
        )
        lines.append(f"    {label:16s}{cells}")
    cost = results["step_cost"]
    lines.append(
        f"(c) cost of a reverse step / one forward pass ({cost['forward_s'] * 1e3:.4g} ms)"
    )
    for label, row in cost["samplers"].items():
        lines.append(f"    {label:16s}{row['step_over_forward']:8.3f}")
    if "equal_cost" in results:
        lines.extend(_equal_cost_lines(results["equal_cost"]))
    return "\n".join(lines)


def _equal_cost_lines(eq: dict[str, Any]) -> list[str]:
    evals = eq["evaluations"]
    lines = [
        f"(d) Gaussian data: RMS error to the exact ODE endpoint / data std at equal network "
        f"evaluations E = {tuple(evals)} (Heun: N = (E + 1)/2 steps)",
        f"  DDPM model (T = {T}): Euler/Heun on Karras σ's, the others on {eq['spacing']!r}",
    ]
    for label, row in eq["discrete"].items():
        lines.append(f"    {label:16s}" + "".join(f"{row[str(e)]:10.2e}" for e in evals))
    lines.append("  EDM formulation, σ from 80 to 0.002 (Karras σ's)")
    for label, row in eq["edm"].items():
        lines.append(f"    {label:16s}" + "".join(f"{row[str(e)]:10.2e}" for e in evals))
    return lines
