import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.formats.mxfp4 import MXFP4Tensor, quantize_mxfp4

from . import np_ref


def ref_quantize_mxfp4(w):
    """ModelOpt MXFP4 (spec 2.5) in NumPy: e = ceil(log2(amax/6)) >= -127, codes with ties down."""
    wb = np_ref.f32(w).reshape(*w.shape[:-1], -1, 32)
    u = np_ref.e8m0_ceil(np.abs(wb).max(-1) / np.float32(6))
    scaled = wb / np.ldexp(np.float32(1), u.astype(np.int32) - 127)[..., None]
    return np_ref.pack_nibbles(np_ref.e2m1_down(scaled).reshape(w.shape)), u


@pytest.mark.parametrize("shape", [(64, 96), (2, 16, 256), (1, 32)])
def test_quantize_mxfp4_bit_exact(shape):
    w = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32) * 0.1
    t = quantize_mxfp4(jnp.asarray(w))
    packed, u = ref_quantize_mxfp4(w)
    assert t.packed.dtype == jnp.uint8 and t.scale.dtype == jnp.uint8 and t.shape == shape
    np.testing.assert_array_equal(np.asarray(t.packed), packed)
    np.testing.assert_array_equal(np.asarray(t.scale), u)
    expected = np_ref.E2M1_TABLE[np_ref.unpack_nibbles(packed)].reshape(*shape[:-1], -1, 32)
    expected = (expected * 2.0 ** (u.astype(np.float32) - 127)[..., None]).reshape(shape)
    np.testing.assert_array_equal(np.asarray(t.dequantize()), expected)


def test_power_of_two_amax_and_ties_round_down():
    # amax 6 * 2**-3 -> e = -3 exactly (no round-up); 2.5 * 2**-3 is an exact tie -> 2, not 3
    w = np.zeros((1, 32), np.float32)
    w[0, :4] = np.array([6.0, 2.5, -0.75, 5.0]) * 2.0**-3
    t = quantize_mxfp4(jnp.asarray(w))
    assert t.scale.tolist() == [[127 - 3]]
    assert np.asarray(t.codes())[0, :4].tolist() == [7, 4, 9, 6]


def test_zero_block_is_zero_safe():
    w = np.random.default_rng(31).standard_normal((2, 64)).astype(np.float32)
    w[0, 32:] = 0
    t = quantize_mxfp4(jnp.asarray(w))
    assert np.asarray(t.scale)[0, 1] == 0 and np.asarray(t.codes())[0, 32:].max() == 0
    deq = np.asarray(t.dequantize())
    assert np.isfinite(deq).all() and (deq[0, 32:] == 0).all()


def test_mxfp4_pytree_jit_and_bf16():
    w = np.random.default_rng(32).standard_normal((3, 8, 64)).astype(jnp.bfloat16)
    t = jax.jit(quantize_mxfp4)(jnp.asarray(w))
    assert isinstance(t, MXFP4Tensor) and len(jax.tree_util.tree_leaves(t)) == 2
    packed, u = ref_quantize_mxfp4(w.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(t.packed), packed)
    np.testing.assert_array_equal(np.asarray(t.scale), u)
    assert t.dequantize(jnp.bfloat16).dtype == jnp.bfloat16


def test_mxfp4_sqnr():
    w = np.random.default_rng(33).standard_normal((512, 1024)).astype(np.float32)
    db = np_ref.sqnr_db(w, quantize_mxfp4(jnp.asarray(w)).dequantize())
    print(f"mxfp4 SQNR {db:.2f} dB")
    assert db >= 18.5


def test_mxfp4_bad_inputs():
    with pytest.raises(ValueError, match=r"^quantize_mxfp4: w has K=80, expected a multiple of 32 \(MXFP4 block size\)$"):
        quantize_mxfp4(jnp.ones((4, 80)))
    with pytest.raises(ValueError, match=r"quantize_mxfp4: w contains 1 NaN/Inf values of 128"):
        quantize_mxfp4(jnp.ones((4, 32)).at[3, 3].set(-jnp.inf))
    with pytest.raises(ValueError, match=r"quantize_mxfp4: w has dtype int8, expected a floating dtype"):
        quantize_mxfp4(jnp.ones((4, 32), jnp.int8))
