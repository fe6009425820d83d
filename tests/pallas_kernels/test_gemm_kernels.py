"""Every GEMM kernel in interpret mode against its pure-jnp reference, and every reference against an
independent NumPy float64 dequantize-then-matmul. Fresh random operands per case; unaligned M (1, 3, 17),
N and K that are not multiples of the tiles; several tilings including split-K with a ragged last split.

Poisoning: Pallas' interpret mode allocates every output filled with NaN (checked below), so an output
element the kernel never writes fails check_close's finiteness assertion.
"""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.experimental import pallas as pl

from pallas_kernels import fp4, fp8, w4a8, w4a8_fp4, w4a16
from pallas_kernels.fp8 import Fp8Config
from pallas_kernels.packed4 import Packed4Config
from . import np_oracle as npo

TOL = 1e-2  # the tolerance every kernel module states


def test_interpret_outputs_start_poisoned():
    def writes_nothing(x_ref, o_ref):
        del x_ref, o_ref

    out = pl.pallas_call(writes_nothing, out_shape=jax.ShapeDtypeStruct((4, 8), jnp.bfloat16),
                         interpret=True)(jnp.ones((4, 8)))
    assert np.isnan(np.asarray(out, np.float32)).all()


# ------------------------------------------------------------------------------------------- W4A16

W4A16_CASES = [
    # m, n, k, group, asym, config
    (1, 40, 384, 128, False, Packed4Config(16, 32, 128, split_k=2)),            # ragged N, ragged split
    (1, 40, 384, 64, True, Packed4Config(1, 16, 64, split_k=2)),                 # GEMV path
    (3, 64, 256, 64, True, Packed4Config(16, 32, 64, split_k=4, num_warps=2)),
    (1, 40, 640, 128, False, Packed4Config(1, 16, 64, split_k=2, unroll=4)),     # unroll, ragged
    (17, 48, 256, 32, False, Packed4Config(32, 16, 32, presplit_x=True)),
    (17, 40, 512, 128, True, Packed4Config(16, 64, 64, split_k=2, presplit_x=True)),
    (5, 24, 128, 128, False, None),                                              # default heuristic
]


@pytest.mark.parametrize("m,n,k,group,asym,cfg", W4A16_CASES)
def test_w4a16_kernel_matches_reference(m, n, k, group, asym, cfg):
    rng = npo.rng_for("w4a16", m, n, k, group, asym)
    x = npo.rand_x(rng, m, k)
    packed = npo.rand_packed(rng, n, k)
    scale = (rng.uniform(0.5, 1.5, (n, k // group)) * 0.02).astype(ml_dtypes.bfloat16)
    zero = rng.integers(0, 16, (n, k // group)).astype(np.uint8) if asym else None
    out = w4a16.w4a16_matmul(x, packed, scale, zero, config=cfg, interpret=True)
    ref = w4a16.w4a16_matmul_reference(x, packed, scale, zero)
    npo.check_close(out, ref, TOL)
    npo.check_close(ref, npo.f64(x) @ npo.int4_weight(packed, scale, zero).T, TOL)


def test_w4a16_act_order():
    rng = npo.rng_for("act_order")
    m, n, k, group = 3, 32, 256, 64
    x = npo.rand_x(rng, m, k)
    packed = npo.rand_packed(rng, n, k)
    scale = rng.uniform(0.01, 0.03, (n, k // group)).astype(np.float32)
    zero = rng.integers(4, 12, (n, k // group)).astype(np.float32)
    g_idx = rng.permutation(np.arange(k) // group).astype(np.int32)
    ref = w4a16.w4a16_matmul_reference(x, packed, scale, zero, g_idx=g_idx)
    npo.check_close(ref, npo.f64(x) @ npo.int4_weight(packed, scale, zero, g_idx).T, TOL)
    packed_p, scale_p, zero_p, perm = w4a16.prepare_act_order(packed, scale, zero, g_idx)
    out = w4a16.w4a16_matmul(x, packed_p, scale_p, zero_p, perm,
                             config=Packed4Config(16, 16, 64, split_k=2), interpret=True)
    npo.check_close(out, ref, TOL)
    with pytest.raises(ValueError, match="groups"):
        w4a16.prepare_act_order(packed, scale, zero, np.zeros(k, np.int32))


def test_w4a16_unsupported_falls_back_to_reference():
    rng = npo.rng_for("fallback")
    x = npo.rand_x(rng, 2, 48)          # group 16: below the kernel's minimum MMA depth
    packed = npo.rand_packed(rng, 8, 48)
    scale = rng.uniform(0.01, 0.02, (8, 3)).astype(np.float32)
    assert not w4a16.can_use_w4a16_matmul(x, packed, scale)
    out = w4a16.w4a16_matmul(x, packed, scale, interpret=True)
    npo.check_close(out, w4a16.w4a16_matmul_reference(x, packed, scale), TOL)
    assert not w4a16.can_use_w4a16_matmul(x, packed, scale, config=Packed4Config(16, 16, 128))


# --------------------------------------------------------------------------------------- NVFP4/MXFP4

FP4_CASES = [
    (1, 40, 384, Packed4Config(16, 32, 128, split_k=2)),
    (1, 40, 384, Packed4Config(1, 16, 64)),
    (17, 48, 256, Packed4Config(32, 16, 32, presplit_x=True)),
    (3, 24, 192, Packed4Config(16, 16, 64, split_k=2, num_warps=2)),            # K not a multiple of 128
    (1, 24, 320, Packed4Config(1, 16, 64, unroll=2)),
]


@pytest.mark.parametrize("m,n,k,cfg", FP4_CASES)
def test_nvfp4_kernel_matches_reference(m, n, k, cfg):
    rng = npo.rng_for("nvfp4", m, n, k)
    x = npo.rand_x(rng, m, k)
    packed = npo.rand_packed(rng, n, k)
    bs = npo.e4m3(rng.uniform(0.05, 448, (n, k // 16)))
    gs = np.float32(rng.uniform(1e-4, 1e-3))
    out = fp4.nvfp4_matmul(x, packed, bs, gs, config=cfg, interpret=True)
    ref = fp4.nvfp4_matmul_reference(x, packed, bs, gs)
    npo.check_close(out, ref, TOL)
    npo.check_close(ref, npo.f64(x) @ npo.nvfp4_weight(packed, bs, gs).T, TOL)


@pytest.mark.parametrize("m,n,k,cfg", FP4_CASES)
def test_mxfp4_kernel_matches_reference(m, n, k, cfg):
    rng = npo.rng_for("mxfp4", m, n, k)
    x = npo.rand_x(rng, m, k)
    packed = npo.rand_packed(rng, n, k)
    scale = rng.integers(110, 135, (n, k // 32)).astype(np.uint8)
    out = fp4.mxfp4_matmul(x, packed, scale, config=cfg, interpret=True)
    ref = fp4.mxfp4_matmul_reference(x, packed, scale)
    npo.check_close(out, ref, TOL)
    npo.check_close(ref, npo.f64(x) @ npo.mxfp4_weight(packed, scale).T, TOL)


# -------------------------------------------------------------------------------------------- W4A8

W4A8_CASES = [
    (1, 40, 384, 128, Packed4Config(16, 32, 128, split_k=2)),
    (1, 40, 384, 128, Packed4Config(1, 16, 128, split_k=2)),
    (17, 48, 256, 64, Packed4Config(32, 16, 64, presplit_x=True)),
    (3, 64, 512, 128, Packed4Config(16, 32, 64, split_k=4)),
]


@pytest.mark.parametrize("m,n,k,group,cfg", W4A8_CASES)
def test_w4a8_kernel_matches_reference(m, n, k, group, cfg):
    rng = npo.rng_for("w4a8", m, n, k, group)
    x = npo.rand_x(rng, m, k)
    packed = npo.rand_packed(rng, n, k)
    ws = rng.uniform(0.005, 0.02, (n, k // group)).astype(np.float32)
    in_scale = np.float32(np.abs(np.asarray(x, np.float32)).max() / 448)
    out = w4a8.w4a8_matmul(x, packed, ws, in_scale, config=cfg, interpret=True)
    ref = w4a8.w4a8_matmul_reference(x, packed, ws, in_scale)
    npo.check_close(out, ref, TOL)
    npo.check_close(ref, npo.w4a8(x, packed, ws, in_scale), TOL)


# --------------------------------------------------------------------------- W4A8 with FP4 weights

W4A8_FP4_CASES = [
    (1, 40, 384, Packed4Config(16, 32, 128, split_k=2)),                          # ragged N, ragged split
    (1, 40, 384, Packed4Config(1, 16, 64, split_k=2)),                            # bm = 1: no MMA
    (3, 24, 192, Packed4Config(16, 16, 64, split_k=2, num_warps=2)),              # K not a multiple of bk
    (17, 48, 256, Packed4Config(32, 16, 32, presplit_x=True)),                    # one piece; presplit ignored
    (3, 64, 640, Packed4Config(16, 32, 128, split_k=4)),                          # 5 chunks over 4 splits
    (1, 24, 320, Packed4Config(1, 16, 64, unroll=2)),                             # unrolled, ragged
    (17, 40, 384, None),                                                          # default heuristic
]


@pytest.mark.parametrize("kind", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("m,n,k,cfg", W4A8_FP4_CASES)
def test_w4a8_fp4_kernel_matches_reference(kind, m, n, k, cfg):
    rng = npo.rng_for("w4a8_" + kind, m, n, k)
    xq = npo.rand_e4m3_x(rng, m, k)
    sx = np.float32(rng.uniform(1e-3, 1e-2))
    packed = npo.rand_packed(rng, n, k)
    if kind == "mxfp4":
        block, gs = 32, 1.0
        scales = (rng.integers(110, 135, (n, k // 32)).astype(np.uint8),)
        kernel, reference = w4a8_fp4.mxfp4_fp8_matmul, w4a8_fp4.mxfp4_fp8_matmul_reference
        w = npo.mxfp4_weight(packed, *scales)
    else:
        block, gs = 16, np.float32(rng.uniform(1e-4, 1e-3))
        bs = npo.e4m3(rng.uniform(0.0, 448, (n, k // 16)) * 2.0 ** rng.integers(-12, 1, (n, k // 16)))  # subnormals
        scales = (bs, gs)
        kernel, reference = w4a8_fp4.nvfp4_fp8_matmul, w4a8_fp4.nvfp4_fp8_matmul_reference
        w = npo.nvfp4_weight(packed, bs, gs)
    out = kernel(xq, sx, packed, *scales, config=cfg, interpret=True)
    ref = reference(xq, sx, packed, *scales)
    npo.check_close(out, ref, TOL)
    npo.check_close(ref, npo.fp8_x_fp4(xq, sx, packed, scales[0], block, gs), TOL)
    npo.check_close(ref, (npo.f64(xq) * float(sx)) @ w.T, TOL)


def test_w4a8_nvfp4_blocks_are_scaled_separately():
    """Each 16-block of a 32-deep MMA piece gets its own scale: weights and codes all ones and block
    scales 1 and 2**j per piece give every output exactly sum_j (16 + 16 * 2**j) * x_scale (any mixing of
    the two halves of a piece would show)."""
    m, n, k = 16, 16, 128
    xq = np.ones((m, k), ml_dtypes.float8_e4m3fn)
    packed = np.full((n, k // 2), 0x22, np.uint8)                                # code 2 = 1.0, both nibbles
    bs = np.ones((n, k // 16), np.float32)
    bs[:, 1::2] = 2.0 ** np.arange(k // 32)[None]
    want = 16.0 * (k // 32 + np.sum(2.0 ** np.arange(k // 32)))
    for cfg in (Packed4Config(16, 16, 128), Packed4Config(16, 16, 32, split_k=2), Packed4Config(1, 16, 64)):
        out = w4a8_fp4.nvfp4_fp8_matmul(xq, np.float32(0.5), packed, npo.e4m3(bs), np.float32(1.0),
                                        config=cfg, out_dtype=jnp.float32, interpret=True)
        np.testing.assert_array_equal(np.asarray(out), np.full((m, n), 0.5 * want, np.float32))


def test_w4a8_fp4_unsupported_falls_back_to_reference():
    rng = npo.rng_for("w4a8_fp4_fallback")
    xq = npo.rand_e4m3_x(rng, 2, 128)
    packed = npo.rand_packed(rng, 8, 128)
    bs = npo.e4m3(rng.uniform(0.5, 4, (8, 8)))
    bad_cfg = Packed4Config(16, 16, 16)                                          # below the FP8 MMA depth
    assert not fp4.can_use_fp4_matmul(w4a8_fp4.NVFP4_FP8, xq, packed, bs, bad_cfg)
    assert not fp4.can_use_fp4_matmul(w4a8_fp4.NVFP4_FP8, npo.rand_x(rng, 2, 128), packed, bs)  # bf16 x
    out = w4a8_fp4.nvfp4_fp8_matmul(xq, np.float32(0.1), packed, bs, np.float32(0.5), config=bad_cfg,
                                    interpret=True)
    npo.check_close(out, w4a8_fp4.nvfp4_fp8_matmul_reference(xq, np.float32(0.1), packed, bs, np.float32(0.5)), TOL)


# --------------------------------------------------------------------------------------------- FP8

FP8_CASES = [
    (1, 200, 300, Fp8Config(16, 64, 64, split_k=2, swap_ab=True, num_warps=4)),   # K, N ragged
    (17, 136, 256, Fp8Config(32, 128, 128)),
    (3, 256, 384, Fp8Config(16, 256, 32, split_k=4, swap_ab=True, num_warps=4)),
    (17, 130, 160, None),
]


def _fp8_weights(rng, n, k):
    wq = npo.e4m3(rng.standard_normal((n, k)) * 100)
    return wq, rng.uniform(1e-3, 1e-2, (-(-n // 128), -(-k // 128))).astype(np.float32)


@pytest.mark.parametrize("m,n,k,cfg", FP8_CASES)
def test_fp8_block_kernel_matches_reference(m, n, k, cfg):
    rng = npo.rng_for("fp8b", m, n, k)
    x = npo.rand_x(rng, m, k)
    wq, sw = _fp8_weights(rng, n, k)
    out = fp8.fp8_block_matmul(x, wq, sw, config=cfg, interpret=True)
    ref = fp8.fp8_block_matmul_reference(x, wq, sw)
    npo.check_close(out, ref, TOL)
    npo.check_close(ref, npo.fp8_block(x, wq, sw), TOL)


@pytest.mark.parametrize("m,n,k,cfg", FP8_CASES)
def test_fp8_rowwise_kernel_and_xla_match_reference(m, n, k, cfg):
    rng = npo.rng_for("fp8r", m, n, k)
    x = npo.rand_x(rng, m, k)
    wq, _ = _fp8_weights(rng, n, k)
    sw = rng.uniform(1e-3, 1e-2, (n,)).astype(np.float32)
    xq, sx = fp8.quantize_fp8_rowwise(x)
    ref = fp8.fp8_rowwise_matmul_reference(xq, sx, wq, sw)
    npo.check_close(ref, (npo.f64(xq) @ npo.f64(wq).T) * npo.f64(sx)[:, None] * npo.f64(sw)[None], TOL)
    out = fp8.fp8_matmul(xq, sx, wq, sw, mode="rowwise", config=cfg, interpret=True)
    npo.check_close(out, ref, TOL)
    npo.check_close(fp8.fp8_matmul_xla(xq, sx, wq, sw), ref, TOL)
    npo.check_close(fp8.fp8_matmul_xla(xq, sx, wq, sw, fast_accumulation=True), ref, TOL)
    pt = fp8.fp8_rowwise_matmul_reference(xq, sx[0], wq, sw[0])
    npo.check_close(fp8.fp8_matmul_xla(xq, sx[0], wq, sw[0]), pt, TOL)


# ------------------------------------------------------------- the kernels lower to Triton for CUDA

def _lowers_for_cuda(fn, *args):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text


def test_kernels_lower_to_triton_ir():
    """Catches primitives the Pallas Triton lowering rejects, without a GPU (Triton's own compile of
    the IR to PTX still happens only on the GPU machine: benchmarks/gemm.py --check)."""
    sds = jax.ShapeDtypeStruct
    m, n, k = 17, 40, 384
    x, packed = sds((m, k), jnp.bfloat16), sds((n, k // 2), jnp.uint8)
    for cfg in (Packed4Config(16, 32, 128, split_k=2), Packed4Config(32, 64, 64, presplit_x=True),
                Packed4Config(1, 32, 128)):
        _lowers_for_cuda(lambda x, p, s, z: w4a16.w4a16_matmul(x, p, s, z, config=cfg),
                         x, packed, sds((n, k // 128), jnp.bfloat16), sds((n, k // 128), jnp.uint8))
        _lowers_for_cuda(lambda x, p, s: fp4.nvfp4_matmul(x, p, s, 0.5, config=cfg),
                         x, packed, sds((n, k // 16), jnp.float8_e4m3fn))
        _lowers_for_cuda(lambda x, p, s: fp4.mxfp4_matmul(x, p, s, config=cfg),
                         x, packed, sds((n, k // 32), jnp.uint8))
        _lowers_for_cuda(lambda x, p, s: w4a8.w4a8_matmul(x, p, s, 0.5, config=cfg),
                         x, packed, sds((n, k // 128), jnp.float32))
        xq = sds((m, k), jnp.float8_e4m3fn)
        _lowers_for_cuda(lambda x, p, s: w4a8_fp4.mxfp4_fp8_matmul(x, 0.5, p, s, config=cfg),
                         xq, packed, sds((n, k // 32), jnp.uint8))
        _lowers_for_cuda(lambda x, p, s: w4a8_fp4.nvfp4_fp8_matmul(x, 0.5, p, s, 0.25, config=cfg),
                         xq, packed, sds((n, k // 16), jnp.float8_e4m3fn))
    for cfg in (Fp8Config(16, 64, 64, split_k=2, swap_ab=True), Fp8Config(128, 128, 128)):
        _lowers_for_cuda(lambda x, w, s: fp8.fp8_block_matmul(x, w, s, config=cfg),
                         x, sds((n, k), jnp.float8_e4m3fn), sds((1, 3), jnp.float32))
        _lowers_for_cuda(lambda x, sx, w, s: fp8.fp8_matmul(x, sx, w, s, mode="rowwise", config=cfg),
                         sds((m, k), jnp.float8_e4m3fn), sds((m,), jnp.float32),
                         sds((n, k), jnp.float8_e4m3fn), sds((n,), jnp.float32))
