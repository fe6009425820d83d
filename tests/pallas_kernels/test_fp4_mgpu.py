"""The Mosaic GPU FP4 kernel (pallas_kernels/fp4_mgpu.py): on the CPU its byte-permute E2M1 decode (emulated
with the kernel's own tables and selectors), scale rows, rules and errors, and that it lowers for CUDA to bf16
wgmma with one [64, 128] tile per K-step; on a Hopper GPU every code decoded exactly and the outputs against the
float64 oracle at unaligned token counts."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pallas_kernels import _mgpu, dispatch, fp4
from pallas_kernels import fp4_mgpu as f4
from pallas_kernels import w4a16_mgpu as w4

from . import np_oracle as npo

on_hopper = pytest.mark.skipif(jax.default_backend() != "gpu" or not _mgpu.is_hopper(),
                               reason="Mosaic GPU kernels need Hopper")


def test_the_byte_permute_decode_gives_every_e2m1_value_exactly():
    """The kernel's PTX decode, emulated (fp4_mgpu.e2m1_pair_reference with cm.prmt's jnp semantics): every
    code in every position of a word comes out as its E2M1 value in the right half of the right pair, signs
    included."""
    codes = (np.arange(16)[:, None] + np.arange(8)[None, :] * 3) % 16          # [16 words, 8 positions]
    words = jnp.asarray((codes << (4 * np.arange(8))).sum(axis=1).astype(np.uint32).view(np.int32))
    want = np.asarray(fp4.E2M1_VALUES, np.float32)[codes]
    for part in range(4):
        pairs = np.asarray(f4.e2m1_pair_reference(words, part)).view(np.uint32)
        halves = np.stack([pairs & 0xFFFF, pairs >> 16], axis=1).astype(np.uint16).view(ml_dtypes.bfloat16)
        got = halves.astype(np.float32)
        np.testing.assert_array_equal(got, want[:, 2 * part:2 * part + 2])
        np.testing.assert_array_equal(np.signbit(got), np.signbit(want[:, 2 * part:2 * part + 2]))
    ptx = f4._word_ptx()
    assert "prmt.b32 pair0, lo0, hi0, 0x5140;" in ptx and "prmt.b32 pair3, lo1, hi1, 0x7362;" in ptx


def test_step_rows_hold_the_exact_scales_per_k_step():
    rng = np.random.default_rng(3)
    e4m3 = jnp.asarray(npo.e4m3(rng.uniform(0.01, 400, (256, 64))))
    (rows,) = f4.step_rows("nvfp4", e4m3)
    assert rows.shape == (64, 256) and rows.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(rows, np.float32), np.asarray(e4m3, np.float32).T)
    e8m0 = jnp.asarray(rng.integers(100, 140, (256, 32)).astype(np.uint8))
    (rows,) = f4.step_rows("mxfp4", e8m0)
    np.testing.assert_array_equal(np.asarray(rows, np.float32), np.exp2(np.asarray(e8m0, np.float64) - 127).T)


def _operands(fmt, m, n, k, rng=None):
    rng = rng or np.random.default_rng(5)
    x = jnp.asarray(npo.rand_x(rng, m, k))
    packed = jnp.asarray(npo.rand_packed(rng, n, k))
    if fmt == "nvfp4":
        return x, packed, jnp.asarray(npo.e4m3(rng.uniform(1, 400, (n, k // 16)))), jnp.float32(3e-4)
    return x, packed, jnp.asarray(rng.integers(118, 126, (n, k // 32)).astype(np.uint8))


def _call(fmt, operands, cfg, rows=None):
    fn = f4.nvfp4_matmul_mgpu if fmt == "nvfp4" else f4.mxfp4_matmul_mgpu
    return fn(*operands, config=cfg, rows=rows)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_lowers_with_one_bf16_wgmma_per_k_step(wgmma_operands, fmt):
    """The block scales are applied in registers, so each K-step is one wgmma of the whole [64, 128] bf16
    tile, and the PTX multiplies every decoded pair by its scale."""
    cfg = dispatch.fp4_mgpu_config(fmt, 40, 512, 1024)
    fn = f4.nvfp4_matmul_mgpu if fmt == "nvfp4" else f4.mxfp4_matmul_mgpu
    text = fn.trace(*_operands(fmt, 40, 512, 1024), config=cfg).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
    assert wgmma_operands == [jax.ShapeDtypeStruct((64, 128), jnp.bfloat16)]
    assert all(f"mul.rn.bf16x2 ${p}, pair{p}, ${5 + p};" in f4._word_ptx() for p in range(4))


def test_configs_fit_the_shared_memory_with_the_formats_scale_rows():
    nv, mx = dispatch.fp4_mgpu_config("nvfp4", 64, 6144, 4096), dispatch.fp4_mgpu_config("mxfp4", 64, 6144, 4096)
    assert nv.tile_tokens == mx.tile_tokens == 64 and nv.stages >= 2
    assert nv.stages == w4.fit_stages(64, split_k=nv.split_k, asym=False, scale_rows=8)
    assert mx.stages == w4.fit_stages(64, split_k=mx.split_k, asym=False, scale_rows=4)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_bad_operands_name_what_is_wrong(fmt):
    cfg = dispatch.fp4_mgpu_config(fmt, 16, 256, 256)
    x, packed, scale, *rest = _operands(fmt, 16, 256, 256)
    with pytest.raises(ValueError, match="scale"):
        _call(fmt, (x, packed, scale[:, 1:], *rest), cfg)
    with pytest.raises(ValueError, match="N % 128"):
        _call(fmt, (x, packed[:192], scale[:192], *rest), cfg)
    with pytest.raises(ValueError, match="rows"):
        _call(fmt, (x, packed, scale, *rest), cfg, rows=(jnp.zeros((3, 256), jnp.bfloat16),))
    if fmt == "nvfp4":
        with pytest.raises(ValueError, match="global_scale"):
            _call(fmt, (x, packed, scale, jnp.ones((256,), jnp.float32)), cfg)


@on_hopper
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("m", [2, 40, 300])
def test_matches_the_float64_oracle_on_hopper(fmt, m):
    """Random codes and scales, fresh x, unaligned token counts (the kernel allocates its output, so there is
    nothing to poison): |y - ref| <= 1e-2 |ref| + 1e-2 rms(ref)."""
    n, k = 384, 1152
    operands = _operands(fmt, m, n, k, np.random.default_rng(m + len(fmt)))
    x, packed, scale, *rest = (np.asarray(v) for v in operands)
    w = npo.nvfp4_weight(packed, scale, *rest) if fmt == "nvfp4" else npo.mxfp4_weight(packed, scale)
    ref = npo.f64(x) @ w.T
    got = _call(fmt, operands, dispatch.fp4_mgpu_config(fmt, m, n, k))
    assert got.shape == (m, n) and got.dtype == jnp.bfloat16
    npo.check_close(got, ref)


@on_hopper
def test_every_code_decodes_exactly_on_hopper():
    """x = the identity (K = 128 tokens, one per column), so y^T is the decoded weight itself: every code in
    every column position, scale 1, matches E2M1 bit for bit."""
    k, n = 128, 128
    codes = np.arange(n * k, dtype=np.uint8).reshape(n, k) % 16
    codes = (codes + np.arange(n, dtype=np.uint8)[:, None]) % 16
    packed = jnp.asarray(npo.pack(codes))
    x = jnp.eye(k, dtype=jnp.bfloat16)
    scale = jnp.full((n, k // 32), 127, jnp.uint8)
    y = f4.mxfp4_matmul_mgpu(x, packed, scale, config=dispatch.fp4_mgpu_config("mxfp4", k, n, k))
    want = np.asarray(fp4.E2M1_VALUES, np.float32)[codes].T
    np.testing.assert_array_equal(np.asarray(y, np.float32), want.astype(ml_dtypes.bfloat16).astype(np.float32))
