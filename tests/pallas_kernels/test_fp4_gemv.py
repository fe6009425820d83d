"""The FP4 M=1 word GEMV (pallas_kernels/fp4_gemv.py) in interpret mode against fp4.py's references and
the NumPy float64 oracle: fresh random operands with all 16 E2M1 codes, ragged N and K against the tiles,
split-K with a ragged last split, unrolled K loops, NVFP4 with random E4M3 block scales (subnormal ones
too) and a global scale, MXFP4 with E8M0 exponents around 127; a hand-computed case; the refusals.
Outputs start as NaN in interpret mode, so an element no program wrote fails the comparison."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax.experimental import pallas as pl

from pallas_kernels import _common as cm
from pallas_kernels import fp4, fp4_gemv, w4a16_gemv
from pallas_kernels.w4a16_gemv import GemvConfig
from . import np_oracle as npo

TOL = 1e-2  # the tolerance fp4_gemv states
# The compiled kernel (Triton, with its inline-PTX FMAs) beside interpret mode, where a GPU is present.
MODES = [pytest.param(True, id="interpret"),
         pytest.param(False, id="gpu", marks=pytest.mark.skipif(jax.default_backend() != "gpu",
                                                               reason="the compiled kernel needs a GPU"))]

CASES = [
    # n, k, config
    (40, 384, GemvConfig(block_n=16, block_k=128, split_k=2)),                 # ragged N, ragged split
    (64, 640, GemvConfig(block_n=32, block_k=256, split_k=2, unroll=2)),       # ragged K chunk, unrolled
    (200, 256, GemvConfig(block_n=64, block_k=32, unroll=2, num_warps=2)),     # one block scale a chunk (MX)
    (40, 640, GemvConfig(block_n=8, block_k=64, split_k=4)),                   # 10 chunks over 4 splits
    (24, 896, GemvConfig(block_n=8, block_k=64, split_k=3)),                   # 14 chunks over 3 splits
    (64, 384, None),                                                           # default heuristic
    (64, 640, GemvConfig(block_n=32, block_k=256, split_k=2, unroll=2, prefetch=True)),   # prefetch, ragged
    (24, 896, GemvConfig(block_n=8, block_k=64, split_k=3, prefetch=True)),
]


def _operands(kind, n, k):
    rng = npo.rng_for("fp4_gemv", kind, n, k)
    x = npo.rand_x(rng, 1, k)
    packed = npo.rand_packed(rng, n, k)
    assert np.unique(npo.unpack(packed)).size == 16                            # every E2M1 code present
    if kind == "nvfp4":
        scales = (npo.e4m3(2.0 ** rng.uniform(-9.0, 8.8, (n, k // 16))), np.float32(rng.uniform(1e-4, 1e-3)))
    else:
        scales = (rng.integers(115, 136, (n, k // 32)).astype(np.uint8),)
    return x, packed, scales


def _run(kind, x, packed, scales, cfg, interpret=True):
    fn = fp4_gemv.nvfp4_gemv if kind == "nvfp4" else fp4_gemv.mxfp4_gemv
    return fn(x, packed, *scales, config=cfg, interpret=interpret)


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("kind", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("n,k,cfg", CASES)
def test_gemv_matches_reference(kind, n, k, cfg, interpret):
    x, packed, scales = _operands(kind, n, k)
    assert fp4_gemv.shape_is_supported(kind, 1, n, k)
    assert cfg is None or fp4_gemv.config_is_valid(kind, cfg)
    out = _run(kind, x, packed, scales, cfg, interpret)
    if kind == "nvfp4":
        ref = fp4.nvfp4_matmul_reference(x, packed, *scales)
        oracle = npo.f64(x) @ npo.nvfp4_weight(packed, *scales).T
    else:
        ref = fp4.mxfp4_matmul_reference(x, packed, *scales)
        oracle = npo.f64(x) @ npo.mxfp4_weight(packed, *scales).T
    assert out.shape == (1, n) and out.dtype == ref.dtype
    npo.check_close(out, ref, TOL)
    npo.check_close(out, oracle, TOL)


def _hand_x():
    """x [1, 64]: 1 on k < 8, 2 on 8..15, 0.5 on 16..31, 0.25 on 32..63 (all exact in bf16)."""
    x = np.full((1, 64), 0.25, np.float32)
    x[0, :8], x[0, 8:16], x[0, 16:32] = 1.0, 2.0, 0.5
    return x.astype(ml_dtypes.bfloat16)


def _hand_codes():
    """Row 0: codes 0..15 on k 0..15 (E2M1 +0 .. +6 then -0 .. -6), code 7 (+6) on k 16..31, code 0 after.
    Row 1: code 0 except code 14 (-4) at k = 37 (nibble 5 of word 4)."""
    codes = np.zeros((2, 64), np.uint8)
    codes[0, :16] = np.arange(16)
    codes[0, 16:32] = 7
    codes[1, 37] = 14
    return npo.pack(codes)


E2M1_VALUES = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float32)


@pytest.mark.parametrize("native", [pytest.param(False, id="jnp"),
                                    pytest.param(True, id="gpu", marks=pytest.mark.skipif(
                                        jax.default_backend() != "gpu", reason="inline PTX needs a GPU"))])
def test_table_decode_gives_every_code_exactly_and_in_order(native):
    """Every code at every nibble position (signed zero included), nibble j of a word at index j."""
    rng = npo.rng_for("fp4_table_decode")
    codes = rng.integers(0, 16, (16, 64)).astype(np.uint8)
    codes[0, :16], codes[1, :16] = np.arange(16), np.arange(16)[::-1]
    words = w4a16_gemv.as_words(jnp.asarray(npo.pack(codes)))
    table = jnp.array(fp4_gemv._F16_TOP_TABLE, jnp.int32)
    if native:   # the inline PTX only lowers inside a Triton kernel: one program decodes the whole array
        def kernel(t_ref, w_ref, o_ref):
            values = fp4_gemv.e2m1_by_table(w_ref[...], (t_ref[0], t_ref[1]), True)
            for j in range(8):
                o_ref[j] = values[j]
        values = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((8,) + words.shape, jnp.float32),
                                compiler_params=cm.triton_params(4, 1))(table, words)
    else:
        values = jnp.stack(fp4_gemv.e2m1_by_table(words, (table[0], table[1]), False))
    decoded = np.moveaxis(np.asarray(values), 0, -1).reshape(codes.shape)
    np.testing.assert_array_equal(decoded, E2M1_VALUES[codes])
    np.testing.assert_array_equal(np.signbit(decoded), np.signbit(E2M1_VALUES[codes]))


def test_prmt_emulation_follows_ptx():
    """Bytes {b, a} (a's 0-3, b's 4-7) by selector nibble; bit 3 of a nibble replicates the byte's top bit."""
    a, b = jnp.int32(0x33221100), jnp.int32(0x77665544)
    pick = lambda a_, b_, c: int(cm.prmt(a_, b_, c, native=False)) & 0xFFFFFFFF  # noqa: E731
    assert pick(a, b, 0x3210) == 0x33221100 and pick(a, b, 0x7654) == 0x77665544
    assert pick(a, b, 0x0123) == 0x00112233 and pick(a, b, 0x4701) == 0x44770011
    signed = jnp.int32(np.uint32(0x80017F00).view(np.int32))        # bytes 00 7F 01 80
    assert pick(signed, b, 0x8B9A) == 0x00FF0000                     # replicate bytes 2, 1, 3, 0
    high_set = jnp.int32(np.uint32(0xFFFF3210).view(np.int32))
    assert pick(a, b, high_set) == 0x33221100                        # the selector's high half is ignored


def test_nvfp4_hand_computed():
    # row 0: block 0: (0+.5+1+1.5+2+3+4+6) * 1 + (same, negated) * 2 = 18 - 36 = -18, times scale 1.5 = -27;
    #        block 1: 16 * 6 * 0.5 = 48, times 0.25 = 12; blocks 2, 3: zero codes. (-27 + 12) * global 2 = -30.
    # row 1: -4 * 0.25 = -1, times block 2's scale 3 = -3, times global 2 = -6.
    bs = np.full((2, 4), 448.0, np.float32)              # scales of all-zero blocks must not leak in
    bs[0, 0], bs[0, 1], bs[1, 2] = 1.5, 0.25, 3.0
    out = fp4_gemv.nvfp4_gemv(_hand_x(), _hand_codes(), npo.e4m3(bs), np.float32(2.0),
                              config=GemvConfig(block_n=2, block_k=32), interpret=True)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), [[-30.0, -6.0]])


def test_mxfp4_hand_computed():
    # row 0: block 0 (k 0..31): -18 + 16 * 6 * 0.5 = 30, times 2^(126 - 127) = 15; block 1: zero codes.
    # row 1: block 0: zero codes; block 1: -4 * 0.25 = -1, times 2^(130 - 127) = -8.
    scale = np.array([[126, 200], [3, 130]], np.uint8)
    out = fp4_gemv.mxfp4_gemv(_hand_x(), _hand_codes(), scale, config=GemvConfig(block_n=2, block_k=32, split_k=2),
                              interpret=True)
    np.testing.assert_array_equal(np.asarray(out, np.float32), [[15.0, -8.0]])


def test_default_config_is_valid():
    for n, k in ((1, 32), (40, 384), (4096, 4096), (200, 16384)):
        cfg = fp4_gemv.default_config(n, k)
        assert fp4_gemv.config_is_valid("nvfp4", cfg) and fp4_gemv.config_is_valid("mxfp4", cfg)


def test_invalid_configs_and_shapes_are_refused():
    for kind in ("nvfp4", "mxfp4"):
        assert not fp4_gemv.config_is_valid(kind, GemvConfig(block_k=16))
        assert not fp4_gemv.config_is_valid(kind, GemvConfig(block_n=24))
        assert not fp4_gemv.config_is_valid(kind, GemvConfig(split_k=0))
        assert not fp4_gemv.config_is_valid(kind, GemvConfig(unroll=3))
        assert not fp4_gemv.shape_is_supported(kind, 2, 64, 256)           # M > 1
        assert not fp4_gemv.shape_is_supported(kind, 1, 0, 256)
    assert fp4_gemv.shape_is_supported("nvfp4", 1, 64, 48)
    assert not fp4_gemv.shape_is_supported("mxfp4", 1, 64, 48)             # K not a multiple of 32
    assert not fp4_gemv.shape_is_supported("nvfp4", 1, 64, 40)             # K not a multiple of 16
    with pytest.raises(ValueError, match="unknown format"):
        fp4_gemv.config_is_valid("int4", GemvConfig())


def test_mismatched_operands_raise():
    rng = npo.rng_for("fp4_gemv_bad_shapes")
    n, k = 8, 64
    x, packed = npo.rand_x(rng, 1, k), npo.rand_packed(rng, n, k)
    bs = npo.e4m3(rng.uniform(0.1, 4.0, (n, k // 16)))
    with pytest.raises(ValueError, match=r"block_scale must have shape .*\(8, 4\).*got \(8, 3\)"):
        fp4_gemv.nvfp4_gemv(x, packed, bs[:, :3], np.float32(1.0), interpret=True)
    with pytest.raises(ValueError, match=r"scale must have shape .*\(8, 2\).*got \(8, 4\)"):
        fp4_gemv.mxfp4_gemv(x, packed, np.full((n, k // 16), 127, np.uint8), interpret=True)
    with pytest.raises(ValueError, match=r"packed must have shape"):
        fp4_gemv.mxfp4_gemv(x, packed[:, :16], np.full((n, k // 32), 127, np.uint8), interpret=True)
    with pytest.raises(ValueError, match=r"block_scale must be float8_e4m3fn"):
        fp4_gemv.nvfp4_gemv(x, packed, bs.astype(np.float32), np.float32(1.0), interpret=True)


def test_kernels_lower_to_triton_ir():
    """Catches primitives the Pallas Triton lowering rejects (min, shifts, bitcasts), without a GPU."""
    sds = jax.ShapeDtypeStruct
    n, k = 40, 640
    x, packed = sds((1, k), jnp.bfloat16), sds((n, k // 2), jnp.uint8)
    for cfg in (GemvConfig(16, 256, split_k=2, unroll=2), GemvConfig(32, 32)):
        for fn, scale in ((lambda x, p, s: fp4_gemv.nvfp4_gemv(x, p, s, 0.5, config=cfg),
                           sds((n, k // 16), jnp.float8_e4m3fn)),
                          (lambda x, p, s: fp4_gemv.mxfp4_gemv(x, p, s, config=cfg),
                           sds((n, k // 32), jnp.uint8))):
            text = jax.jit(fn).trace(x, packed, scale).lower(lowering_platforms=("cuda",)).as_text()
            assert "__gpu$xla.gpu.triton" in text
