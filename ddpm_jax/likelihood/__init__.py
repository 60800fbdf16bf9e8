"""The likelihood of a diffusion model: the DDPM variational bound, and the exact one by the
probability-flow ODE.

- `bound`: -ELBO in bits per dimension (Ho et al.): Gaussian KL terms, the discretised
  decoder, the prior, the full T-step bound and its cheap unbiased estimates.
- `ode`: log p(x) by the probability-flow ODE (Song et al. 2021) of any denoiser
  D(x; σ), with an exact or a Hutchinson trace, and bits/dim of dequantized 8-bit images.

Every public name of both is reached here, `ddpm_jax.likelihood.<name>`, the path the
README shows. Pure functions of arrays, over `ddpm_jax.diffusion`; they import only the
mathematics (and diffrax, in `ode`, when it runs).
"""

from ddpm_jax.likelihood.bound import (
    BitsPerDim,
    approx_standard_normal_cdf,
    bits_per_dim,
    bits_per_dim_estimate,
    bits_per_dim_stratified,
    bound_terms,
    combine_terms,
    discretized_gaussian_log_likelihood,
    normal_kl,
    prior_bpd,
    stratum_edges,
    vb_term_bpd,
)
from ddpm_jax.likelihood.ode import (
    BINS,
    SOLVERS,
    TRACES,
    OdeLikelihood,
    bin_width,
    dequantize,
    dequantized_bits_per_dim,
    gaussian_prior_log_p,
    ode_bits_per_dim,
    ode_likelihood,
    ode_log_likelihood,
    probability_flow,
)

__all__ = [
    "BINS",
    "SOLVERS",
    "TRACES",
    "BitsPerDim",
    "OdeLikelihood",
    "approx_standard_normal_cdf",
    "bin_width",
    "bits_per_dim",
    "bits_per_dim_estimate",
    "bits_per_dim_stratified",
    "bound_terms",
    "combine_terms",
    "dequantize",
    "dequantized_bits_per_dim",
    "discretized_gaussian_log_likelihood",
    "gaussian_prior_log_p",
    "normal_kl",
    "ode_bits_per_dim",
    "ode_likelihood",
    "ode_log_likelihood",
    "prior_bpd",
    "probability_flow",
    "stratum_edges",
    "vb_term_bpd",
]
