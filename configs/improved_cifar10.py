"""CIFAR-10 32×32 with Nichol & Dhariwal's (2021) improvements: learned variances, L_hybrid.

Their CIFAR-10 likelihood setting (Improved DDPM, Sec. 3-4 and App. A): the cosine schedule
with T = 4,000, the ε-parameterization, the variance interpolated between β_t and σ_q² by the
network ("learned_range", so the U-Net outputs 6 channels), and L_hybrid = L_simple +
0.001·L_vlb with the mean stop-gradiented in L_vlb; learning rate 1e-4, batch 128, dropout
0.3, EMA 0.9999, 500k steps. L_vlb alone with importance-sampled timesteps is
`--config.diffusion.weighting=elbo --config.diffusion.vlb_weight=0
--config.diffusion.timestep_proposal=loss_aware` (their best bits/dim, 2.94, came from it).

What differs from the paper here: the U-Net stays Ho et al.'s (ch 128, ch_mult (1, 2, 2, 2),
two ResNet blocks per level, attention at 16×16, one head), where theirs has three blocks per
level, attention at 16 and 8 with 4 heads, and scale-shift normalisation of the time
embedding (not implemented in ddpm_jax's U-Net); ancestral sampling keeps Ho et al.'s clipped
x̂_0. Run with::

    ddpm-jax train --config=configs/improved_cifar10.py --workdir=workdirs/improved_c10
"""

import ml_collections

from ddpm_jax.experiment import defaults


def get_config() -> ml_collections.ConfigDict:
    """Returns the improved-DDPM CIFAR-10 configuration (L_hybrid, learned variances)."""
    config = defaults.get_config()
    config.model.dropout = 0.3

    config.diffusion.schedule = "cosine"
    config.diffusion.num_timesteps = 4000
    config.diffusion.parameterization = "eps"
    config.diffusion.weighting = "eps_mse"  # L_simple ...
    config.diffusion.variance = "learned_range"
    config.diffusion.vlb_weight = 0.001  # ... + 0.001 L_vlb: L_hybrid.

    config.training.num_train_steps = 500_000
    config.optim.learning_rate = 1e-4
    config.optim.warmup_steps = 0  # none in improved-diffusion.
    return config
