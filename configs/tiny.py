"""A tiny offline configuration for tests and smoke runs (seconds on a CPU).

8×8 grayscale "digits" (embedded, no download), a 0.7M-parameter U-Net (ch 32, ch_mult
(1, 2), one ResNet block per level, attention at 4×4), T = 100 with Ho et al.'s linear
schedule rescaled to keep ᾱ_T ≈ 0 (β from 1e-3 to 0.2), batch 8 and a few steps. Run with::

    ddpm-jax train --config=configs/tiny.py --workdir=/tmp/ddpm_tiny
"""

import ml_collections

from ddpm_jax.experiment import defaults


def get_config() -> ml_collections.ConfigDict:
    """Returns the tiny test configuration."""
    config = defaults.get_config()
    config.data.name = "digits"
    config.data.image_size = 8
    config.data.channels = 1
    config.data.random_flip = False  # a mirrored digit is another symbol.

    config.model.ch = 32
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (4,)

    config.diffusion.num_timesteps = 100
    config.diffusion.beta_start = 1e-3
    config.diffusion.beta_end = 0.2

    config.training.batch_size = 8
    config.training.num_train_steps = 10
    config.training.log_every_steps = 2
    config.training.checkpoint_every_steps = 5
    config.training.keep_checkpoints = 2
    config.training.sample_every_steps = 10
    config.training.num_sample_images = 8

    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 2
    config.optim.ema_decay = 0.9

    config.sampling.num_samples = 16
    config.sampling.batch_size = 8
    config.eval.batch_size = 8
    config.eval.num_examples = 16
    config.eval.bpd_timestep_chunk = 25
    config.eval.fid_num_samples = 16
    return config
