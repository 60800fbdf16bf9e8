"""Test set-up: 8 fake CPU devices for sharding tests, float32 defaults, slow-test skipping.

XLA reads its flags once, when the backend starts, so they are set here before any test
module imports JAX.
"""

import os

_FLAGS = ("--xla_force_host_platform_device_count=8",)
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), *(f for f in _FLAGS if f not in os.environ.get("XLA_FLAGS", ""))]
).strip()
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
