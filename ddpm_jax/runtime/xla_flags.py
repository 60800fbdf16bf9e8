"""XLA flags that entry points (not library code) set before JAX starts its backend.

XLA reads `XLA_FLAGS` once, when the first backend initialises, so `main.py`, the benchmark and
the test set-up call `with_cpu_defaults` before anything imports JAX's backend. Library modules
never touch the environment.

The one default: on jaxlib 0.10, `--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`
routes the U-Net's convolutions through XLA CPU's fused path instead of one YNNPACK call per
convolution; on a 2-core CPU it makes the CIFAR-10 U-Net's train step about 1.5× faster (the
forward pass alone is unchanged; see BENCHMARKS.md). The flag is only added for jaxlib versions
where it was measured (XLA aborts on unknown flags, and flag names change between versions) and
never overrides a value the user set. It affects only the CPU backend.
"""

from __future__ import annotations

import importlib.metadata

CPU_FLAGS_BY_JAXLIB = {
    "0.10": ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",),
}


def _jaxlib_minor() -> str | None:
    try:
        version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return None
    return ".".join(version.split(".")[:2])


def with_cpu_defaults(xla_flags: str, jaxlib_version: str | None = None) -> str:
    """`xla_flags` plus this project's measured CPU defaults for the installed jaxlib.

    Args:
      xla_flags: the current value of `XLA_FLAGS` ("" if unset).
      jaxlib_version: "major.minor" to select defaults for; default: the installed jaxlib.

    Returns:
      The new `XLA_FLAGS` value; a flag whose name the user already set is left as it is.
    """
    minor = jaxlib_version or _jaxlib_minor()
    flags = xla_flags.split()
    set_names = {f.split("=", 1)[0].lstrip("-") for f in flags}
    for flag in CPU_FLAGS_BY_JAXLIB.get(minor or "", ()):
        if flag.split("=", 1)[0].lstrip("-") not in set_names:
            flags.append(flag)
    return " ".join(flags)
