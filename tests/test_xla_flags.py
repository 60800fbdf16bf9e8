"""The XLA flag defaults that entry points set before JAX starts its backend."""

import os

from ddpm_jax.runtime import xla_flags

YNN = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def test_adds_the_measured_default_for_a_known_jaxlib():
    out = xla_flags.with_cpu_defaults("--xla_force_host_platform_device_count=8", "0.10")
    assert out.split() == ["--xla_force_host_platform_device_count=8", YNN]
    assert xla_flags.with_cpu_defaults("", "0.10") == YNN


def test_never_overrides_a_user_value_and_is_idempotent():
    user = "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"
    assert xla_flags.with_cpu_defaults(user, "0.10") == user
    once = xla_flags.with_cpu_defaults("", "0.10")
    assert xla_flags.with_cpu_defaults(once, "0.10") == once


def test_unknown_jaxlib_gets_no_flags():
    # XLA aborts on flags it does not know, so unmeasured versions get nothing added.
    assert xla_flags.with_cpu_defaults("--a=1", "0.99") == "--a=1"


def test_the_test_process_runs_with_the_defaults():
    # conftest applies the same defaults as `python -m ddpm_jax.main`, so that training runs
    # launched as subprocesses are bit-identical to runs inside the test process.
    assert os.environ["XLA_FLAGS"] == xla_flags.with_cpu_defaults(os.environ["XLA_FLAGS"])
