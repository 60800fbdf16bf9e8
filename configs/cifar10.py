"""CIFAR-10 32×32, Ho et al. (2020): 35.7M-parameter U-Net, 800k steps at batch 128.

The default configuration is exactly this experiment (ch 128, ch_mult (1, 2, 2, 2), two
ResNet blocks per level, attention at 16×16, dropout 0.1, linear β schedule, T = 1000);
tests/test_models.py pins its parameter count to 35,746,307. Run with::

    ddpm-jax train --config=configs/cifar10.py --workdir=/tmp/ddpm_cifar10
"""

import ml_collections

from ddpm_jax.experiment import defaults


def get_config() -> ml_collections.ConfigDict:
    """Returns Ho et al.'s CIFAR-10 configuration."""
    return defaults.get_config()
