"""configs/tiny.py as an EDM model (Karras et al. 2022): for tests and smoke runs, seconds.

The same 8×8 digits and 0.7M-parameter U-Net, preconditioned as a denoiser D(x; σ) and
trained with EDM's loss (`config.edm`), the EMA in its half-life form with a ramp-up, and
sample grids drawn with Heun's method in 4 steps (7 network evaluations). Run with::

    ddpm-jax train --config=configs/edm_tiny.py --workdir=/tmp/edm_tiny
"""

import ml_collections

from configs import tiny


def get_config() -> ml_collections.ConfigDict:
    """Returns the tiny EDM test configuration."""
    config = tiny.get_config()
    config.diffusion.formulation = "edm"
    # A half-life of 40 images (5 steps of 8), ramped up over the first images seen.
    config.optim.ema_halflife_kimg = 0.04
    config.optim.ema_rampup_ratio = 0.5
    config.sampling.sampler = "heun"
    config.sampling.num_steps = 4
    return config
