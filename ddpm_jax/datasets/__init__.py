"""TFDS datasets embedded in the package, and the opening of any dataset named by a config.

`digits` builds scikit-learn's handwritten digits into the TFDS data_dir with no network;
`sources` turns `config.data` into a checked, random-access TFDS data source.
"""

from ddpm_jax.datasets import digits, sources
from ddpm_jax.datasets.sources import EMBEDDED

__all__ = ["EMBEDDED", "digits", "sources"]
