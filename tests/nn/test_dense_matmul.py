"""qmatmul on a plain weight: float32 accumulation, x.dtype out, any leading shape, and the CPU single-row
case computed as two rows (XLA CPU's one-row dot is 10-15x slower) with the same result."""
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.nn.qdense import qmatmul


@pytest.mark.parametrize("lead", [(1,), (1, 1), (2, 3), (1, 5)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_plain_qmatmul_matches_float64(lead, dtype):
    rng = np.random.default_rng(zlib.crc32(repr((lead, jnp.dtype(dtype).name)).encode()))
    x = jnp.asarray(rng.standard_normal((*lead, 96)), dtype)
    w = jnp.asarray(rng.standard_normal((40, 96)) * 0.1, dtype)
    y = jax.jit(qmatmul)(x, w)
    assert y.shape == (*lead, 40) and y.dtype == dtype
    ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    tol = 1e-5 if dtype == jnp.float32 else 8e-3
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=tol, atol=tol * np.abs(ref).max())


def test_single_row_on_cpu_runs_as_two_rows():
    x = jnp.ones((1, 1, 8), jnp.bfloat16)
    w = jnp.ones((4, 8), jnp.bfloat16)
    dots = [e for e in jax.make_jaxpr(qmatmul)(x, w).eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 1
    rows = dots[0].invars[0].aval.shape[0]
    assert rows == (2 if jax.default_backend() == "cpu" else 1)
    two = [e for e in jax.make_jaxpr(qmatmul)(jnp.ones((2, 8)), w).eqns if e.primitive.name == "dot_general"]
    assert two[0].invars[0].aval.shape[0] == 2        # already two rows: no padding
