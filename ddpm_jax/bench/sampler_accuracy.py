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

Schedules: T = 1000, Ho et al.'s linear betas, for (a) and (b).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import sampling, schedules

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


@dataclasses.dataclass(frozen=True)
class Mixture:
    """x_0 ~ Σ_k w_k N(μ_k, s_k² I) in D dimensions."""

    weights: np.ndarray  # [M]
    means: np.ndarray  # [M, D]
    stds: np.ndarray  # [M]

    def denoiser(self, sched: schedules.Schedule):
        """The exact E[x_0 | x_t] as `model_fn(x_t, t)` (x_0-parameterization)."""
        w, mu, s2 = (jnp.asarray(a, jnp.float32) for a in (self.weights, self.means, self.stds**2))

        def model_fn(x, t):
            a = sched.alphas_cumprod[t][:, None, None]  # [B, 1, 1]
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
    """All three: {"gaussian": ..., "mixture": ..., "step_cost": ...}."""
    sched = schedules.make_schedule(schedules.get_beta_schedule("linear", T))
    logging.info("sampler accuracy: Gaussian oracle.")
    gaussian = gaussian_errors(sched)
    logging.info("sampler accuracy: mixture of Gaussians.")
    mixture = mixture_errors(sched)
    logging.info("sampler accuracy: cost per step.")
    return {
        "gaussian": gaussian,
        "mixture": mixture,
        "step_cost": step_costs(config, batch_size, repeats),
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
    return "\n".join(lines)
