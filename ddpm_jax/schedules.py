"""Noise schedules: β_1..β_T and the `Schedule` pytree of every coefficient derived from them.

Conventions: timesteps are integers t ∈ {0, …, T-1}; array index t is the paper's
step t+1, so `alphas_cumprod[t]` is ᾱ_{t+1}. Everything is computed in float64 numpy and stored as
float32 `jax.Array`s, so the same `Schedule` passes through `jax.jit` as an ordinary argument.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("linear", "quad", "const", "jsd", "cosine", "sigmoid")

# Largest β that keeps ᾱ, 1/sqrt(ᾱ) and the posterior coefficients finite (Nichol & Dhariwal).
MAX_BETA = 0.999


def get_beta_schedule(
    name: str,
    num_timesteps: int,
    *,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    cosine_s: float = 0.008,
    max_beta: float = MAX_BETA,
) -> np.ndarray:
    """Returns β_1..β_T of a named schedule.

    Args:
      name: one of `SCHEDULES`:
        "linear": evenly spaced from `beta_start` to `beta_end` (Ho et al.: 1e-4 to 0.02);
        "quad": evenly spaced in sqrt(β), squared;
        "const": `beta_end` at every step;
        "jsd": 1/T, 1/(T-1), …, 1 (Sohl-Dickstein et al.), capped at `max_beta`;
        "cosine": ᾱ(t) = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s) · π/2) (Nichol & Dhariwal),
          β_t = 1 - ᾱ_t/ᾱ_{t-1} capped at `max_beta`;
        "sigmoid": `beta_start + (beta_end - beta_start) · sigmoid(linspace(-6, 6, T))`.
      num_timesteps: T >= 1.
      beta_start: first β of "linear", "quad" and "sigmoid".
      beta_end: last β of "linear", "quad" and "sigmoid"; every β of "const".
      cosine_s: the offset s of "cosine".
      max_beta: cap of "cosine" and "jsd", in (0, 1).

    Returns:
      float64 numpy array of shape [T] with every β in (0, 1).

    Raises:
      ValueError: unknown `name`, T < 1, or parameters that give β outside (0, 1).
    """
    if not isinstance(num_timesteps, int | np.integer) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be an integer >= 1, got {num_timesteps!r}.")
    if not 0.0 < max_beta < 1.0:
        raise ValueError(f"max_beta must lie in (0, 1), got {max_beta}.")
    T = int(num_timesteps)
    if name == "linear":
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    elif name == "quad":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    elif name == "const":
        betas = np.full(T, beta_end, dtype=np.float64)
    elif name == "jsd":
        betas = np.minimum(1.0 / np.linspace(T, 1, T, dtype=np.float64), max_beta)
    elif name == "cosine":
        steps = np.arange(T + 1, dtype=np.float64) / T
        f = np.cos((steps + cosine_s) / (1.0 + cosine_s) * math.pi / 2) ** 2
        alphas_cumprod = f / f[0]
        betas = np.minimum(1.0 - alphas_cumprod[1:] / alphas_cumprod[:-1], max_beta)
    elif name == "sigmoid":
        x = np.linspace(-6.0, 6.0, T, dtype=np.float64)
        betas = beta_start + (beta_end - beta_start) / (1.0 + np.exp(-x))
    else:
        raise ValueError(f"Unknown schedule name {name!r}; expected one of {SCHEDULES}.")
    _check_betas(betas, f"schedule {name!r} with these parameters")
    return betas


def rescale_zero_terminal_snr(betas: np.ndarray | jax.Array | list[float]) -> np.ndarray:
    """β of the schedule rescaled to zero terminal SNR (Lin et al. 2024, Algorithm 1).

    sqrt(ᾱ_t) is shifted so that its last value is 0 and scaled so that its first is unchanged:
    sqrt(ᾱ'_t) = (sqrt(ᾱ_t) - sqrt(ᾱ_T)) sqrt(ᾱ_1)/(sqrt(ᾱ_1) - sqrt(ᾱ_T)); then
    β'_t = 1 - ᾱ'_t/ᾱ'_{t-1}. So β'_1 = β_1, ᾱ'_T = 0 and β'_T = 1: x_T is pure noise, as at
    inference. Equal to diffusers' `rescale_zero_terminal_snr` (in float64). `make_schedule`
    accepts the β_T = 1; an ε-prediction model cannot predict x_0 at t = T - 1, and the
    samplers refuse it there.

    Args:
      betas: β_1..β_T, shape [T] with T >= 2, each in (0, 1).

    Returns:
      float64 numpy array [T], every β in (0, 1) but the last, which is 1.
    """
    b = np.asarray(betas, dtype=np.float64)
    _check_betas(b)
    if b.shape[0] < 2:
        raise ValueError("rescale_zero_terminal_snr needs T >= 2 steps.")
    sqrt_ac = np.sqrt(np.cumprod(1.0 - b))
    first, last = sqrt_ac[0], sqrt_ac[-1]
    sqrt_ac = (sqrt_ac - last) * (first / (first - last))
    ac = sqrt_ac**2
    return 1.0 - np.append(ac[0], ac[1:] / ac[:-1])


def _check_betas(betas: np.ndarray, what: str = "betas", terminal_one: bool = False) -> None:
    if betas.ndim != 1 or betas.shape[0] < 1:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}.")
    if terminal_one and betas.shape[0] > 1 and betas[-1] == 1.0:
        betas = betas[:-1]  # zero terminal SNR (`rescale_zero_terminal_snr`): β_T = 1 only.
    if not np.all(np.isfinite(betas)) or np.any(betas <= 0.0) or np.any(betas >= 1.0):
        bad = betas[~((betas > 0.0) & (betas < 1.0))]
        raise ValueError(
            f"betas must all lie in the open interval (0, 1); {what} gives {bad[:5]} "
            f"(min {betas.min():.3g}, max {betas.max():.3g})."
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Schedule:
    """Every coefficient of the forward and posterior processes, float32 arrays of shape [T].

    Index t holds the paper's step t+1. With ᾱ_0 := 1:

    Attributes:
      betas: β_t.
      alphas: α_t = 1 - β_t.
      alphas_cumprod: ᾱ_t = Π_{s<=t} α_s.
      alphas_cumprod_prev: ᾱ_{t-1} (1 at the first step).
      sqrt_alphas_cumprod: sqrt(ᾱ_t), the signal scale of q(x_t|x_0).
      sqrt_one_minus_alphas_cumprod: sqrt(1 - ᾱ_t), the noise scale of q(x_t|x_0).
      log_one_minus_alphas_cumprod: log(1 - ᾱ_t), the log-variance of q(x_t|x_0).
      sqrt_recip_alphas_cumprod: 1/sqrt(ᾱ_t).
      sqrt_recipm1_alphas_cumprod: sqrt(1/ᾱ_t - 1).
      posterior_variance: σ_q² = β_t (1 - ᾱ_{t-1})/(1 - ᾱ_t) (0 at the first step).
      posterior_log_variance_clipped: log σ_q², with the first step's value replaced by the
        second's (Ho et al.), so that it is finite; log β_1 when T = 1.
      posterior_mean_coef1: β_t sqrt(ᾱ_{t-1})/(1 - ᾱ_t), multiplies x_0 in μ_q.
      posterior_mean_coef2: (1 - ᾱ_{t-1}) sqrt(α_t)/(1 - ᾱ_t), multiplies x_t in μ_q.
      snr: signal-to-noise ratio ᾱ_t/(1 - ᾱ_t).
    """

    betas: jax.Array
    alphas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    log_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array
    sqrt_recipm1_alphas_cumprod: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array
    snr: jax.Array

    @property
    def num_timesteps(self) -> int:
        """T, the number of diffusion steps (static: the arrays' length)."""
        return self.betas.shape[0]


def make_schedule(betas: np.ndarray | jax.Array | list[float]) -> Schedule:
    """Precomputes every coefficient of the forward and posterior processes.

    Args:
      betas: β_1..β_T, shape [T], each in (0, 1); any float dtype (promoted to float64 here).
        The last may be 1 when T >= 2 (zero terminal SNR, `rescale_zero_terminal_snr`): then
        ᾱ_T = 0, and `sqrt_recip_alphas_cumprod` and `sqrt_recipm1_alphas_cumprod` are +inf at
        t = T - 1, where only an x_0- or v-prediction defines x̂_0.

    Returns:
      A `Schedule` of float32 arrays of shape [T], computed in float64.

    Raises:
      ValueError: if `betas` is not a non-empty 1-D array with every value in (0, 1) (but a
        last β of 1).
    """
    if isinstance(betas, jax.core.Tracer):
        raise ValueError("make_schedule needs concrete betas; build the Schedule outside jit.")
    b = np.asarray(betas, dtype=np.float64)
    _check_betas(b, terminal_one=True)
    alphas = 1.0 - b
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    posterior_variance = b * (1.0 - ac_prev) / (1.0 - ac)
    first_log_var = posterior_variance[1] if b.shape[0] > 1 else b[0]
    with np.errstate(divide="ignore"):  # 1/ᾱ_T = inf under zero terminal SNR
        recip = 1.0 / ac
    coefs = dict(
        betas=b,
        alphas=alphas,
        alphas_cumprod=ac,
        alphas_cumprod_prev=ac_prev,
        sqrt_alphas_cumprod=np.sqrt(ac),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
        log_one_minus_alphas_cumprod=np.log(1.0 - ac),
        sqrt_recip_alphas_cumprod=np.sqrt(recip),
        sqrt_recipm1_alphas_cumprod=np.sqrt(recip - 1.0),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=np.log(np.append(first_log_var, posterior_variance[1:])),
        posterior_mean_coef1=b * np.sqrt(ac_prev) / (1.0 - ac),
        posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
        snr=ac / (1.0 - ac),
    )
    return Schedule(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in coefs.items()})


def respace_betas(alphas_cumprod: np.ndarray | jax.Array, timesteps) -> np.ndarray:
    """β of the chain that visits only `timesteps` (Nichol & Dhariwal's respacing).

    The respaced chain keeps ᾱ at the kept steps: β'_i = 1 - ᾱ_{t_i}/ᾱ_{t_{i-1}}, with ᾱ of the
    step before the first kept one taken as 1.

    Args:
      alphas_cumprod: ᾱ of the full chain, shape [T].
      timesteps: strictly increasing integer indices into [0, T), shape [K].

    Returns:
      float64 numpy array of shape [K]: the β of the respaced chain (pass it to `make_schedule`).
    """
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    ts = np.asarray(timesteps)
    if ts.ndim != 1 or ts.size == 0 or not np.issubdtype(ts.dtype, np.integer):
        raise ValueError(f"timesteps must be a non-empty 1-D integer array, got {ts!r}.")
    if ts[0] < 0 or ts[-1] >= ac.shape[0] or np.any(np.diff(ts) <= 0):
        raise ValueError(
            f"timesteps must be strictly increasing within [0, {ac.shape[0]}), got {ts.tolist()}."
        )
    kept = ac[ts]
    return 1.0 - kept / np.append(1.0, kept[:-1])
