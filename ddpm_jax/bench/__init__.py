"""Throughput, compile time, memory and MFU of ddpm_jax, and of a PyTorch reference U-Net.

    results = bench.run(config, bench.BenchSettings(batch_size=8), reference="torch")
    print(bench.format_table(results))

The command line is `ddpm-jax-benchmark` (`bench/__main__.py`); BENCHMARKS.md at the
repository root records measured figures.
"""

from ddpm_jax.bench.common import PEAK_TFLOPS, BenchSettings, peak_tflops_for
from ddpm_jax.bench.report import format_table, run, write_json

__all__ = [
    "PEAK_TFLOPS",
    "BenchSettings",
    "format_table",
    "peak_tflops_for",
    "run",
    "write_json",
]
