"""Tolerances for float32 results, shared by the tests.

Two separately compiled XLA programs of the same float32 computation (a jitted function and
its pieces, a sharded and an unsharded run, a vmapped and a batched call) may fuse and round
differently, and differently again on another CPU (AVX2, AVX-512): they agree to float32
rounding, not bit for bit. Exact equality is kept only where the same executable runs twice.
"""

import numpy as np

# float32 has 24 bits (~6e-8 relative); a few dozen roundings between two fusions of one
# computation stay well within 1e-5 of the result's scale.
F32_RTOL = 1e-5
F32_ATOL = 1e-6


def assert_f32_close(actual, desired, *, rtol: float = F32_RTOL, atol: float = F32_ATOL, **kw):
    """`assert_allclose` for float32 results of separately compiled programs.

    The absolute floor is `atol` times the largest magnitude of `desired` (at least 1), so
    that elements near zero of an array of unit scale are held to the rounding of that scale.
    """
    desired = np.asarray(desired, np.float64)
    scale = max(1.0, float(np.max(np.abs(desired)))) if desired.size else 1.0
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), desired, rtol=rtol, atol=atol * scale, **kw
    )
