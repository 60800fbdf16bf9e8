"""Multistep ODE solvers of the reverse process: DPM-Solver++ (Lu et al.) and UniPC (Zhao et al.).

Both integrate the probability-flow ODE of the diffusion in the half-log-SNR time
λ = log(α/σ), α = sqrt(ᾱ), σ = sqrt(1 - ᾱ), from data predictions x̂_0 (any parameterization is
converted first), reusing the x̂_0 of earlier steps instead of extra network calls: one call per
step, like DDIM, at second or third order. Written to match diffusers step for step:

- `dpm_solver_pp_step`: `DPMSolverMultistepScheduler(algorithm_type="dpmsolver++",
  solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero")`;
- `unipc_step`: `UniPCMultistepScheduler(solver_type="bh2", predict_x0=True,
  lower_order_final=True)`, its UniC corrector applied before every predictor but the first.

The step to respaced index i - 1 is the last one at i = 0, to ᾱ = 1: the clean image (diffusers'
"zero" final sigma). The effective order of a step depends on the step (lower orders while the
history fills, and at the end), a traced value inside `lax.scan`; every order's update is
computed (elementwise arithmetic, no network call) and the right one selected, so that one
compiled scan body serves every step.

Indices are respaced indices of the chain's schedule `sub` (`timesteps.respaced_schedule`):
step k of K (k = 0 the noisiest) is at i = K - 1 - k, the steps before it at i + 1, i + 2, ...
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ddpm_jax.schedules import Schedule

MAX_ORDER = 3
SOLVERS = ("dpm_solver++", "unipc")


class MultistepState(NamedTuple):
    """What a multistep solver carries from step to step.

    Attributes:
      m: float32 [MAX_ORDER, *shape], x̂_0 of the previous steps, newest first (m[0] is the
        step before this one); only the first `min(order, steps done)` are meaningful.
      last_x: float32 [*shape], the point before the previous predictor (UniPC's corrector).
      last_order: int32 scalar, the order of the previous predictor (UniPC).
    """

    m: jax.Array
    last_x: jax.Array
    last_order: jax.Array


def init_state(shape: tuple[int, ...]) -> MultistepState:
    """The state before the first step."""
    return MultistepState(
        jnp.zeros((MAX_ORDER, *shape), jnp.float32),
        jnp.zeros(shape, jnp.float32),
        jnp.zeros((), jnp.int32),
    )


def alpha_sigma_lambda(sub: Schedule, i: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(α, σ, λ) at respaced index i; index -1 is the clean image (α 1, σ 0, λ +inf).

    Indices past the end are clamped (they only ever feed updates that are not selected).
    At ᾱ = 0 (zero terminal SNR) λ is log(float32 tiny) - 0 ≈ -87.3 instead of -inf, so that
    the multistep weights of the later steps stay finite; α stays 0 in the updates.
    """
    K = sub.num_timesteps
    j = jnp.clip(i, 0, K - 1)
    alpha = jnp.where(i < 0, 1.0, sub.sqrt_alphas_cumprod[j])
    sigma = jnp.where(i < 0, 0.0, sub.sqrt_one_minus_alphas_cumprod[j])
    lam = jnp.log(jnp.maximum(alpha, jnp.finfo(jnp.float32).tiny)) - jnp.log(sigma)
    return alpha, sigma, lam  # λ = +inf at the clean image.


def effective_order(order: int, k: jax.Array, num_steps: int, *, sampler: str) -> jax.Array:
    """The order diffusers uses at step k of K (lower while the history fills and at the end).

    DPM-Solver++ (lower_order_final, final sigma zero): first order at the last step, at most
    second at the one before when K < 15, else min(order, k + 1). UniPC (lower_order_final):
    min(order, K - k, k + 1).
    """
    K = num_steps
    if sampler == "unipc":
        return jnp.minimum(jnp.minimum(order, K - k), k + 1)
    eff = jnp.minimum(order, k + 1)
    if K < 15:
        eff = jnp.where(k == K - 2, jnp.minimum(eff, 2), eff)
    return jnp.where(k == K - 1, 1, eff)


def _select(order: jax.Array, candidates: list[jax.Array]) -> jax.Array:
    """candidates[order - 1], with `order` traced: the others may be inf/NaN (not selected)."""
    out = candidates[0]
    for p, value in enumerate(candidates[1:], start=2):
        out = jnp.where(order == p, value, out)
    return out


# --------------------------------------------------------------------------- DPM-Solver++


def dpm_solver_pp_step(
    sub: Schedule,
    x: jax.Array,
    pred_x0: jax.Array,
    state: MultistepState,
    i: jax.Array,
    k: jax.Array,
    *,
    order: int,
) -> tuple[jax.Array, MultistepState]:
    """One multistep DPM-Solver++ step (midpoint form at order 2) from index i to i - 1.

    Args:
      sub: the chain's respaced schedule.
      x: float32 [*shape], the point at index i.
      pred_x0: x̂_0 of the network at (x, i).
      state: the multistep state (x̂_0 of the previous steps).
      i: int32 respaced index of x; k = K - 1 - i its step number.
      k: int32 step number.
      order: 1, 2 or 3 (static).

    Returns:
      (x at index i - 1, the new state).
    """
    K = sub.num_timesteps
    eff = effective_order(order, k, K, sampler="dpm_solver++")
    alpha_t, sigma_t, lam_t = alpha_sigma_lambda(sub, i - 1)
    _, sigma_s0, lam_s0 = alpha_sigma_lambda(sub, i)
    _, _, lam_s1 = alpha_sigma_lambda(sub, i + 1)
    _, _, lam_s2 = alpha_sigma_lambda(sub, i + 2)
    m0, m1, m2 = pred_x0, state.m[0], state.m[1]
    h, h0, h1 = lam_t - lam_s0, lam_s0 - lam_s1, lam_s1 - lam_s2
    r0, r1 = h0 / h, h1 / h
    phi = jnp.expm1(-h)  # e^{-h} - 1 (-1 at the clean image)
    base = (sigma_t / sigma_s0) * x - (alpha_t * phi) * m0
    candidates = [base]
    if order >= 2:
        D1 = (1.0 / r0) * (m0 - m1)
        candidates.append(base - 0.5 * (alpha_t * phi) * D1)
    if order >= 3:
        D1_0, D1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
        D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
        D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1)
        candidates.append(
            base + (alpha_t * (phi / h + 1.0)) * D1 - (alpha_t * ((phi + h) / h**2 - 0.5)) * D2
        )
    x_next = _select(eff, candidates)
    m = jnp.concatenate([pred_x0[None], state.m[:-1]])
    return x_next, MultistepState(m, state.last_x, eff.astype(jnp.int32))


# --------------------------------------------------------------------------- UniPC (bh2)


def _unipc_b(hh: jax.Array, p: int) -> tuple[jax.Array, jax.Array, list[jax.Array]]:
    """(h φ_1(hh), B(h), [b_1..b_p]) of UniPC's B(h) = e^hh - 1 ("bh2") variant."""
    h_phi_1 = jnp.expm1(hh)
    b_h = h_phi_1
    h_phi_k = h_phi_1 / hh - 1.0
    factorial, bs = 1, []
    for q in range(1, p + 1):
        bs.append(h_phi_k * factorial / b_h)
        factorial *= q + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return h_phi_1, b_h, bs


def _solve(rks: list[jax.Array], bs: list[jax.Array]) -> jax.Array:
    """Solves R ρ = b with R[q][j] = rks[j]**q, the small (p ≤ 3) system of UniPC's weights."""
    p = len(bs)
    R = jnp.stack([jnp.stack([rk**q for rk in rks]) for q in range(p)])
    return jnp.linalg.solve(R, jnp.stack(bs))


def _unipc_predictor(sub, x, m, i, p: int) -> jax.Array:
    """UniP of order p from index i to i - 1; m[j] is x̂_0 at index i + j (m[0]: this step)."""
    alpha_t, sigma_t, lam_t = alpha_sigma_lambda(sub, i - 1)
    _, sigma_s0, lam_s0 = alpha_sigma_lambda(sub, i)
    h = lam_t - lam_s0
    hh = -h
    h_phi_1, b_h, bs = _unipc_b(hh, p)
    out = (sigma_t / sigma_s0) * x - alpha_t * h_phi_1 * m[0]
    if p == 1:
        return out
    rks, d1s = [], []
    for q in range(1, p):
        _, _, lam_si = alpha_sigma_lambda(sub, i + q)
        rk = (lam_si - lam_s0) / h
        rks.append(rk)
        d1s.append((m[q] - m[0]) / rk)
    if p == 2:
        rhos = [jnp.asarray(0.5, x.dtype)]
    else:
        rho = _solve(rks, bs[:-1])
        rhos = [rho[q] for q in range(p - 1)]
    res = sum(r * d for r, d in zip(rhos, d1s, strict=True))
    return out - alpha_t * b_h * res


def _unipc_corrector(sub, last_x, x_model, m_prev, i, p: int) -> jax.Array:
    """UniC of order p: corrects the point at index i (predicted from i + 1 with `last_x`).

    `x_model` is x̂_0 of the network at the predicted point; m_prev[j] is x̂_0 at index
    i + 1 + j (m_prev[0]: the step that predicted this point).
    """
    alpha_t, sigma_t, lam_t = alpha_sigma_lambda(sub, i)
    _, sigma_s0, lam_s0 = alpha_sigma_lambda(sub, i + 1)
    h = lam_t - lam_s0
    hh = -h
    h_phi_1, b_h, bs = _unipc_b(hh, p)
    m0 = m_prev[0]
    rks, d1s = [], []
    for q in range(1, p):
        _, _, lam_si = alpha_sigma_lambda(sub, i + 1 + q)
        rk = (lam_si - lam_s0) / h
        rks.append(rk)
        d1s.append((m_prev[q] - m0) / rk)
    rks.append(jnp.ones((), x_model.dtype))
    if p == 1:
        rhos = [jnp.asarray(0.5, x_model.dtype)]
    else:
        rho = _solve(rks, bs)
        rhos = [rho[q] for q in range(p)]
    corr = sum((r * d for r, d in zip(rhos[:-1], d1s, strict=True)), jnp.zeros_like(m0))
    out = (sigma_t / sigma_s0) * last_x - alpha_t * h_phi_1 * m0
    return out - alpha_t * b_h * (corr + rhos[-1] * (x_model - m0))


def unipc_step(
    sub: Schedule,
    x: jax.Array,
    pred_x0: jax.Array,
    state: MultistepState,
    i: jax.Array,
    k: jax.Array,
    *,
    order: int,
) -> tuple[jax.Array, MultistepState]:
    """One UniPC (bh2, data prediction) step: UniC on x (after the first step), then UniP.

    Arguments as in `dpm_solver_pp_step`; `pred_x0` is the network's x̂_0 at (x, i), which
    the corrector uses to refine x before the predictor moves it to index i - 1.
    """
    K = sub.num_timesteps
    corrected = _select(
        jnp.maximum(state.last_order, 1),
        [_unipc_corrector(sub, state.last_x, pred_x0, state.m, i, p) for p in range(1, order + 1)],
    )
    x = jnp.where(k > 0, corrected, x)
    m = jnp.concatenate([pred_x0[None], state.m[:-1]])
    eff = effective_order(order, k, K, sampler="unipc")
    x_next = _select(eff, [_unipc_predictor(sub, x, m, i, p) for p in range(1, order + 1)])
    return x_next, MultistepState(m, x, eff.astype(jnp.int32))


def check_order(sampler: str, order: int) -> int:
    """`order` if it is an int in [1, MAX_ORDER]."""
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= MAX_ORDER:
        raise ValueError(
            f"order must be an int in [1, {MAX_ORDER}] for sampler={sampler!r}, got {order!r}."
        )
    return order


__all__ = [
    "MAX_ORDER",
    "SOLVERS",
    "MultistepState",
    "alpha_sigma_lambda",
    "check_order",
    "dpm_solver_pp_step",
    "effective_order",
    "init_state",
    "unipc_step",
]
