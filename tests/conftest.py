"""Test set-up: 8 fake CPU devices, a persistent compilation cache, slow-test skipping.

XLA reads its flags once, when the backend starts, so they are set here before any test
module imports JAX. The environment (not `jax.config`) carries them so that the training
subprocesses the tests launch get them too. The compilation cache lets the many short
training runs of the tests (and their subprocesses) compile each program once.
"""

import os

# JAX reads its JAX_* settings when it is first imported (below, through ddpm_jax).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(_ROOT, ".pytest_cache", "jax_compilation_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

from ddpm_jax.runtime import xla_flags  # noqa: E402  (imports JAX, starts no backend)

_FLAGS = ("--xla_force_host_platform_device_count=8",)
os.environ["XLA_FLAGS"] = " ".join(
    [
        os.environ.get("XLA_FLAGS", ""),
        *(f for f in _FLAGS if f not in os.environ.get("XLA_FLAGS", "")),
    ]
).strip()
# The same defaults as `python -m ddpm_jax.main`, so that runs the tests launch as
# subprocesses and runs in this process compute bit-identical numbers.
os.environ["XLA_FLAGS"] = xla_flags.with_cpu_defaults(os.environ["XLA_FLAGS"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Skips tests marked `slow` when CI=true (the CI run must stay short on 2 cores)."""
    if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        return
    skip = pytest.mark.skip(reason="slow test; skipped when CI=true")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
