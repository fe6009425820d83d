import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.formats.nvfp4 import NVFP4Tensor, fake_quant_nvfp4, quantize_nvfp4

from . import np_ref


def ref_quantize_nvfp4(w, global_amax=None):
    """ModelOpt NVFP4 (spec 2.4) in NumPy; returns (packed, block_scale e4m3, weight_scale_2)."""
    w = np_ref.f32(w)
    wb = w.reshape(*w.shape[:-1], -1, 16)
    if global_amax is None:
        global_amax = np.abs(w).max(axis=tuple(range(max(w.ndim - 2, 0), w.ndim)))
    global_amax = np.asarray(global_amax, np.float32)
    ws2 = np.where(global_amax == 0, np.float32(1), global_amax / np.float32(2688)).astype(np.float32)
    ws2_b = ws2.reshape(ws2.shape + (1,) * (wb.ndim - 1 - ws2.ndim))
    sb = np.abs(wb).max(-1) / (np.float32(6) * ws2_b)
    bs = np_ref.e4m3(np.where(sb == 0, np.float32(1), sb))
    d = (np_ref.f32(bs) * ws2_b)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.where(d == 0, np.float32(0), wb / d)
    codes = np_ref.e2m1_even(x).reshape(w.shape)
    return np_ref.pack_nibbles(codes), bs, ws2


def ref_dequantize(packed, bs, ws2):
    v = np_ref.E2M1_TABLE[np_ref.unpack_nibbles(packed)]
    v = v.reshape(*v.shape[:-1], -1, 16) * np_ref.f32(bs)[..., None]
    return (v * ws2.reshape(ws2.shape + (1,) * (v.ndim - ws2.ndim))).reshape(packed.shape[:-1] + (-1,))


def _assert_matches(t, packed, bs, ws2):
    assert t.packed.dtype == jnp.uint8 and t.block_scale.dtype == jnp.float8_e4m3fn
    assert t.global_scale.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(t.packed), packed)
    np.testing.assert_array_equal(np_ref.bits(t.block_scale), np_ref.bits(bs))
    np.testing.assert_array_equal(np.asarray(t.global_scale), ws2)


@pytest.mark.parametrize("shape", [(64, 80), (3, 32, 64), (1, 16), (200, 512)])
def test_quantize_nvfp4_bit_exact(shape):
    w = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32) * 0.05
    t = quantize_nvfp4(jnp.asarray(w))
    _assert_matches(t, *ref_quantize_nvfp4(w))
    assert t.shape == shape and t.packed.shape == shape[:-1] + (shape[-1] // 2,)
    assert t.block_scale.shape == shape[:-1] + (shape[-1] // 16,)
    np.testing.assert_array_equal(np.asarray(t.dequantize()), ref_dequantize(*ref_quantize_nvfp4(w)))


def test_shared_global_amax_for_fused_projections():
    rng = np.random.default_rng(21)
    q, k = rng.standard_normal((32, 64)).astype(np.float32), rng.standard_normal((16, 64)).astype(np.float32) * 3
    amax = max(np.abs(q).max(), np.abs(k).max())
    tq, tk = quantize_nvfp4(jnp.asarray(q), amax), quantize_nvfp4(jnp.asarray(k), amax)
    assert tq.global_scale == tk.global_scale == np.float32(amax) / np.float32(2688)
    _assert_matches(tq, *ref_quantize_nvfp4(q, amax))
    # one global amax per expert
    e = rng.standard_normal((2, 8, 32)).astype(np.float32)
    amax_e = np.array([5.0, 7.0], np.float32)
    _assert_matches(quantize_nvfp4(jnp.asarray(e), amax_e), *ref_quantize_nvfp4(e, amax_e))


def test_bf16_input():
    w = (np.random.default_rng(22).standard_normal((16, 128)) * 0.02).astype(jnp.bfloat16)
    _assert_matches(quantize_nvfp4(jnp.asarray(w)), *ref_quantize_nvfp4(w.astype(np.float32)))


def test_zero_and_underflowing_blocks_are_zero_safe():
    w = np.random.default_rng(23).standard_normal((4, 64)).astype(np.float32)
    w[0, :16] = 0  # zero block: scale 1.0
    w[1, 16:32] = 1e-9  # block scale rounds to 0 in e4m3
    t = quantize_nvfp4(jnp.asarray(w))
    _assert_matches(t, *ref_quantize_nvfp4(w))
    assert np.asarray(t.block_scale, np.float32)[0, 0] == 1.0 and np.asarray(t.block_scale, np.float32)[1, 1] == 0
    codes = np.asarray(t.codes())
    assert codes[0, :16].max() == 0 and codes[1, 16:32].max() == 0 and np.isfinite(np.asarray(t.dequantize())).all()
    z = quantize_nvfp4(jnp.zeros((2, 32)))
    assert z.global_scale == 1.0 and np.asarray(z.dequantize()).max() == 0


def ref_fake_quant_nvfp4(x, input_scale):
    """The fixtures README's torch port of ModelOpt's fp4_fake_quant_block, as a threshold chain."""
    xb = np_ref.f32(x).reshape(*x.shape[:-1], -1, 16)
    gs = np.float32(input_scale) * np.float32(2688) / np.float32(2688)
    bmax = np.abs(xb).max(-1, keepdims=True)
    sc = np_ref.f32(np_ref.e4m3(np.minimum(bmax / (np.float32(6) * gs), np.float32(448)))) * gs
    sc = np.where(sc >= np.float32(1e-5), sc, np.float32(1))
    a = np.abs(xb) / sc
    w = np.where
    m = w(a <= 0.25, 0, w(a < 0.75, 0.5, w(a <= 1.25, 1, w(a < 1.75, 1.5, w(a <= 2.5, 2, w(a < 3.5, 3, w(a <= 5, 4, 6)))))))
    q = np_ref.f32(m) * sc
    return w(xb >= 0, q, -q).reshape(x.shape)


def test_fake_quant_nvfp4_matches_modelopt_rule():
    rng = np.random.default_rng(24)
    x = (rng.standard_normal((8, 128)) * 2).astype(np.float32)
    x[0, :16] = 1e-7  # block scale below 1e-5 -> 1.0
    input_scale = np.float32(np.abs(x).max() / 2688 * 0.8)  # calibrated amax below this batch's: saturation
    np.testing.assert_array_equal(np.asarray(fake_quant_nvfp4(jnp.asarray(x), input_scale)),
                                  ref_fake_quant_nvfp4(x, input_scale))
    assert fake_quant_nvfp4(jnp.asarray(x, jnp.bfloat16), input_scale).dtype == jnp.bfloat16


def test_nvfp4_pytree_and_jit():
    w = jnp.asarray(np.random.default_rng(25).standard_normal((2, 16, 48)), jnp.float32)
    t = jax.jit(quantize_nvfp4)(w)
    assert isinstance(t, NVFP4Tensor) and len(jax.tree_util.tree_leaves(t)) == 3
    np.testing.assert_array_equal(np.asarray(jax.jit(NVFP4Tensor.dequantize)(t)), np.asarray(t.dequantize()))
    mapped = jax.vmap(quantize_nvfp4)(w)
    np.testing.assert_array_equal(np.asarray(mapped.packed), np.asarray(t.packed))
    np.testing.assert_array_equal(np.asarray(mapped.global_scale), np.asarray(t.global_scale))


def test_nvfp4_sqnr():
    w = np.random.default_rng(26).standard_normal((512, 1024)).astype(np.float32)
    db = np_ref.sqnr_db(w, quantize_nvfp4(jnp.asarray(w)).dequantize())
    print(f"nvfp4 SQNR {db:.2f} dB")
    assert db >= 20.2


def test_nvfp4_bad_inputs():
    with pytest.raises(ValueError, match=r"^quantize_nvfp4: w has K=100, expected a multiple of 16 \(NVFP4 block size\)$"):
        quantize_nvfp4(jnp.ones((4, 100)))
    with pytest.raises(ValueError, match=r"quantize_nvfp4: w contains 2 NaN/Inf values of 64"):
        quantize_nvfp4(jnp.ones((4, 16)).at[0, 0].set(jnp.inf).at[1, 1].set(jnp.nan))
    with pytest.raises(ValueError, match=r"quantize_nvfp4: w has dtype uint8, expected a floating dtype"):
        quantize_nvfp4(jnp.ones((4, 16), jnp.uint8))
    with pytest.raises(ValueError, match=r"quantize_nvfp4: global_amax contains 1 NaN/Inf"):
        quantize_nvfp4(jnp.ones((4, 16)), jnp.nan)
    with pytest.raises(ValueError, match=r"fake_quant_nvfp4: x has K=24, expected a multiple of 16"):
        fake_quant_nvfp4(jnp.ones((4, 24)), 1.0)
