"""INT4 on-disk layouts: NumPy packers written from the spec, hand-computed words, round trips."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.formats import (Int4Tensor, from_autoawq, from_compressed_tensors_int4, from_gptq, from_modelopt_int4,
                          quantize_int4, to_autoawq, to_compressed_tensors_int4, to_gptq, to_modelopt_int4)

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def np_words(nibbles, order=range(8)):
    """[..., 8m] nibbles -> int32 [..., m]; slot i (bits 4i) of word c holds element 8c + order[i]."""
    n = np.asarray(nibbles, np.uint64).reshape(*np.shape(nibbles)[:-1], -1, 8)
    word = sum(n[..., o] << np.uint64(4 * i) for i, o in enumerate(order))
    return word.astype(np.uint32).view(np.int32)


def i32(x):
    return np.array(x, np.uint32).view(np.int32)


def rng_int4(seed, shape, g, asym=True):
    rng = np.random.default_rng(seed)
    u = rng.integers(0, 16, shape, dtype=np.uint8)
    s = rng.uniform(0.001, 0.01, shape[:-1] + (shape[-1] // g,)).astype(np.float16)
    z = rng.integers(0, 16, s.shape, dtype=np.uint8) if asym else None
    return u, s, z


def canonical(u, s, z, g, g_idx=None):
    return Int4Tensor(packed=jnp.asarray(u[..., 0::2] | (u[..., 1::2] << 4)), scale=jnp.asarray(s), group_size=g,
                      zero=None if z is None else jnp.asarray(z), g_idx=g_idx)


def np_dequant(u, s, z, g, g_idx=None):
    gi = np.arange(u.shape[-1]) // g if g_idx is None else np.asarray(g_idx)
    zf = np.float32(8) if z is None else z[..., gi].astype(np.float32)
    return (u.astype(np.float32) - zf) * s[..., gi].astype(np.float32)


# ------------------------------------------------------------------ ModelOpt: U8 [N/2, K], along N, signed
def test_modelopt_int4_byte_example():
    # q[0] = (-8, 7), q[1] = (1, -1): byte[0, k] = q[0, k] & 0xF | (q[1, k] & 0xF) << 4
    weight = jnp.asarray([[0x18, 0xF7]], jnp.uint8)
    t = from_modelopt_int4(weight, jnp.asarray([[0.5], [2.0]], jnp.float32))
    assert (np.asarray(t.codes()).astype(int) - 8).tolist() == [[-8, 7], [1, -1]]
    assert np.asarray(t.dequantize()).tolist() == [[-4.0, 3.5], [2.0, -2.0]]
    assert np.asarray(to_modelopt_int4(t)["weight"]).tolist() == [[0x18, 0xF7]]


@pytest.mark.parametrize("shape", [(16, 256), (3, 8, 128)])
def test_modelopt_int4_round_trip(shape):
    q = np.random.default_rng(51).integers(-8, 8, shape)
    weight = ((q[..., 0::2, :] & 0xF) | ((q[..., 1::2, :] & 0xF) << 4)).astype(np.uint8)
    scale = np.random.default_rng(52).uniform(0.01, 0.1, shape[:-1] + (shape[-1] // 128,)).astype(np.float32)
    t = from_modelopt_int4(jnp.asarray(weight), jnp.asarray(scale))
    assert t.group_size == 128 and t.zero is None and t.shape == shape
    np.testing.assert_array_equal(np.asarray(t.dequantize()), q.astype(np.float32) * np.repeat(scale, 128, -1))
    out = to_modelopt_int4(t)
    np.testing.assert_array_equal(np.asarray(out["weight"]), weight)
    np.testing.assert_array_equal(np.asarray(out["weight_scale"]), scale)


def test_modelopt_int4_errors():
    with pytest.raises(ValueError, match=r"from_modelopt_int4: weight_scale has shape \(4, 1\), expected \(8, 1\) "
                                         r"\(\[\.\.\., N, K/G\] with N = 2 \* weight.shape\[-2\] = 8\)"):
        from_modelopt_int4(jnp.zeros((4, 128), jnp.uint8), jnp.ones((4, 1)))
    with pytest.raises(ValueError, match=r"from_modelopt_int4: weight has dtype int8, expected uint8"):
        from_modelopt_int4(jnp.zeros((4, 128), jnp.int8), jnp.ones((8, 1)))
    with pytest.raises(ValueError, match=r"to_modelopt_int4: t has a zero point; ModelOpt INT4 is symmetric"):
        to_modelopt_int4(quantize_int4(jnp.ones((8, 32)), 32, scheme="autoawq"))


# ------------------------------------------------------------------ AutoAWQ GEMM: I32 [K, N/8] interleaved
def test_autoawq_word_examples():
    # columns 0..7 hold 0..7: slot i holds column ORDER[i] -> nibbles 0,2,4,6,1,3,5,7 from bit 0 up
    assert np_words(np.arange(8), AWQ_ORDER).tolist() == [i32(0x75316420)]
    u = np.zeros((8, 2), np.uint8)  # canonical [N, K]; qweight row k covers columns n = 0..7
    u[:, 0], u[:, 1] = np.arange(8), np.arange(8, 16)
    t = canonical(u, np.ones((8, 1), np.float16), np.full((8, 1), 8, np.uint8), 2)
    out = to_autoawq(t)
    # column values 8..15 -> 0xFDB9ECA8, top nibble 15: a negative int32
    assert np.asarray(out["qweight"]).tolist() == [[i32(0x75316420)], [i32(0xFDB9ECA8)]]
    assert np.asarray(out["qzeros"]).tolist() == [[i32(0x88888888)]]
    back = from_autoawq(out["qweight"], out["qzeros"], out["scales"])
    np.testing.assert_array_equal(np.asarray(back.codes()), u)


def test_autoawq_round_trip_against_numpy_packer():
    u, s, z = rng_int4(53, (64, 256), 128)  # canonical [N, K]
    qweight, qzeros = np_words(u.T, AWQ_ORDER), np_words(z.T, AWQ_ORDER)
    t = from_autoawq(jnp.asarray(qweight), jnp.asarray(qzeros), jnp.asarray(s.T))
    np.testing.assert_array_equal(np.asarray(t.codes()), u)
    np.testing.assert_array_equal(np.asarray(t.zero), z)
    np.testing.assert_array_equal(np.asarray(t.dequantize()), np_dequant(u, s, z, 128))
    out = to_autoawq(t)
    np.testing.assert_array_equal(np.asarray(out["qweight"]), qweight)
    np.testing.assert_array_equal(np.asarray(out["qzeros"]), qzeros)
    assert out["scales"].dtype == jnp.float16


def test_autoawq_errors():
    with pytest.raises(ValueError, match=r"from_autoawq: qzeros has shape \(2, 4\), expected \(1, 4\) \(\[K/G, N/8\]\)"):
        from_autoawq(jnp.zeros((128, 4), jnp.int32), jnp.zeros((2, 4), jnp.int32), jnp.ones((1, 32), jnp.float16))
    with pytest.raises(ValueError, match=r"from_autoawq: qweight has dtype uint32, expected int32"):
        from_autoawq(jnp.zeros((128, 4), jnp.uint32), jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 32)))
    with pytest.raises(ValueError, match=r"to_autoawq: t has N=12, expected a multiple of 8"):
        to_autoawq(quantize_int4(jnp.ones((12, 32)), 32, scheme="autoawq"))


# ------------------------------------------------------------------ GPTQ: qweight along K, qzeros along N
def test_gptq_word_examples():
    # qweight word r bits 4j = row 8r + j; a v1 zero nibble 7 means zero point 8
    qweight = np.full((1, 8), i32(0x76543210))
    qzeros = np.full((1, 1), i32(0x77777777))
    t = from_gptq(jnp.asarray(qweight), jnp.asarray(qzeros), jnp.ones((1, 8), jnp.float16), version=1, sym=True)
    assert t.zero is None and np.asarray(t.codes())[0].tolist() == list(range(8))
    assert np.asarray(t.dequantize())[0].tolist() == [-8, -7, -6, -5, -4, -3, -2, -1]
    t2 = from_gptq(jnp.asarray(qweight), jnp.asarray(np.full((1, 1), i32(0x88888888))), jnp.ones((1, 8)), version=2)
    assert np.asarray(t2.zero).tolist() == [[8]] * 8
    assert np.asarray(to_gptq(t2, version=1)["qzeros"]).tolist() == [[i32(0x77777777)]]
    assert np.asarray(to_gptq(t2, version=2)["qzeros"]).tolist() == [[i32(0x88888888)]]


@pytest.mark.parametrize("version", [1, 2])
def test_gptq_round_trip_against_numpy_packer(version):
    u, s, z = rng_int4(54 + version, (32, 256), 64)
    z = np.maximum(z, 1) if version == 1 else z  # v1 cannot store zero 0
    perm = np.random.default_rng(56).permutation(256)
    g_idx = np.zeros(256, np.int32)
    g_idx[perm] = np.arange(256) // 64
    qweight = np_words(u).T  # along K: word [r, n] holds rows 8r..8r+7 of column n
    qzeros = np_words(z.T - (1 if version == 1 else 0))
    t = from_gptq(jnp.asarray(qweight), jnp.asarray(qzeros), jnp.asarray(s.T), jnp.asarray(g_idx), version=version)
    np.testing.assert_array_equal(np.asarray(t.codes()), u)
    np.testing.assert_array_equal(np.asarray(t.zero), z)
    np.testing.assert_array_equal(np.asarray(t.g_idx), g_idx)
    np.testing.assert_array_equal(np.asarray(t.dequantize()), np_dequant(u, s, z, 64, g_idx))
    out = to_gptq(t, version=version)
    for name, expected in [("qweight", qweight), ("qzeros", qzeros), ("scales", s.T), ("g_idx", g_idx)]:
        np.testing.assert_array_equal(np.asarray(out[name]), expected)


def test_gptq_trivial_g_idx_dropped_and_errors():
    u, s, z = rng_int4(57, (8, 64), 32)
    out = to_gptq(canonical(u, s, z + (z == 0), 32), version=1)
    np.testing.assert_array_equal(np.asarray(out["g_idx"]), np.arange(64) // 32)
    assert from_gptq(out["qweight"], out["qzeros"], out["scales"], out["g_idx"]).g_idx is None
    with pytest.raises(ValueError, match=r"to_gptq: t.zero has values in \[0, 15\], expected values in \[1, 16\]"):
        to_gptq(canonical(u, s, np.where(np.arange(2) == 0, 0, 15).astype(np.uint8) * np.ones_like(z), 32))
    with pytest.raises(ValueError, match=r"from_gptq: zero points of qzeros \(sym=True\) has values in \[1, 16\], "
                                         r"expected values in \[8, 8\]"):
        from_gptq(out["qweight"], jnp.asarray(np_words(np.tile([0, 15], (2, 4)))), out["scales"], sym=True)
    with pytest.raises(ValueError, match=r"from_gptq: g_idx has shape \(32,\), expected \(64,\)"):
        from_gptq(out["qweight"], out["qzeros"], out["scales"], jnp.zeros(32, jnp.int32))
    with pytest.raises(ValueError, match=r"from_gptq: version=3, expected one of \(1, 2\)"):
        from_gptq(out["qweight"], out["qzeros"], out["scales"], version=3)


# ------------------------------------------------------------------ compressed-tensors pack-quantized
def test_compressed_tensors_word_and_offset_example():
    # signed q = -8..-1 stored as q + 8 = 0..7 at bits 4j; signed 7 -> nibble 15 (top bit set)
    w = np.full((1, 1), i32(0x76543210))
    t = from_compressed_tensors_int4(jnp.asarray(w), jnp.ones((1, 1), jnp.bfloat16))
    assert np.asarray(t.dequantize()).tolist() == [[-8, -7, -6, -5, -4, -3, -2, -1]]
    t7 = from_compressed_tensors_int4(jnp.asarray(np.full((1, 1), i32(0xF0000000))), jnp.ones((1, 1)))
    assert np.asarray(t7.dequantize())[0].tolist() == [-8] * 7 + [7]
    # zero point packed along N: row 8r + j in nibble j of [r, g]; stored zp + 8
    zp = np.full((1, 1), i32(0x00000009))  # row 0: zp = 1, rows 1..7: zp = -8
    tz = from_compressed_tensors_int4(jnp.asarray(np.full((8, 1), i32(0x88888888))), jnp.ones((8, 1)),
                                      weight_zero_point=jnp.asarray(zp))
    assert np.asarray(tz.dequantize())[:, 0].tolist() == [-1] + [8] * 7


@pytest.mark.parametrize("n,k,g", [(16, 256, 128), (10, 12, 4)])
def test_compressed_tensors_round_trip_with_padding(n, k, g):
    u, s, z = rng_int4(58 + k, (n, k), g)
    up = np.pad(u, [(0, 0), (0, -k % 8)])
    zpad = np.pad(z, [(0, -n % 8), (0, 0)])
    weight_packed, zero_point = np_words(up), np_words(zpad.T).T
    t = from_compressed_tensors_int4(jnp.asarray(weight_packed), jnp.asarray(s), jnp.asarray([n, k]),
                                     jnp.asarray(zero_point))
    np.testing.assert_array_equal(np.asarray(t.codes()), u)
    np.testing.assert_array_equal(np.asarray(t.zero), z)
    np.testing.assert_array_equal(np.asarray(t.dequantize()), np_dequant(u, s, z, g))
    out = to_compressed_tensors_int4(t)
    np.testing.assert_array_equal(np.asarray(out["weight_packed"]), weight_packed)
    np.testing.assert_array_equal(np.asarray(out["weight_zero_point"]), zero_point)
    assert np.asarray(out["weight_shape"]).tolist() == [n, k] and "weight_g_idx" not in out


def test_compressed_tensors_errors():
    with pytest.raises(ValueError, match=r"from_compressed_tensors_int4: weight_packed has shape \(4, 2\), expected "
                                         r"\(4, 3\) \(\[N, ceil\(K/8\)\] for weight_shape \(4, 20\)\)"):
        from_compressed_tensors_int4(jnp.zeros((4, 2), jnp.int32), jnp.ones((4, 1)), jnp.asarray([4, 20]))
    with pytest.raises(ValueError, match=r"from_compressed_tensors_int4: weight_zero_point has shape \(4, 1\), "
                                         r"expected \(1, 1\)"):
        from_compressed_tensors_int4(jnp.zeros((4, 2), jnp.int32), jnp.ones((4, 1)),
                                     weight_zero_point=jnp.zeros((4, 1), jnp.int32))
    with pytest.raises(ValueError, match=r"from_compressed_tensors_int4: weight_shape has K=15, expected a multiple of 2"):
        from_compressed_tensors_int4(jnp.zeros((4, 2), jnp.int32), jnp.ones((4, 1)), jnp.asarray([4, 15]))
