"""QDense / qmatmul orientation and precision, RMSNorm conventions, gated MLP."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.nn.mlp import GatedMLP, activation
from jaxq.nn.qdense import QDense, qmatmul
from jaxq.nn.rms_norm import RMSNorm


def test_qmatmul_is_x_times_w_transposed_in_x_dtype():
    rng = np.random.RandomState(0)
    x, w = rng.randn(2, 3, 5).astype(np.float32), rng.randn(4, 5).astype(np.float32)  # w [N, K]
    np.testing.assert_allclose(np.asarray(qmatmul(jnp.asarray(x), jnp.asarray(w))), x @ w.T, rtol=1e-5)
    y = qmatmul(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w))
    assert y.dtype == jnp.bfloat16 and y.shape == (2, 3, 4)


def test_qdense_params_and_bias():
    dense = QDense(4, use_bias=True, dtype=jnp.float32)
    params = dense.init(jax.random.key(0), jnp.ones((1, 5)))["params"]
    assert params["weight"].shape == (4, 5) and params["bias"].shape == (4,)
    params = {"weight": jnp.ones((4, 5)), "bias": jnp.arange(4.0)}
    np.testing.assert_array_equal(np.asarray(dense.apply({"params": params}, jnp.ones((1, 5)))), [[5, 6, 7, 8]])


@pytest.mark.parametrize("unit_offset", [False, True])
def test_rms_norm_conventions(unit_offset):
    x = np.random.RandomState(1).randn(2, 6).astype(np.float32)
    w = np.linspace(-0.5, 0.5, 6).astype(np.float32)
    out = RMSNorm(1e-6, unit_offset=unit_offset).apply({"params": {"weight": jnp.asarray(w)}}, jnp.asarray(x))
    scale = 1 + w if unit_offset else w
    ref = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * scale
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5)


def test_gated_mlp():
    rng = np.random.RandomState(2)
    x = rng.randn(3, 4).astype(np.float32)
    gate, up, down = rng.randn(6, 4), rng.randn(6, 4), rng.randn(4, 6)
    params = {"gate_proj": {"weight": gate}, "up_proj": {"weight": up}, "down_proj": {"weight": down}}
    out = GatedMLP(6, "silu").apply({"params": jax.tree.map(jnp.float32, params)}, jnp.asarray(x))
    g = x @ gate.T
    np.testing.assert_allclose(np.asarray(out), (g / (1 + np.exp(-g)) * (x @ up.T)) @ down.T, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="relu2"):
        activation("relu2")
