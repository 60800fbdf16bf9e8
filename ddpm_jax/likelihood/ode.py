"""The exact log-likelihood by the probability-flow ODE (Song et al. 2021, "Score-Based
Generative Modeling through Stochastic Differential Equations", §4.3 and App. D.2).

A denoiser D(x; σ) ≈ E[x_0 | x_0 + σ n = x] (the convention of Karras et al. 2022, "Elucidating
the Design Space of Diffusion-Based Generative Models", eq. 3 with s(t) = 1, σ(t) = t) defines
the probability-flow ODE

    dx/dσ = (x - D(x; σ)) / σ,

whose solution carries the data density smoothed by N(0, σ_min² I) at σ_min to the density
p_σmax at σ_max. By the instantaneous change of variables (Chen et al. 2018, "Neural ODEs",
Thm. 1), d log p(x(σ))/dσ = -div_x f, so

    log p_σmin(x) = log p_σmax(x(σ_max)) + ∫_{σ_min}^{σ_max} div_x f(x(σ), σ) dσ.

The ODE is integrated in s = ln σ, where it reads dx/ds = x - D(x; e^s) and the divergence term
is div_x(x - D) = dim - tr(∂D/∂x): the same integral, without the 1/σ stiffness near σ_min.
It runs FORWARD, from the data at σ_min up to σ_max (integrating from σ_max down with the data
as the end point gives a meaningless number). The prior is

    p_σmax ≈ N(0, σ_max² I),

the Gaussian that the noise alone gives; the neglected data term changes log p by about
(‖x(σ_max)‖·‖E x_0‖ + tr Cov x_0 / 2) / σ_max² nats, negligible for σ_max ≫ the data's scale.

The divergence is exact (`trace="exact"`: dim Jacobian-vector products per evaluation; for
small dimensions and tests) or the Hutchinson-Skilling estimate E_ε[εᵀ (∂D/∂x) ε] with
Rademacher ε (Hutchinson 1989; Skilling 1989; Grathwohl et al. 2019, "FFJORD"): `num_probes`
probes per example, drawn once from `key` and held fixed along the trajectory, so that the
vector field is deterministic. The estimate of log p is unbiased (up to the solver's error);
more probes lower its variance.

The integrator is diffrax's adaptive Dopri5 or Tsit5 with a PID step-size controller. The whole
batch is one ODE state: the step size is chosen for the batch, so an example's result depends
on its batch-mates only within the tolerances. The denoiser must treat the examples of a batch
independently (inference-mode networks do): the divergence of example b is read from the batch
Jacobian-vector product.

For 8-bit images (`ode_bits_per_dim`), uniform dequantization turns the density into an upper
bound on the bits per dimension of the discrete data, comparable with score_sde's tables.

What σ_min means for a DDPM model: x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε is, divided by √ᾱ_t, the
EDM state x_0 + σ_t ε with σ_t = √((1 - ᾱ_t) / ᾱ_t). The smallest noise level a DDPM model
was trained at is index t = 0 (the paper's step 1): σ_min = √((1 - ᾱ_1) / ᾱ_1)
(`alphas_cumprod[0]` in this project), about 0.0100 for Ho et al.'s linear β (β_1 = 1e-4), and
σ_max = √((1 - ᾱ_T) / ᾱ_T) ≈ 157 for T = 1000; a discrete-time model is queried between its
levels through a fractional timestep. log p_σmin is then the density of the data smoothed by
N(0, σ_min² I), as score_sde evaluates its models at t = ε.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax._base import check_choice, sum_flat

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x [B, ...], σ float32 [B]) -> D

TRACES = ("hutchinson", "exact")
SOLVERS = ("dopri5", "tsit5")
# Dequantization bins of 8-bit data in [-1, 1] units (see `dequantize`).
BINS = ("score_sde", "centred")


class OdeLikelihood(NamedTuple):
    """The result of integrating the probability-flow ODE with its divergence.

    Attributes:
        log_p: float32 [B], log p_σmin(x) in nats = prior_log_p + delta_log_p.
        prior_log_p: float32 [B], log N(z; 0, σ_max² I).
        delta_log_p: float32 [B], ∫ div f dσ from σ_min to σ_max (exact or estimated).
        z: x carried to σ_max, x's shape and dtype float32.
        num_steps: int32 scalar, solver steps taken (accepted and rejected). Dopri5 and Tsit5
            evaluate the vector field 6 times per step (first-same-as-last) plus about twice
            to start; each evaluation is one denoiser call and `num_probes` (Hutchinson) or dim
            (exact) Jacobian-vector products.
    """

    log_p: jax.Array
    prior_log_p: jax.Array
    delta_log_p: jax.Array
    z: jax.Array
    num_steps: jax.Array


def gaussian_prior_log_p(z: jax.Array, sigma_max: float) -> jax.Array:
    """log N(z; 0, σ_max² I) per example: float32 [B] for z [B, ...]."""
    dim = math.prod(z.shape[1:])
    return -0.5 * sum_flat(jnp.square(z)) / sigma_max**2 - 0.5 * dim * math.log(
        2.0 * math.pi * sigma_max**2
    )


def _traced(*values) -> bool:
    return any(isinstance(v, jax.core.Tracer) for v in values)


def _check_sigmas(sigma_min: float, sigma_max: float) -> None:
    # Checked where the values are known; traced noise levels are the caller's to check.
    if not _traced(sigma_min, sigma_max) and not 0.0 < float(sigma_min) < float(sigma_max):
        raise ValueError(
            f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}."
        )


def _max_rms_norm(tree) -> jax.Array:
    # The largest RMS over the state's parts: the per-example log-density term is controlled
    # on its own, not averaged into the much larger image part.
    return jnp.max(jnp.stack([jnp.sqrt(jnp.mean(jnp.square(v))) for v in jax.tree.leaves(tree)]))


def _solve(vector_field, y0, t0, t1, *, solver, rtol, atol, max_steps):
    # diffrax is imported here so that importing the maths does not pay for it.
    import diffrax

    check_choice(solver, SOLVERS, "solver")
    method = diffrax.Dopri5() if solver == "dopri5" else diffrax.Tsit5()
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field),
        method,
        t0=t0,
        t1=t1,
        dt0=None,
        y0=y0,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol, norm=_max_rms_norm),
        max_steps=max_steps,
    )
    final = jax.tree.map(lambda v: v[-1], sol.ys)
    return final, jnp.asarray(sol.stats["num_steps"], jnp.int32)


def _log_sigma(sigma: float) -> jax.Array:
    return jnp.log(jnp.asarray(sigma, jnp.float32))


def probability_flow(
    denoise_fn: DenoiseFn,
    x: jax.Array,
    *,
    sigma_start: float,
    sigma_end: float,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    solver: str = "dopri5",
    max_steps: int = 4096,
) -> jax.Array:
    """Carries x from noise level σ_start to σ_end along dx/dσ = (x - D(x; σ)) / σ.

    Either direction: σ_start < σ_end maps data towards the prior, σ_start > σ_end maps the
    prior (or a latent) back towards the data, as a deterministic sampler does.

    Args:
        denoise_fn: `denoise_fn(x [B, ...], sigma float32 [B]) -> D(x; σ)`, x's shape.
        x: float [B, ...] at noise level σ_start.
        sigma_start, sigma_end: positive noise levels.
        rtol, atol: the step-size controller's tolerances.
        solver: "dopri5" or "tsit5".
        max_steps: the solver's step budget (exceeding it raises).

    Returns:
        float32, x's shape: the state at σ_end.
    """
    if not _traced(sigma_start, sigma_end) and not (sigma_start > 0 and sigma_end > 0):
        raise ValueError(f"noise levels must be positive, got {sigma_start} and {sigma_end}.")
    x = jnp.asarray(x, jnp.float32)
    batch = x.shape[0]

    def field(s, y, args):
        sigma = jnp.full((batch,), jnp.exp(s), jnp.float32)
        return y - denoise_fn(y, sigma).astype(jnp.float32)

    out, _ = _solve(
        field,
        x,
        _log_sigma(sigma_start),
        _log_sigma(sigma_end),
        solver=solver,
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
    )
    return out


def _trace_fn(denoise_fn, x_shape, trace, key, num_probes):
    """Returns `field(s, (x, delta)) -> (dx/ds, d delta/ds)` for the chosen trace."""
    batch, dim = x_shape[0], math.prod(x_shape[1:])
    if trace == "exact":
        # The per-example basis vector e_i, repeated over the batch: (J e_i)[b, i] summed over i
        # is tr J_b when examples do not interact.
        probes = jnp.eye(dim, dtype=jnp.float32).reshape((dim, 1, *x_shape[1:]))
        probes = jnp.broadcast_to(probes, (dim, *x_shape))
        scale = 1.0
    else:
        if key is None:
            raise ValueError('trace="hutchinson" needs a PRNG key for its probes.')
        if num_probes < 1:
            raise ValueError(f"num_probes must be >= 1, got {num_probes}.")
        probes = jax.random.rademacher(key, (num_probes, *x_shape), jnp.float32)
        scale = 1.0 / num_probes

    def field(s, y, args):
        x, _ = y
        sigma = jnp.full((batch,), jnp.exp(s), jnp.float32)
        denoised, jvp = jax.linearize(lambda v: denoise_fn(v, sigma).astype(jnp.float32), x)
        quad = jax.vmap(lambda p: sum_flat(p * jvp(p)))(probes)  # [P, B]
        return x - denoised, dim - scale * jnp.sum(quad, axis=0)

    return field


def ode_likelihood(
    denoise_fn: DenoiseFn,
    x: jax.Array,
    key: jax.Array | None,
    *,
    sigma_min: float,
    sigma_max: float,
    trace: str = "hutchinson",
    num_probes: int = 1,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    solver: str = "dopri5",
    max_steps: int = 4096,
) -> OdeLikelihood:
    """`ode_log_likelihood` with its parts: the prior term, the divergence term, the latent z
    and the solver's step count. Arguments as `ode_log_likelihood`."""
    check_choice(trace, TRACES, "trace")
    _check_sigmas(sigma_min, sigma_max)
    x = jnp.asarray(x, jnp.float32)
    if x.ndim < 2:
        raise ValueError(f"x must be [B, ...] with at least one data axis, got shape {x.shape}.")
    field = _trace_fn(denoise_fn, x.shape, trace, key, num_probes)
    delta0 = jnp.zeros((x.shape[0],), jnp.float32)
    (z, delta), num_steps = _solve(
        field,
        (x, delta0),
        _log_sigma(sigma_min),
        _log_sigma(sigma_max),
        solver=solver,
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
    )
    prior = gaussian_prior_log_p(z, sigma_max)
    return OdeLikelihood(prior + delta, prior, delta, z, num_steps)


def ode_log_likelihood(
    denoise_fn: DenoiseFn,
    x: jax.Array,
    key: jax.Array | None,
    *,
    sigma_min: float,
    sigma_max: float,
    trace: str = "hutchinson",
    num_probes: int = 1,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    solver: str = "dopri5",
    max_steps: int = 4096,
) -> jax.Array:
    """log p_σmin(x) in nats per example by the probability-flow ODE, for continuous x.

    Integrates dx/dσ = (x - D(x; σ)) / σ and the divergence from σ_min (the data) up to
    σ_max, and adds the prior log N(x(σ_max); 0, σ_max² I) (see the module docstring).
    Jittable: call it inside `jax.jit` with the options static.

    Args:
        denoise_fn: `denoise_fn(x [B, ...], sigma float32 [B]) -> D(x; σ)`, x's shape: the
            denoiser (EDM convention), examples independent of each other.
        x: float [B, ...] data, e.g. NHWC images in [-1, 1] (dequantized for 8-bit data).
        key: PRNG key of the Rademacher probes, drawn once as [num_probes, B, ...] and held
            along the trajectory; unused (may be None) for `trace="exact"`.
        sigma_min: the noise level at which the density is evaluated (> 0).
        sigma_max: the noise level of the prior N(0, σ_max² I).
        trace: "hutchinson" (unbiased estimate, `num_probes` Jacobian-vector products per
            evaluation) or "exact" (dim of them; small dimensions).
        num_probes: Hutchinson probes per example; the estimate averages them.
        rtol, atol: the step-size controller's tolerances (score_sde uses 1e-5 for both).
        solver: "dopri5" or "tsit5" (adaptive, 5th order).
        max_steps: the solver's step budget (exceeding it raises).

    Returns:
        float32 [B] log-densities in nats.
    """
    return ode_likelihood(
        denoise_fn,
        x,
        key,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        trace=trace,
        num_probes=num_probes,
        rtol=rtol,
        atol=atol,
        solver=solver,
        max_steps=max_steps,
    ).log_p


# --------------------------------------------------------------------------- 8-bit data


def bin_width(bins: str) -> float:
    """Width Δ of one dequantization bin in [-1, 1] units: 2/256 ("score_sde"), 2/255
    ("centred")."""
    check_choice(bins, BINS, "bins")
    return 2.0 / 256.0 if bins == "score_sde" else 2.0 / 255.0


def dequantize(images: jax.Array, key: jax.Array, *, bins: str = "score_sde") -> jax.Array:
    """Uniform dequantization of 8-bit images into [-1, 1] units: x + u, u ~ U[0, 1).

    * "score_sde": y = (x + u) / 128 - 1, the 256 bins [x/128 - 1, (x+1)/128 - 1) tiling
      [-1, 1), exactly score_sde's `(x + u) / 256` followed by its centring 2y - 1.
    * "centred": y = (x + u - 1/2) / 127.5 - 1, bins of width 2/255 centred on the training
      grid x/127.5 - 1 (the interior bins of Ho et al.'s discretised decoder).

    Args:
        images: integer array [B, ...] with values in {0..255} (uint8 images).
        key: PRNG key of u.
        bins: "score_sde" or "centred".

    Returns:
        float32, images' shape.
    """
    check_choice(bins, BINS, "bins")
    if not jnp.issubdtype(jnp.asarray(images).dtype, jnp.integer):
        raise TypeError(
            f"dequantize takes 8-bit integer images, got dtype {jnp.asarray(images).dtype}; "
            "for float images x in [-1, 1] on the 8-bit grid pass round((x + 1) * 127.5)."
        )
    x = jnp.asarray(images, jnp.float32)
    u = jax.random.uniform(key, x.shape, jnp.float32)
    if bins == "score_sde":
        return (x + u) / 128.0 - 1.0
    return (x + u - 0.5) / 127.5 - 1.0


def dequantized_bits_per_dim(log_p: jax.Array, dim: int, *, bins: str = "score_sde") -> jax.Array:
    """Bits/dim of 8-bit data from the density log p(y) of its dequantized value y.

    The probability of the integer image is the density's mass over its bin, a cube of side
    Δ in [-1, 1] units; by Jensen's inequality over u,
        -log P(x) <= -log p(y) - dim · log Δ,
    so bits/dim = (-log p(y) - dim · log Δ) / (dim · ln 2) is an upper bound in expectation
    over u. With "score_sde" bins Δ = 2/256 = 1/128 and the constant is +log2(128) = 7 bits/dim,
    score_sde's `offset = log2(grad(inverse_scaler)) + 8 = -1 + 8` for data centred to [-1, 1];
    with "centred" bins Δ = 2/255 and it is log2(127.5) ≈ 6.9944.

    Args:
        log_p: float [B] log-densities (nats) of dequantized images in [-1, 1] units.
        dim: dimensions per example (H·W·C).
        bins: the bins the images were dequantized with.

    Returns:
        float32 [B] bits per dimension.
    """
    return (-jnp.asarray(log_p, jnp.float32) / dim - math.log(bin_width(bins))) / math.log(2.0)


def ode_bits_per_dim(
    denoise_fn: DenoiseFn,
    images: jax.Array,
    key: jax.Array,
    *,
    sigma_min: float,
    sigma_max: float,
    bins: str = "score_sde",
    trace: str = "hutchinson",
    num_probes: int = 1,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    solver: str = "dopri5",
    max_steps: int = 4096,
) -> jax.Array:
    """Bits/dim of 8-bit images by the probability-flow ODE, with uniform dequantization.

    `key` is split in two: the first half draws the dequantization noise u (`dequantize`),
    the second the Hutchinson probes. The images are dequantized to y in [-1, 1] units,
    log p_σmin(y) is integrated as `ode_log_likelihood`, and `dequantized_bits_per_dim` adds
    the bins' Jacobian. Set σ_min as the module docstring says (≈ 0.01 for Ho et al.'s
    linear β).

    Args:
        denoise_fn, sigma_min, sigma_max, trace, num_probes, rtol, atol, solver, max_steps:
            as `ode_log_likelihood`.
        images: integer [B, H, W, C] (or [B, ...]) in {0..255}.
        key: PRNG key.
        bins: "score_sde" (default: comparable with score_sde's tables) or "centred".

    Returns:
        float32 [B] bits per dimension (upper bounds in expectation over u).
    """
    deq_key, probe_key = jax.random.split(key)
    y = dequantize(images, deq_key, bins=bins)
    log_p = ode_log_likelihood(
        denoise_fn,
        y,
        probe_key,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        trace=trace,
        num_probes=num_probes,
        rtol=rtol,
        atol=atol,
        solver=solver,
        max_steps=max_steps,
    )
    return dequantized_bits_per_dim(log_p, int(np.prod(y.shape[1:])), bins=bins)
