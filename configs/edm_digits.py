"""configs/digits.py trained as an EDM model (Karras et al. 2022): the offline demo, ~15 min.

Everything but the formulation is digits.py's (data, U-Net, batch, learning rate, EMA, run
length), so that the two train for the same time on the same network: the U-Net is wrapped
by EDM's preconditioning (its time embedding takes c_noise = ¼ ln σ), trained with
λ(σ) ‖D(x₀ + σn; σ) − x₀‖², ln σ ~ N(-1.2, 1.2²) (`config.edm`), and sampled with Heun's
method on the Karras grid in 18 steps (35 network evaluations). Run it from the repository
root::

    ddpm-jax train --config=configs/edm_digits.py --workdir=workdirs/edm_digits
"""

import ml_collections

from configs import digits


def get_config() -> ml_collections.ConfigDict:
    """Returns digits.py's config with the EDM formulation and its sampler."""
    config = digits.get_config()
    config.diffusion.formulation = "edm"
    config.sampling.sampler = "heun"
    config.sampling.num_steps = 18
    config.sampling.timestep_spacing = "endpoints"  # the DDPM chains' choice; unused here.
    return config
