"""The M=1 word GEMV (pallas_kernels/w4a16_gemv.py) in interpret mode against the W4A16 reference and a
NumPy float64 oracle: fresh random operands, ragged N and K against the tiles, groups below, equal to and
above block_k, split-K with a ragged last split, symmetric and asymmetric (fractional zeros too).
Outputs start as NaN in interpret mode (test_gemm_kernels checks that), so an unwritten element fails."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pallas_kernels import w4a16, w4a16_gemv
from pallas_kernels.w4a16_gemv import GemvConfig
from . import np_oracle as npo

TOL = 1e-2  # the tolerance w4a16_gemv states
# The compiled kernel (Triton, with its inline-PTX FMAs) beside interpret mode, where a GPU is present.
MODES = [pytest.param(True, id="interpret"),
         pytest.param(False, id="gpu", marks=pytest.mark.skipif(jax.default_backend() != "gpu",
                                                               reason="the compiled kernel needs a GPU"))]

CASES = [
    # n, k, group, zero kind, config
    (40, 384, 128, None, GemvConfig(block_n=16, block_k=128, split_k=2)),        # ragged N, ragged split
    (40, 640, 64, "int", GemvConfig(block_n=32, block_k=256, split_k=2)),         # 4 groups a chunk, ragged K
    (24, 512, 128, "float", GemvConfig(block_n=8, block_k=32, unroll=4)),         # group spans 4 chunks
    (33, 1024, 32, None, GemvConfig(block_n=16, block_k=512, split_k=4, unroll=2, num_warps=2)),
    (48, 256, 64, "int", None),                                                   # default heuristic
    (24, 1792, 128, None, GemvConfig(block_n=8, block_k=128, split_k=3)),         # 14 chunks over 3 splits
    (24, 640, 32, "int", GemvConfig(block_n=8, block_k=64, split_k=6, unroll=2)),  # 10 chunks, 6 splits of 2
    (40, 640, 64, "int", GemvConfig(block_n=32, block_k=256, split_k=2, prefetch=True)),   # prefetch, ragged K
    (24, 1792, 128, None, GemvConfig(block_n=8, block_k=128, split_k=3, unroll=2, prefetch=True)),
]


def _operands(n, k, group, zero_kind):
    rng = npo.rng_for("w4a16_gemv", n, k, group, zero_kind)
    x = npo.rand_x(rng, 1, k)
    packed = npo.rand_packed(rng, n, k)
    scale = (rng.uniform(0.5, 1.5, (n, k // group)) * 0.02).astype(ml_dtypes.bfloat16)
    zero = {None: None,
            "int": lambda: rng.integers(0, 16, (n, k // group)).astype(np.uint8),
            "float": lambda: rng.uniform(3, 12, (n, k // group)).astype(np.float32)}[zero_kind]
    return x, packed, scale, zero() if zero else None


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("n,k,group,zero_kind,cfg", CASES)
def test_gemv_matches_reference(n, k, group, zero_kind, cfg, interpret):
    x, packed, scale, zero = _operands(n, k, group, zero_kind)
    assert cfg is None or w4a16_gemv.config_is_valid(group, cfg)
    out = w4a16_gemv.w4a16_gemv(x, packed, scale, zero, config=cfg, interpret=interpret)
    ref = w4a16.w4a16_matmul_reference(x, packed, scale, zero)
    assert out.shape == (1, n) and out.dtype == ref.dtype
    npo.check_close(out, ref, TOL)
    npo.check_close(out, npo.f64(x) @ npo.int4_weight(packed, scale, zero).T, TOL)


@pytest.mark.parametrize("split", [1, 2])
def test_post_scale_multiplies_the_f32_sum_before_the_one_rounding(split):
    x, packed, scale, zero = _operands(40, 384, 128, None)
    cfg = GemvConfig(block_n=16, block_k=128, split_k=split)
    out = w4a16_gemv.w4a16_gemv(x, packed, scale, post_scale=np.float32(3e-3), config=cfg,
                                out_dtype=jnp.float32, interpret=True)
    assert out.dtype == jnp.float32
    npo.check_close(out, npo.f64(x) @ npo.int4_weight(packed, scale, zero).T * 3e-3, 1e-5)


def test_gemv_words_are_the_canonical_bytes():
    """Nibble j of word i is k = 8i + j: a single set nibble lands on exactly its k."""
    n, k = 2, 64
    codes = np.full((n, k), 8, np.uint8)               # u - 8 == 0 everywhere ...
    codes[1, 43] = 15                                   # ... except one weight of +7
    packed = npo.pack(codes)
    x = np.zeros((1, k), ml_dtypes.bfloat16)
    x[0, 43] = 2.0
    scale = np.ones((n, k // 32), np.float32)
    out = np.asarray(w4a16_gemv.w4a16_gemv(x, packed, scale, config=GemvConfig(2, 32), interpret=True), np.float32)
    np.testing.assert_array_equal(out, [[0.0, 14.0]])


def test_invalid_configs_are_refused():
    assert not w4a16_gemv.config_is_valid(128, GemvConfig(block_k=16))
    assert not w4a16_gemv.config_is_valid(128, GemvConfig(block_n=24))
    assert not w4a16_gemv.config_is_valid(96, GemvConfig(block_k=128))
    assert not w4a16_gemv.config_is_valid(128, GemvConfig(split_k=0))
    assert not w4a16_gemv.config_is_valid(128, GemvConfig(unroll=3))
    assert w4a16_gemv.config_is_valid(128, GemvConfig(split_k=3))                 # any split: whole waves
    assert not w4a16_gemv.shape_is_supported(2, 64, 256, 64)
    assert not w4a16_gemv.shape_is_supported(1, 64, 256, 16)


@pytest.mark.parametrize("zero_kind,cfg", [(None, GemvConfig(block_n=16, block_k=128, split_k=2)),
                                           ("int", GemvConfig(block_n=8, block_k=256, unroll=2))])
def test_a_group_of_weights_is_each_weight_side_by_side(zero_kind, cfg):
    """q, k, v of widths 48, 16, 40 (the last ragged against block_n) in one launch equal three calls, and
    every output column is written (interpret mode starts outputs as NaN)."""
    parts = [_operands(n, 384, 128, zero_kind) for n in (48, 16, 40)]
    x = parts[0][0]
    packed, scale = tuple(p[1] for p in parts), tuple(p[2] for p in parts)
    zeros = tuple(p[3] for p in parts) if zero_kind else None
    out = w4a16_gemv.w4a16_gemv_group(x, packed, scale, zeros, config=cfg, interpret=True)
    want = np.concatenate([np.asarray(w4a16.w4a16_matmul_reference(x, p, s, z), np.float32)
                           for _, p, s, z in parts], axis=-1)
    assert out.shape == (1, 104) and np.isfinite(np.asarray(out, np.float32)).all()
    npo.check_close(out, want, TOL)


def test_a_group_refuses_a_weight_off_the_channel_block():
    parts = [_operands(n, 256, 128, None) for n in (40, 16)]                # 40 is not a multiple of 16
    with pytest.raises(ValueError, match=r"w4a16_gemv_group: weight 0: packed \(40, 128\)"):
        w4a16_gemv.w4a16_gemv_group(parts[0][0], tuple(p[1] for p in parts), tuple(p[2] for p in parts),
                                    config=GemvConfig(block_n=16), interpret=True)


def test_a_group_takes_one_x_row_and_post_scale_or_one_per_weight():
    parts = [_operands(n, 256, 128, None) for n in (32, 16)]
    packed, scale = tuple(p[1] for p in parts), tuple(p[2] for p in parts)
    x3 = jnp.concatenate([parts[0][0]] * 3)
    with pytest.raises(ValueError, match=r"x \(3, 256\) and post_scale of 1 values for 2 weights"):
        w4a16_gemv.w4a16_gemv_group(x3, packed, scale, config=GemvConfig(block_n=16), interpret=True)
    with pytest.raises(ValueError, match=r"post_scale of 3 values for 2 weights"):
        w4a16_gemv.w4a16_gemv_group(parts[0][0], packed, scale, post_scale=jnp.ones(3), interpret=True,
                                    config=GemvConfig(block_n=16))


def test_a_w4a8_group_lowers_to_one_triton_kernel_on_a_row_of_codes_per_weight():
    import jax
    sds = jax.ShapeDtypeStruct
    x = sds((3, 1024), jnp.float8_e4m3fn)
    packed = tuple(sds((n, 512), jnp.uint8) for n in (512, 128, 128))
    scale = tuple(sds((n, 8), jnp.float32) for n in (512, 128, 128))
    fn = jax.jit(lambda x, p, s, post: w4a16_gemv.w4a16_gemv_group(
        x, p, s, post_scale=post, config=GemvConfig(block_n=64), out_dtype=jnp.bfloat16))
    text = fn.trace(x, packed, scale, sds((3,), jnp.float32)).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1


def test_a_group_lowers_to_one_triton_kernel_for_cuda():
    import jax
    sds = jax.ShapeDtypeStruct
    x = sds((1, 1024), jnp.bfloat16)
    packed = tuple(sds((n, 512), jnp.uint8) for n in (512, 128, 128))
    scale = tuple(sds((n, 8), jnp.bfloat16) for n in (512, 128, 128))
    fn = jax.jit(lambda x, p, s: w4a16_gemv.w4a16_gemv_group(x, p, s, config=GemvConfig(block_n=64, split_k=2)))
    text = fn.trace(x, packed, scale).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1
