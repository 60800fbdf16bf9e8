"""Data: `config.data` (`DataConfig`), the datasets it can name, and the input pipeline.

- `config`: `DataConfig` (the typed `config.data`) and `DatasetInfo`.
- `sources`: a config's split as a checked random-access source; `digits`: the embedded
  offline dataset (a TFDS builder).
- `pipeline`: sources -> Grain -> per-process NumPy batches; batch s is a pure function of
  (seed, s).

This file imports only the config, so that what needs no data (sampling) stays light.
"""

from ddpm_jax.data.config import DataConfig, DatasetInfo

__all__ = ["DataConfig", "DatasetInfo"]
