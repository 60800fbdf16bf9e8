"""CelebA-HQ 256×256, Ho et al. (2020): 114M-parameter U-Net, batch 64, lr 2e-5, 0.5M steps.

TFDS's celeb_a_hq needs a manual download (see its catalog page) into `data.data_dir`; it
has only a train split, which evaluation also reads. Run with::

    ddpm-jax train --config=configs/celeba_hq256.py --workdir=/tmp/ddpm_celeba_hq256
"""

import ml_collections

from ddpm_jax.experiment import defaults


def get_config() -> ml_collections.ConfigDict:
    """Returns Ho et al.'s CelebA-HQ 256 configuration."""
    config = defaults.get_config()
    config.data.name = "celeb_a_hq/256"
    config.data.image_size = 256

    config.model.ch_mult = (1, 1, 2, 2, 4, 4)
    config.model.dropout = 0.0

    config.training.batch_size = 64
    config.training.num_train_steps = 500_000
    config.optim.learning_rate = 2e-5

    config.sampling.batch_size = 64
    config.eval.split = "train"
    config.eval.batch_size = 64
    return config
