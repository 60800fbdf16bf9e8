"""The default configuration; every field is documented in `ddpm_jax/experiment/defaults.py`.

Experiment configs import this module and change only what differs. Run one with::

    python -m ddpm_jax.main --config=configs/cifar10.py --workdir=workdirs/cifar10
"""

from ddpm_jax.experiment.defaults import get_config

__all__ = ["get_config"]
