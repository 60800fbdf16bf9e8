"""LSUN Church 256×256, Ho et al. (2020): 114M-parameter U-Net, batch 64, lr 2e-5, 1.2M steps.

TFDS's lsun/church_outdoor images are not square (256-pixel short side): the input pipeline
must crop them to image_size × image_size. Run with::

    ddpm-jax train --config=configs/lsun256.py --workdir=/tmp/ddpm_lsun_church256
"""

import ml_collections

from ddpm_jax.experiment import defaults


def get_config() -> ml_collections.ConfigDict:
    """Returns Ho et al.'s LSUN Church 256 configuration."""
    config = defaults.get_config()
    config.data.name = "lsun/church_outdoor"
    config.data.image_size = 256

    config.model.ch_mult = (1, 1, 2, 2, 4, 4)
    config.model.dropout = 0.0

    config.training.batch_size = 64
    config.training.num_train_steps = 1_200_000
    config.optim.learning_rate = 2e-5

    config.sampling.batch_size = 64
    config.eval.split = "validation"
    config.eval.batch_size = 64
    return config
