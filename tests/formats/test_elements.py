import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.formats import elements as el

from . import np_ref

MIDPOINTS = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)


def _e2m1_inputs(seed):
    rng = np.random.default_rng(seed)
    ties = np.concatenate([MIDPOINTS, -MIDPOINTS, np_ref.E2M1_TABLE[1:8], [6.5, 100.0, -7.0]])
    return np.concatenate([ties, rng.standard_normal(4000) * 3, rng.uniform(-8, 8, 4000)]).astype(np.float32)


def test_e2m1_tie_table_by_hand():
    # ModelOpt NVFP4 (round half to even) and ModelOpt MXFP4 (ties toward the smaller magnitude), spec 0.2
    assert el.encode_e2m1(jnp.asarray(MIDPOINTS)).tolist() == [0, 2, 2, 4, 4, 6, 6]
    assert el.encode_e2m1(jnp.asarray(MIDPOINTS), ties="down").tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert el.encode_e2m1(jnp.asarray([-0.1, 0.0, -6.0, 1e9])).tolist() == [8, 0, 15, 7]


def test_e2m1_even_matches_ml_dtypes():
    x = _e2m1_inputs(1)
    np.testing.assert_array_equal(np.asarray(el.encode_e2m1(jnp.asarray(x))), np_ref.e2m1_even(x))


def test_e2m1_down_matches_nearest_level():
    x = _e2m1_inputs(2)
    np.testing.assert_array_equal(np.asarray(el.encode_e2m1(jnp.asarray(x), ties="down")), np_ref.e2m1_down(x))


def test_e2m1_encode_bf16_input_and_bad_ties():
    x = _e2m1_inputs(3).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(el.encode_e2m1(jnp.asarray(x))), np_ref.e2m1_even(x.astype(np.float32)))
    with pytest.raises(ValueError, match="ties='up'"):
        el.encode_e2m1(jnp.zeros(2), ties="up")


def test_e2m1_decode_every_code():
    codes = jnp.arange(16, dtype=jnp.uint8)
    np.testing.assert_array_equal(np.asarray(el.decode_e2m1(codes)), np_ref.E2M1_TABLE)
    assert el.decode_e2m1(codes, jnp.bfloat16).dtype == jnp.bfloat16


def test_e4m3_saturates_and_rounds_like_ml_dtypes():
    rng = np.random.default_rng(4)
    x = np.concatenate([[500.0, -1e9, 448.0, 464.0, 2.0**-10], rng.standard_normal(5000) * 100]).astype(np.float32)
    q = el.to_e4m3(jnp.asarray(x))
    assert q.dtype == jnp.float8_e4m3fn
    np.testing.assert_array_equal(np_ref.bits(q), np_ref.bits(np_ref.e4m3(x)))
    assert np.asarray(q[:2], np.float32).tolist() == [448.0, -448.0]


def test_e8m0_encode_is_exact_ceil_log2():
    rng = np.random.default_rng(5)
    x = np.concatenate([
        2.0 ** np.arange(-126, 127), 2.0 ** np.arange(-126, 126) * 1.0000001, [0.0, 0.75, 3.0],
        np.exp(rng.uniform(-80, 80, 5000)),
    ]).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(el.encode_e8m0(jnp.asarray(x))), np_ref.e8m0_ceil(x))
    special = el.encode_e8m0(jnp.asarray([jnp.nan, jnp.inf, 3e38, 2.0**-127, 1.5 * 2.0**-127], jnp.float32))
    assert special.tolist() == [255, 255, 254, 0, 1]


def test_e8m0_decode_every_byte():
    u = np.arange(256)
    got = np.asarray(el.decode_e8m0(jnp.asarray(u, jnp.uint8)))
    np.testing.assert_array_equal(got[:255], (2.0 ** (u[:255] - 127.0)).astype(np.float32))
    assert np.isnan(got[255])


def test_exp2_int_exact():
    e = np.arange(-126, 128)
    np.testing.assert_array_equal(np.asarray(el.exp2_int(jnp.asarray(e))), (2.0**e).astype(np.float32))


def test_nibble_byte_example_and_round_trip():
    # K index 0 -> low nibble, K index 1 -> high nibble: codes (1, 2) -> 0x21
    assert el.pack_nibbles(jnp.asarray([[1, 2, 15, 0]], jnp.uint8)).tolist() == [[0x21, 0x0F]]
    codes = np.random.default_rng(6).integers(0, 16, (3, 6, 8), dtype=np.uint8)
    packed = el.pack_nibbles(jnp.asarray(codes))
    np.testing.assert_array_equal(np.asarray(packed), np_ref.pack_nibbles(codes))
    np.testing.assert_array_equal(np.asarray(el.unpack_nibbles(packed)), codes)
    along_rows = el.pack_nibbles(jnp.asarray(codes), axis=-2)
    assert along_rows.shape == (3, 3, 8)
    np.testing.assert_array_equal(np.asarray(el.unpack_nibbles(along_rows, axis=-2)), codes)


def test_codecs_under_jit():
    x = jnp.asarray(_e2m1_inputs(7))
    f = jax.jit(lambda v: el.unpack_nibbles(el.pack_nibbles(el.encode_e2m1(v))))
    np.testing.assert_array_equal(np.asarray(f(x)), np_ref.e2m1_even(np.asarray(x)))


@pytest.mark.parametrize("divide", [el.exact_divide, el.long_divide], ids=["exact_divide", "long_divide"])
def test_division_is_correctly_rounded(divide):
    rng = np.random.default_rng(8)
    a = (rng.standard_normal(200_000) * np.exp(rng.uniform(-40, 40, 200_000))).astype(np.float32)
    b = (rng.standard_normal(200_000) * np.exp(rng.uniform(-40, 40, 200_000))).astype(np.float32)
    b[:1000] = 448.0  # a division by a broadcast constant, which XLA would turn into a reciprocal multiply
    with np.errstate(over="ignore", under="ignore"):
        ref = a / b
    got = np.asarray(jax.jit(divide)(a, b))
    normal = np.abs(ref) >= np.finfo(np.float32).tiny  # subnormal results flush to zero, as XLA's CPU does
    np.testing.assert_array_equal(got[normal].view(np.uint32), ref[normal].view(np.uint32))
    assert (got[~normal & np.isfinite(ref)] == 0).all()
    # exact ties survive (GPTQ's extreme elements sit on x.5), and the IEEE specials
    q = divide(jnp.asarray([7.5, -1.0, 1.0, 0.0, 6.0, 5.0]), jnp.asarray([1.0, 0.13333334, 448.0, 3.0, 0.0, jnp.inf]))
    assert np.asarray(q).tolist() == [7.5, np.float32(-1.0) / np.float32(0.13333334), np.float32(1) / np.float32(448),
                                      0.0, np.inf, 0.0]


def test_round_to_keeps_the_rounding_through_a_cast_back():
    x = np.random.default_rng(9).standard_normal(1000).astype(np.float32)
    got = jax.jit(lambda v: el.round_to(v, jnp.bfloat16).astype(jnp.float32))(x)
    np.testing.assert_array_equal(np.asarray(got), x.astype(jnp.bfloat16).astype(np.float32))
    e4m3 = jax.jit(lambda v: el.to_e4m3(v).astype(jnp.float32))(x * 100)
    np.testing.assert_array_equal(np.asarray(e4m3), np_ref.f32(np_ref.e4m3(x * 100)))
