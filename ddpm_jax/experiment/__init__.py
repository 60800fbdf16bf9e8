"""The experiment layer, shared by training, sampling, evaluation and the weight importer.

- `config`: the config parsed once into frozen typed views (`ExperimentConfig`), checked.
- `defaults`: the default config, which documents every field.
- `build`: config -> `Experiment` (network, schedule, reverse process, abstract parameters).
- `keys`: the named random streams of `config.training.seed`.
"""

from ddpm_jax.experiment.build import Experiment, make_model_fn
from ddpm_jax.experiment.config import ExperimentConfig, ReverseProcess
from ddpm_jax.experiment.keys import Stream, stream_key
from ddpm_jax.experiment.sampling_config import SamplingOptions

__all__ = [
    "Experiment",
    "ExperimentConfig",
    "ReverseProcess",
    "SamplingOptions",
    "Stream",
    "make_model_fn",
    "stream_key",
]
