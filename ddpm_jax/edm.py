"""EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models").

A second formulation beside the discrete DDPM chain: data x₀ are noised as x = x₀ + σn,
n ~ N(0, I), over a continuum of noise levels σ, and the network is a denoiser D(x; σ) ≈ E[x₀|x],
the same x₀-prediction as the project's U-Net, but preconditioned (the paper's Table 1, §5):

    D(x; σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x, c_noise(σ)),

trained with the loss λ(σ) ‖D(x₀ + σn; σ) − x₀‖², ln σ ~ N(P_mean, P_std²), and sampled by
integrating the probability-flow ODE dx/dσ = (x − D(x; σ))/σ (the paper's Eq. 1 with s(t) = 1,
σ(t) = t) from σ_max down to 0 on the Karras grid σ_i (Eq. 5), with Heun's second-order method
(Algorithm 1) and optional stochastic "churn" (Algorithm 2).

- `karras_sigmas`: the grid σ_0 > … > σ_{N-1}, then σ_N = 0 (float64 numpy).
- `preconditioning`, `precondition`: (c_skip, c_out, c_in, c_noise), and the D built from F.
- `loss_noise`, `loss_weight`, `denoiser_loss`: the training loss per example.
- `integrate`: Algorithm 2 on any grid ending at 0, one `lax.scan` of `integration_step` over
  `integration_plan`'s rows; `sample`: from unit-normal latents on the Karras grid.
- `num_evaluations`: network evaluations of a chain (2N − 1 for Heun, N for Euler).

The same samplers run DDPM-trained models (`ddpm_jax.edm_discrete`). Conventions: x is float32
[B, ...] (NHWC images in [-1, 1] at σ = 0); σ is float32 [B] where a function takes one level per
example; every random draw takes an explicit key, and which draw uses which key is documented.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "DEFAULT_NUM_STEPS",
    "SOLVERS",
    "DenoiseFn",
    "denoiser_loss",
    "integrate",
    "integration_plan",
    "integration_step",
    "karras_sigmas",
    "loss_noise",
    "loss_weight",
    "num_evaluations",
    "precondition",
    "preconditioning",
    "sample",
]

SOLVERS = ("heun", "euler")
# The paper's CIFAR-10 setting: 18 steps, 35 network evaluations with Heun.
DEFAULT_NUM_STEPS = 18
# γ_i <= √2 − 1 at most doubles the variance of x at a churned step (Algorithm 2, line 4).
MAX_GAMMA = math.sqrt(2.0) - 1.0

# denoise_fn(x, sigma) -> D(x; σ): x float32 [B, ...], sigma float32 [B], output x's shape.
DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]
# raw_fn(x_in, c_noise) -> F: the network itself, c_noise float32 [B].
RawFn = Callable[[jax.Array, jax.Array], jax.Array]


# --------------------------------------------------------------------------- validation


def _check_number(value, name: str, *, low: float | None = None, strict: bool = False) -> float:
    ok = isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
    if ok and not math.isnan(float(value)) and low is not None:
        ok = float(value) > low if strict else float(value) >= low
    if not ok:
        bound = "" if low is None else f" {'>' if strict else '>='} {low:g}"
        raise ValueError(f"{name} must be a number{bound}, got {value!r}.")
    return float(value)


def _check_num_steps(num_steps) -> int:
    if not isinstance(num_steps, int | np.integer) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}.")
    return int(num_steps)


def _check_solver(solver: str) -> str:
    if solver not in SOLVERS:
        raise ValueError(f"Unknown solver {solver!r}; expected one of {SOLVERS}.")
    return solver


def _check_shape(shape) -> tuple[int, ...]:
    if (
        not isinstance(shape, tuple | list)
        or len(shape) == 0
        or not all(isinstance(s, int | np.integer) and not isinstance(s, bool) for s in shape)
        or any(s < 1 for s in shape)
    ):
        raise ValueError(
            f"shape must be a non-empty tuple of positive ints [B, ...], got {shape!r}."
        )
    return tuple(int(s) for s in shape)


def _per_example(v: jax.Array, x: jax.Array) -> jax.Array:
    """v [B] reshaped to [B, 1, ..., 1] to broadcast against x [B, ...]."""
    return v.reshape((x.shape[0],) + (1,) * (x.ndim - 1)).astype(x.dtype)


def _check_sigma(sigma: jax.Array, x: jax.Array) -> jax.Array:
    sigma = jnp.asarray(sigma, jnp.float32)
    if sigma.shape != (x.shape[0],):
        raise ValueError(
            f"sigma must have shape [batch] = [{x.shape[0]}] (one level per example of x with "
            f"shape {tuple(x.shape)}), got shape {tuple(sigma.shape)}."
        )
    return sigma


# --------------------------------------------------------------------------- the noise levels


def karras_sigmas(
    num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> np.ndarray:
    """The Karras grid of noise levels (the paper's Eq. 5), followed by σ_N = 0.

    σ_i = (σ_max^{1/ρ} + i/(N−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ for i = 0, …, N−1, so that
    σ_0 = σ_max and σ_{N−1} = σ_min; ρ = 7 spends the steps mostly at low noise. N = 1 gives
    [σ_max, 0]: one Euler step, x_1 = D(x_0; σ_max) (diffusers' `linspace(0, 1, 1)` ramp; the
    formula's i/(N−1) is 0/0 there).

    Args:
      num_steps: N >= 1, the number of steps (the grid has N + 1 levels).
      sigma_min: σ_{N−1} > 0 (EDM: 0.002).
      sigma_max: σ_0 >= sigma_min, finite (EDM: 80).
      rho: ρ > 0 (EDM: 7).

    Returns:
      float64 numpy array [N + 1], non-increasing (decreasing when σ_min < σ_max), ending at 0.

    Raises:
      ValueError: N < 1, σ_min <= 0, σ_max < σ_min or not finite, ρ <= 0.
    """
    n = _check_num_steps(num_steps)
    lo = _check_number(sigma_min, "sigma_min", low=0.0, strict=True)
    hi = _check_number(sigma_max, "sigma_max", low=lo)
    if not math.isfinite(hi):
        raise ValueError(f"sigma_max must be finite, got {sigma_max!r}.")
    r = _check_number(rho, "rho", low=0.0, strict=True)
    ramp = np.linspace(0.0, 1.0, n)  # i/(N - 1), as diffusers computes it; [0] when N = 1
    sigmas = (hi ** (1.0 / r) + ramp * (lo ** (1.0 / r) - hi ** (1.0 / r))) ** r
    return np.append(sigmas, 0.0)


# --------------------------------------------------------------------------- the denoiser


def preconditioning(
    sigma: jax.typing.ArrayLike, sigma_data: float = 0.5
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """EDM's preconditioning coefficients at σ (the paper's Table 1, derived in its App. B.6).

    c_skip = σ_d²/(σ² + σ_d²), c_out = σ σ_d/√(σ² + σ_d²), c_in = 1/√(σ² + σ_d²) and
    c_noise = ¼ ln σ: the network's input c_in x and its target (x₀ − c_skip x)/c_out have unit
    variance for data of standard deviation σ_d, and c_skip minimises the amplification of its
    errors.

    Args:
      sigma: σ > 0, any shape (float32 [B] in a chain).
      sigma_data: σ_d > 0, the data's standard deviation (EDM: 0.5 for images in [-1, 1]).

    Returns:
      (c_skip, c_out, c_in, c_noise), each float32 of sigma's shape.
    """
    sigma = jnp.asarray(sigma, jnp.float32)
    s2, d2 = jnp.square(sigma), sigma_data**2
    c_skip = d2 / (s2 + d2)
    c_out = sigma * sigma_data * jax.lax.rsqrt(s2 + d2)
    c_in = jax.lax.rsqrt(s2 + d2)
    c_noise = 0.25 * jnp.log(sigma)
    return c_skip, c_out, c_in, c_noise


def precondition(raw_fn: RawFn, sigma_data: float = 0.5) -> DenoiseFn:
    """D(x; σ) = c_skip x + c_out F(c_in x, c_noise) from a raw network F (`preconditioning`).

    Args:
      raw_fn: `raw_fn(x_in, c_noise) -> F`: x_in float32 [B, ...], c_noise float32 [B] (the
        U-Net's time embedding takes it as a float "timestep"); F has x_in's shape, any float
        dtype (cast to x's dtype, as EDM does for a reduced-precision network).
      sigma_data: σ_d of the data.

    Returns:
      `denoise_fn(x, sigma) -> D(x; σ)`, x float32 [B, ...], sigma float32 [B].
    """

    def denoise_fn(x: jax.Array, sigma: jax.Array) -> jax.Array:
        sigma = _check_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = preconditioning(sigma, sigma_data)
        out = raw_fn(_per_example(c_in, x) * x, c_noise)
        if out.shape != x.shape:
            raise ValueError(f"raw_fn must return x's shape {tuple(x.shape)}, got {out.shape}.")
        return _per_example(c_skip, x) * x + _per_example(c_out, x) * out.astype(x.dtype)

    return denoise_fn


# --------------------------------------------------------------------------- the loss


def loss_noise(
    key: jax.Array, x0: jax.Array, *, p_mean: float = -1.2, p_std: float = 1.2
) -> tuple[jax.Array, jax.Array]:
    """The draws of `denoiser_loss`: σ with ln σ ~ N(P_mean, P_std²), and n ~ N(0, I).

    Determinism contract: `sigma_key, noise_key = jax.random.split(key)`;
    σ = exp(P_mean + P_std · normal(sigma_key, [B], float32)) and
    n = normal(noise_key, x0.shape, x0.dtype).

    Args:
      key: PRNG key.
      x0: clean data, float [B, ...] (only its shape and dtype are used).
      p_mean, p_std: P_mean and P_std >= 0 of the log-normal σ (EDM: -1.2 and 1.2).

    Returns:
      (sigma float32 [B], noise of x0's shape and dtype).
    """
    sigma_key, noise_key = jax.random.split(key)
    log_sigma = p_mean + p_std * jax.random.normal(sigma_key, (x0.shape[0],), jnp.float32)
    return jnp.exp(log_sigma), jax.random.normal(noise_key, x0.shape, x0.dtype)


def loss_weight(sigma: jax.typing.ArrayLike, sigma_data: float = 0.5) -> jax.Array:
    """λ(σ) = (σ² + σ_d²)/(σ σ_d)² = 1/c_out², the weight that gives the network unit-variance
    targets at every σ (the paper's Table 1); float32 of sigma's shape."""
    sigma = jnp.asarray(sigma, jnp.float32)
    return (jnp.square(sigma) + sigma_data**2) / jnp.square(sigma * sigma_data)


def denoiser_loss(
    denoise_fn: DenoiseFn,
    x0: jax.Array,
    key: jax.Array,
    *,
    sigma_data: float = 0.5,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    sigma: jax.Array | None = None,
    noise: jax.Array | None = None,
) -> jax.Array:
    """EDM's training loss per example: λ(σ) ‖D(x₀ + σn; σ) − x₀‖², summed over dimensions.

    σ and n are drawn from `key` as `loss_noise` documents (ln σ ~ N(P_mean, P_std²)); the
    weight is `loss_weight`. The train step averages over the batch. For data N(m, σ_d² I) in d
    dimensions and the exact denoiser its expectation is d at every σ (λ(σ) times the posterior
    variance σ²σ_d²/(σ² + σ_d²) is 1), the floor a trained network approaches.

    Args:
      denoise_fn: `denoise_fn(x, sigma) -> D(x; σ)` (e.g. `precondition(raw_fn, sigma_data)`).
      x0: clean data, float32 [B, ...].
      key: PRNG key for σ and n.
      sigma_data: σ_d of λ(σ) (pass the σ_d of the preconditioning).
      p_mean, p_std: the log-normal distribution of σ.
      sigma: optional float32 [B] levels to use instead of drawing them.
      noise: optional n of x0's shape to use instead of drawing it.

    Returns:
      float32 [B], the per-example losses.
    """
    drawn_sigma, drawn_noise = loss_noise(key, x0, p_mean=p_mean, p_std=p_std)
    sigma = drawn_sigma if sigma is None else _check_sigma(sigma, x0)
    if noise is None:
        noise = drawn_noise
    elif noise.shape != x0.shape:
        raise ValueError(f"noise must have x0's shape {tuple(x0.shape)}, got {noise.shape}.")
    x = x0 + _per_example(sigma, x0) * noise
    denoised = denoise_fn(x, sigma)
    if denoised.shape != x0.shape:
        raise ValueError(
            f"denoise_fn must return x's shape {tuple(x0.shape)}, got {denoised.shape}."
        )
    sq = jnp.square(denoised.astype(jnp.float32) - x0.astype(jnp.float32))
    return loss_weight(sigma, sigma_data) * jnp.sum(sq, axis=tuple(range(1, x0.ndim)))


# --------------------------------------------------------------------------- the samplers


def num_evaluations(num_steps: int, solver: str = "heun") -> int:
    """Network evaluations of an N-step chain: 2N − 1 for Heun (no correction on the last
    step, to σ = 0), N for Euler."""
    n = _check_num_steps(num_steps)
    return 2 * n - 1 if _check_solver(solver) == "heun" else n


def _check_grid(sigmas) -> np.ndarray:
    if isinstance(sigmas, jax.core.Tracer):
        raise ValueError("sigmas must be concrete (numpy), not traced: the chain's plan is static.")
    s = np.asarray(sigmas, np.float64)
    if (
        s.ndim != 1
        or s.size < 2
        or s[-1] != 0.0
        or not np.all(np.isfinite(s))
        or np.any(s[:-1] <= 0.0)
        or np.any(np.diff(s) > 0.0)
    ):
        raise ValueError(
            "sigmas must be a non-increasing 1-D grid of finite levels > 0 ending with one 0 "
            f"(e.g. karras_sigmas(N)), got {np.asarray(sigmas).tolist()[:8]}..."
        )
    return s


def _plan(sigmas: np.ndarray, solver: str, s_churn, s_min, s_max, s_noise) -> dict:
    """The static schedule of network evaluations of Algorithm 2 on `sigmas` (numpy arrays).

    Step i (σ_i -> σ_{i+1}) has a predictor evaluation, at (x̂_i, σ̂_i), and with Heun, unless
    σ_{i+1} = 0, a corrector evaluation, at (x_{i+1}, σ_{i+1}); evaluation k of the scan is one
    of them, so that the scan body calls the network once.
    """
    n = sigmas.size - 1
    cur, nxt = sigmas[:-1], sigmas[1:]
    in_range = (cur >= s_min) & (cur <= s_max)
    gamma = np.where(in_range, min(s_churn / n, MAX_GAMMA), 0.0)
    hat = cur * (1.0 + gamma)  # σ̂_i (line 5)
    churn_std = s_noise * np.sqrt(hat**2 - cur**2)  # std of the noise added at line 6
    rows = []
    for i in range(n):
        rows.append((i, False))
        if solver == "heun" and nxt[i] > 0.0:
            rows.append((i, True))
    step = np.array([i for i, _ in rows], np.int32)
    return {
        "step": step,
        "corrector": np.array([c for _, c in rows], bool),
        "sigma_hat": hat[step],
        "sigma_next": nxt[step],
        "churn_std": churn_std[step],
        "churn": bool(np.any(gamma > 0.0)),
    }


def integration_plan(
    sigmas: np.ndarray | Sequence[float],
    solver: str = "heun",
    *,
    s_churn: float = 0.0,
    s_min: float = 0.0,
    s_max: float | None = float("inf"),
    s_noise: float = 1.0,
) -> tuple[dict[str, np.ndarray], bool]:
    """The rows of `integrate`'s scan, one per network evaluation (arguments as there):
    ({"step": int32 [E], "corrector": bool [E], "sigma_hat", "sigma_next", "churn_std": float32
    [E]}, whether any step churns). `integration_step` runs one row."""
    _check_solver(solver)
    grid = _check_grid(sigmas)
    s_churn = _check_number(s_churn, "s_churn", low=0.0)
    s_min = _check_number(s_min, "s_min")
    s_max = float("inf") if s_max is None else _check_number(s_max, "s_max", low=s_min)
    s_noise = _check_number(s_noise, "s_noise", low=0.0)
    plan = _plan(grid, solver, s_churn, s_min, s_max, s_noise)
    churn = plan.pop("churn")
    return {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in plan.items()}, churn


def integration_step(
    denoise_fn: DenoiseFn, carry: tuple, row: dict, key: jax.Array | None, *, churn: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One row of `integration_plan`: one network evaluation of Algorithm 2 (`integrate`).

    `carry` is (x, x̂, d), float32 of x's shape: the current point, the predictor's start and
    its slope; (x_0, x_0, 0) before the first row, x_N = carry[0] after the last. With `churn`
    a predictor row draws its noise from `fold_in(key, row["step"])`.
    """
    x, x_hat, d = carry
    corr = row["corrector"]
    if churn:
        eps = jax.random.normal(jax.random.fold_in(key, row["step"]), x.shape, jnp.float32)
        x_pred = x + row["churn_std"] * eps
    else:
        x_pred = x
    x_in = jnp.where(corr, x, x_pred)
    s_in = jnp.where(corr, row["sigma_next"], row["sigma_hat"])
    denoised = denoise_fn(x_in, jnp.full((x.shape[0],), s_in, jnp.float32)).astype(jnp.float32)
    d_now = (x_in - denoised) / s_in
    base = jnp.where(corr, x_hat, x_in)
    slope = jnp.where(corr, 0.5 * d + 0.5 * d_now, d_now)
    x_next = base + (row["sigma_next"] - row["sigma_hat"]) * slope
    return x_next, base, jnp.where(corr, d, d_now)


def integrate(
    denoise_fn: DenoiseFn,
    x: jax.Array,
    sigmas: np.ndarray | Sequence[float],
    key: jax.Array | None = None,
    *,
    solver: str = "heun",
    s_churn: float = 0.0,
    s_min: float = 0.0,
    s_max: float | None = float("inf"),
    s_noise: float = 1.0,
    return_steps: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """EDM's Algorithm 2 from x at σ_0 down the grid `sigmas` to σ_N = 0, in one `lax.scan`.

    Step i: γ_i = min(S_churn/N, √2 − 1) if S_min <= σ_i <= S_max, else 0; σ̂_i = (1 + γ_i) σ_i;
    x̂_i = x_i + √(σ̂_i² − σ_i²) ε_i with ε_i ~ N(0, S_noise² I); d_i = (x̂_i − D(x̂_i; σ̂_i))/σ̂_i;
    x_{i+1} = x̂_i + (σ_{i+1} − σ̂_i) d_i (Euler); with `solver="heun"` and σ_{i+1} > 0 also
    d'_i = (x_{i+1} − D(x_{i+1}; σ_{i+1}))/σ_{i+1} and
    x_{i+1} = x̂_i + (σ_{i+1} − σ̂_i)(d_i + d'_i)/2. With S_churn = 0 this is Algorithm 1, the
    deterministic probability-flow ODE solver. D is never clipped.

    Each scan iteration is one network evaluation (a row of `integration_plan`, run by
    `integration_step`), so `denoise_fn` is traced once. Randomness: ε_i = S_noise ·
    normal(fold_in(key, i), x.shape, float32), on churned steps only (else key may be None).

    Args:
      denoise_fn: `denoise_fn(x, sigma) -> D(x; σ)`, sigma float32 [B].
      x: float32 [B, ...], the start x_0 at σ_0 (latents times σ_0 for `sample`).
      sigmas: the grid, concrete and non-increasing, > 0 but its last entry, which is 0.
      key: PRNG key of the churn noise (needed when some γ_i > 0).
      solver: "heun" or "euler".
      s_churn, s_min, s_max, s_noise: S_churn >= 0, S_tmin <= S_tmax (None: ∞), S_noise >= 0.
      return_steps: also return the point after every evaluation.

    Returns:
      x_N, float32 of x's shape, not clipped; with `return_steps` also float32 [E, *x.shape],
      the point after each of the E evaluations (after a Heun predictor its Euler point
      x_{i+1}, after a corrector the corrected x_{i+1}), as diffusers' `step` returns them.
    """
    rows, churn = integration_plan(
        sigmas, solver, s_churn=s_churn, s_min=s_min, s_max=s_max, s_noise=s_noise
    )
    if churn and key is None:
        raise ValueError("A churned chain (s_churn > 0 within [s_min, s_max]) needs a key.")
    x = jnp.asarray(x, jnp.float32)

    def body(carry, row):
        carry = integration_step(denoise_fn, carry, row, key, churn=churn)
        return carry, (carry[0] if return_steps else None)

    (x, _, _), steps = jax.lax.scan(body, (x, x, jnp.zeros_like(x)), rows)
    return (x, steps) if return_steps else x


def sample(
    denoise_fn: DenoiseFn,
    shape: Sequence[int],
    key: jax.Array,
    *,
    num_steps: int = DEFAULT_NUM_STEPS,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    solver: str = "heun",
    s_churn: float = 0.0,
    s_min: float = 0.0,
    s_max: float | None = float("inf"),
    s_noise: float = 1.0,
    x_T: jax.Array | None = None,
) -> jax.Array:
    """Draws samples with EDM's sampler (Algorithm 2, `integrate`) on the Karras grid.

    x_0 = x_T · σ_0 with σ_0 = σ_max, then N steps down `karras_sigmas(N, σ_min, σ_max, ρ)` to
    σ_N = 0: Heun's method with no correction on the last step (2N − 1 network evaluations) or
    Euler's (N), with S_churn's stochasticity on S_min <= σ_i <= S_max. With S_churn = 0 this is
    NVlabs/edm's `edm_sampler` given the same latents, to float32 precision (it runs in
    float64). The chain is one `lax.scan` of static shapes: jit `sample` by closing over
    `denoise_fn` and the keywords.

    Randomness: `x_key, churn_key = jax.random.split(key)`; x_T = normal(x_key, shape,
    float32) unless given, and the churn noise of step i is normal(fold_in(churn_key, i), shape)
    (see `integrate`). So x_T does not depend on the number of steps.

    Args:
      denoise_fn: `denoise_fn(x, sigma) -> D(x; σ)`, x float32 [B, ...], sigma float32 [B].
      shape: static output shape (B, ...).
      key: PRNG key.
      num_steps: N >= 1 (EDM: 18, 35 evaluations with Heun).
      sigma_min, sigma_max, rho: the Karras grid (EDM: 0.002, 80, 7).
      solver: "heun" (second order) or "euler" (first order).
      s_churn, s_min, s_max, s_noise: the churn (0 by default: deterministic); s_max None is ∞.
      x_T: optional unit-normal latents of `shape` (scaled by σ_0 here) instead of drawing them.

    Returns:
      float32 [*shape], x_N clipped to [-1, 1] (the chain itself is not clipped).
    """
    shape = _check_shape(shape)
    sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho)
    x_key, churn_key = jax.random.split(key)
    if x_T is None:
        x_T = jax.random.normal(x_key, shape, jnp.float32)
    elif tuple(x_T.shape) != shape:
        raise ValueError(f"x_T must have shape {shape}, got {tuple(x_T.shape)}.")
    x = jnp.asarray(x_T, jnp.float32) * jnp.float32(sigmas[0])
    x = integrate(
        denoise_fn, x, sigmas, churn_key, solver=solver, s_churn=s_churn, s_min=s_min,
        s_max=s_max, s_noise=s_noise,
    )  # fmt: skip
    return jnp.clip(x, -1.0, 1.0)
