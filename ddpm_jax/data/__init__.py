"""Data: `config.data` (`DataConfig`), the datasets it can name, and the input pipeline.

- `config`: `DataConfig` (the typed `config.data`) and `DatasetInfo`.
- `sources`: a config's split as a checked random-access source, dispatching on
  `data.source`: TFDS (`digits`, the embedded offline dataset, is a TFDS builder), an image
  `folder`, a `huggingface` dataset, or a prepared `arrayrecord` directory; `decode` holds
  their shared decode and resize, `splits` the hashed held-out split.
- `prepare` (`ddpm-jax-data prepare`): any source -> raw-pixel ArrayRecord files.
- `pipeline`: sources -> Grain -> per-process NumPy batches; batch s is a pure function of
  (seed, s).

This file imports only the config, so that what needs no data (sampling) stays light.
"""

from ddpm_jax.data.config import DataConfig, DatasetInfo

__all__ = ["DataConfig", "DatasetInfo"]
