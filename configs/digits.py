"""Embedded offline digits: a small U-Net on 16×16 handwritten digits, ~10 min on 2 CPU cores.

The data (scikit-learn's 8×8 digits, upsampled; `ddpm_jax.data.digits`) ships with the
package's dependencies and is built into the TFDS data_dir on first use, so this runs with no
network. Run it from the repository root::

    ddpm-jax train --config=configs/digits.py --workdir=workdirs/digits

Forward+backward+Adam of this 1.1M-parameter U-Net at batch 64 takes ~0.45 s/step on this
repository's 2-core CPU (jaxlib 0.10.2 with the XLA CPU default that `ddpm_jax.main` sets), so
the 2,000 steps take ~15 minutes; the two sample grids (DPM-Solver++, 25 steps) take seconds.
Digits are recognisable in the grids at 1,000 and 2,000 steps.
"""

import ml_collections

from ddpm_jax.experiment import defaults


def get_config() -> ml_collections.ConfigDict:
    """Returns the default config with the data, model and run length cut to CPU size."""
    config = defaults.get_config()

    config.data.name = "digits"
    config.data.image_size = 16
    config.data.channels = 1
    config.data.random_flip = False  # digits are not mirror-symmetric.

    # Levels at 16, 8, 4 px with 32, 64, 64 channels (multiples of GroupNorm's 32 groups).
    config.model.ch = 32
    config.model.ch_mult = (1, 2, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (4,)
    config.model.dropout = 0.0
    config.model.num_heads = 1

    config.training.batch_size = 64
    config.training.num_train_steps = 2_000  # ~85 epochs of the 1,500 images.
    config.training.log_every_steps = 50
    config.training.checkpoint_every_steps = 500
    config.training.sample_every_steps = 1_000
    config.training.num_sample_images = 64

    # A tiny model on a short run: a larger step size and a short EMA horizon (~1k steps).
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 200
    config.optim.ema_decay = 0.999

    # The sample grids (and --mode=sample): DPM-Solver++(2M), 25 steps even in log-SNR, in
    # seconds where the 1,000-step ancestral chain takes two minutes on 2 CPU cores.
    config.sampling.sampler = "dpm_solver++"
    config.sampling.num_steps = 25
    config.sampling.timestep_spacing = "logsnr"
    config.sampling.num_samples = 64
    config.sampling.batch_size = 64

    config.eval.batch_size = 256
    return config
