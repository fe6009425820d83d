import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxq.formats.int4 import (Int4Tensor, g_idx_from_perm, perm_from_g_idx, quantize_int4, sort_by_g_idx)

from . import np_ref

EPS = np.finfo(np.float32).eps


def ref_params(wg, scheme, scale_dtype):
    """Spec formulas per group (last axis of wg); returns (stored scale as f32, unsigned zero or None, u)."""
    stored = lambda s: np.asarray(s, np.float32).astype(scale_dtype).astype(np.float32)
    div = lambda a, s: np.where(s == 0, 0, a / np.where(s == 0, 1, s))
    lo, hi = np.minimum(wg.min(-1), 0), np.maximum(wg.max(-1), 0)
    amax = np.abs(wg).max(-1)
    if scheme == "modelopt":
        s = stored(np.where(amax == 0, 1, amax / np.float32(7)))
        return s, None, np.clip(np.rint(div(wg, s[..., None])), -8, 7) + 8
    if scheme == "compressed_tensors":
        s = stored(np.maximum(amax / np.float32(7.5), EPS))
        return s, None, np.rint(np.clip(div(wg, s[..., None]), -8, 7)) + 8
    if scheme == "compressed_tensors_asym":
        s = stored(np.maximum((hi - lo) / np.float32(15), EPS))
        zp = np.rint(np.clip(np.float32(-8) - lo / s, -8, 7))
        return s, zp + 8, np.rint(np.clip(div(wg, s[..., None]) + zp[..., None], -8, 7)) + 8
    if scheme == "autoawq":
        s = stored(np.maximum(wg.max(-1) - wg.min(-1), np.float32(1e-5)) / np.float32(15))
        z = np.clip(-np.rint(wg.min(-1) / s), 0, 15)
        return s, z, np.clip(np.rint(div(wg, s[..., None])) + z[..., None], 0, 15)
    sym = scheme == "gptq"
    if sym:
        hi = np.maximum(np.abs(lo), hi)
        lo = np.where(lo < 0, -hi, lo)
    empty = (lo == 0) & (hi == 0)
    lo, hi = np.where(empty, -1, lo).astype(np.float32), np.where(empty, 1, hi).astype(np.float32)
    s = stored((hi - lo) / np.float32(15))
    z = np.full_like(s, 8) if sym else np.rint(-lo / s)
    return s, None if sym else z, np.clip(np.rint(div(wg, s[..., None])) + z[..., None], 0, 15)


def ref_quantize_int4(w, group_size, scheme, scale_dtype=np.float32, g_idx=None):
    w = np_ref.f32(w)
    k = w.shape[-1]
    group_size = k if group_size == -1 else group_size
    g = np.arange(k) // group_size if g_idx is None else np.asarray(g_idx)
    n_groups = k // group_size
    u = np.zeros(w.shape, np.uint8)
    scale = np.zeros(w.shape[:-1] + (n_groups,), np.float32)
    zero = np.zeros_like(scale)
    for j in range(n_groups):
        cols = np.nonzero(g == j)[0]
        s, z, uj = ref_params(w[..., cols], scheme, scale_dtype)
        u[..., cols], scale[..., j] = uj, s
        zero[..., j] = 8 if z is None else z
    asym = scheme in ("compressed_tensors_asym", "autoawq", "gptq_asym")
    return u, scale.astype(scale_dtype), zero.astype(np.uint8) if asym else None


def ref_dequantize(u, scale, zero, group_size, g_idx=None):
    g = np.arange(u.shape[-1]) // group_size if g_idx is None else np.asarray(g_idx)
    z = np.float32(8) if zero is None else zero[..., g].astype(np.float32)
    return (u.astype(np.float32) - z) * scale[..., g].astype(np.float32)


def _assert_matches(t, u, scale, zero):
    np.testing.assert_array_equal(np.asarray(t.codes()), u)
    assert t.scale.dtype == scale.dtype
    np.testing.assert_array_equal(np.asarray(t.scale).astype(np.float32), scale.astype(np.float32))
    if zero is None:
        assert t.zero is None
    else:
        assert t.zero.dtype == jnp.uint8
        np.testing.assert_array_equal(np.asarray(t.zero), zero)


CASES = [((64, 256), 128, np.float32), ((3, 16, 128), 32, np.float32), ((8, 96), -1, np.float32),
         ((32, 128), 64, ml_dtypes.bfloat16), ((16, 128), 128, np.float16)]


@pytest.mark.parametrize("scheme", ["modelopt", "compressed_tensors", "compressed_tensors_asym", "autoawq",
                                    "gptq", "gptq_asym"])
@pytest.mark.parametrize("shape,group_size,scale_dtype", CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_quantize_int4_bit_exact(scheme, shape, group_size, scale_dtype):
    rng = np.random.default_rng(abs(hash((scheme, shape))) % 2**32)
    w = (rng.standard_normal(shape) * 0.02 + rng.uniform(-0.01, 0.01, shape[:-1] + (1,))).astype(np.float32)
    w[..., 0, :8] = np.abs(w[..., 0, :8])  # a non-negative stretch (GPTQ's clipping quirk when a group is)
    t = quantize_int4(jnp.asarray(w), group_size, scheme=scheme, scale_dtype=scale_dtype)
    u, scale, zero = ref_quantize_int4(w, group_size, scheme, scale_dtype)
    _assert_matches(t, u, scale, zero)
    assert t.shape == shape and t.group_size == (shape[-1] if group_size == -1 else group_size)
    np.testing.assert_array_equal(np.asarray(t.dequantize()), ref_dequantize(u, scale, zero, t.group_size))


def test_modelopt_hand_example_and_zero_group():
    w = np.zeros((2, 8), np.float32)
    w[0] = [7, -7, 3.5, 2.5, -0.4, 0.5, 1.0, 6.9]  # amax 7 -> s = 1; half to even: 3.5 -> 4, 2.5 -> 2, 0.5 -> 0
    t = quantize_int4(jnp.asarray(w), 8)
    assert np.asarray(t.scale).tolist() == [[1.0], [1.0]]  # the all-zero row gets scale 1.0
    assert (np.asarray(t.codes()).astype(int) - 8).tolist() == [[7, -7, 4, 2, 0, 0, 1, 7], [0] * 8]
    assert t.zero is None and t.packed.tolist()[0][0] == (7 + 8) | ((-7 + 8) << 4)


def test_zero_groups_per_scheme():
    w = jnp.zeros((1, 32))
    expected_scale = {"modelopt": 1.0, "compressed_tensors": EPS, "compressed_tensors_asym": EPS,
                      "autoawq": np.float32(1e-5) / np.float32(15), "gptq": np.float32(2) / np.float32(15),
                      "gptq_asym": np.float32(2) / np.float32(15)}
    for scheme, s in expected_scale.items():
        t = quantize_int4(w, 32, scheme=scheme)
        assert np.asarray(t.scale)[0, 0] == np.float32(s), scheme
        assert np.asarray(t.dequantize()).max() == 0 and np.isfinite(np.asarray(t.dequantize())).all(), scheme
    # GPTQ asym: 1 / f32(2/15) = 7.4999996 rounds to zero point 7
    assert np.asarray(quantize_int4(w, 32, scheme="gptq_asym").zero)[0, 0] == 7


def test_gptq_symmetric_non_negative_group_clips():
    w = np.linspace(0, 1, 16, dtype=np.float32)[None]
    t = quantize_int4(jnp.asarray(w), 16, scheme="gptq")
    assert np.asarray(t.scale)[0, 0] == np.float32(1) / np.float32(15)  # xmin stays 0: s = xmax / 15
    assert np.asarray(t.dequantize()).max() == np.float32(7) * (np.float32(1) / np.float32(15))


def test_act_order_g_idx():
    rng = np.random.default_rng(41)
    w = rng.standard_normal((24, 256)).astype(np.float32)
    perm = rng.permutation(256)
    g_idx = g_idx_from_perm(jnp.asarray(perm), 64)
    np.testing.assert_array_equal(np.asarray(g_idx)[perm], np.arange(256) // 64)
    np.testing.assert_array_equal(np.asarray(g_idx_from_perm(perm_from_g_idx(g_idx), 64)), np.asarray(g_idx))
    for scheme in ("gptq", "gptq_asym"):
        t = quantize_int4(jnp.asarray(w), 64, scheme=scheme, g_idx=g_idx)
        u, scale, zero = ref_quantize_int4(w, 64, scheme, g_idx=np.asarray(g_idx))
        _assert_matches(t, u, scale, zero)
        np.testing.assert_array_equal(np.asarray(t.dequantize()), ref_dequantize(u, scale, zero, 64, g_idx))
        # kernels: sort K once so groups are contiguous, permute activations the same way
        t_sorted, p = sort_by_g_idx(t)
        assert t_sorted.g_idx is None
        np.testing.assert_array_equal(np.asarray(t_sorted.dequantize()), np.asarray(t.dequantize())[:, np.asarray(p)])


def test_int4_pytree_jit_vmap():
    w = jnp.asarray(np.random.default_rng(42).standard_normal((2, 8, 64)), jnp.float32)
    t = jax.jit(lambda v: quantize_int4(v, 32, scheme="autoawq"))(w)
    assert isinstance(t, Int4Tensor) and len(jax.tree_util.tree_leaves(t)) == 3
    assert len(jax.tree_util.tree_leaves(quantize_int4(w, 32))) == 2  # zero None is not a leaf
    mapped = jax.vmap(lambda v: quantize_int4(v, 32, scheme="autoawq"))(w)
    np.testing.assert_array_equal(np.asarray(mapped.dequantize()), np.asarray(t.dequantize()))


@pytest.mark.parametrize("scheme,floor_db", [("modelopt", 18.4), ("autoawq", 19.8), ("gptq", 18.9),
                                             ("compressed_tensors", 18.9)])
def test_int4_g128_sqnr(scheme, floor_db):
    w = np.random.default_rng(43).standard_normal((512, 1024)).astype(np.float32)
    db = np_ref.sqnr_db(w, quantize_int4(jnp.asarray(w), 128, scheme=scheme).dequantize())
    print(f"int4 g128 {scheme} SQNR {db:.2f} dB")
    assert db >= floor_db


def test_int4_bad_inputs():
    with pytest.raises(ValueError, match=r"^quantize_int4: w has K=100, expected a multiple of 128 \(group size\)$"):
        quantize_int4(jnp.ones((4, 100)), 128)
    with pytest.raises(ValueError, match=r"quantize_int4: w has K=7, expected a multiple of 2 \(two INT4 codes"):
        quantize_int4(jnp.ones((4, 7)), -1)
    with pytest.raises(ValueError, match=r"quantize_int4: scheme='awq', expected one of \('modelopt'"):
        quantize_int4(jnp.ones((4, 8)), 8, scheme="awq")
    with pytest.raises(ValueError, match=r"quantize_int4: scale_dtype=dtype\('int8'\), expected one of"):
        quantize_int4(jnp.ones((4, 8)), 8, scale_dtype=jnp.int8)
    with pytest.raises(ValueError, match=r"quantize_int4: group_size=0, expected a positive size or -1"):
        quantize_int4(jnp.ones((4, 8)), 0)
    with pytest.raises(ValueError, match=r"quantize_int4: w contains 1 NaN/Inf values of 32"):
        quantize_int4(jnp.ones((4, 8)).at[2, 2].set(jnp.nan), 8)
    with pytest.raises(ValueError, match=r"quantize_int4: g_idx has shape \(8,\), expected \(16,\)"):
        quantize_int4(jnp.ones((4, 16)), 8, g_idx=jnp.zeros(8, jnp.int32))
    with pytest.raises(ValueError, match=r"quantize_int4: g_idx puts 9 channels in group 0, expected 8 \(group_size\)"):
        quantize_int4(jnp.ones((4, 16)), 8, g_idx=jnp.asarray([0] * 9 + [1] * 7))
    with pytest.raises(ValueError, match=r"quantize_int4: g_idx has values in \[0, 2\], expected values in \[0, 1\]"):
        quantize_int4(jnp.ones((4, 16)), 8, g_idx=jnp.asarray([0] * 8 + [2] * 8))
    with pytest.raises(ValueError, match=r"sort_by_g_idx: t has no g_idx"):
        sort_by_g_idx(quantize_int4(jnp.ones((4, 16)), 8))
