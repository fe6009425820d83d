"""The Mosaic GPU FP4 kernel (pallas_kernels/fp4_mgpu.py): on the CPU its byte-permute E2M1 decode and its
scale-byte conversion (emulated with the kernel's own tables, masks and selectors), its scale operand, rules and
errors, and that it lowers for CUDA to bf16 wgmma with one [64, 128] tile per K-step; on a Hopper GPU every code
times every scale decoded exactly and the outputs against the float64 oracle at unaligned token counts."""
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


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_the_byte_permute_decode_gives_every_e2m1_value_exactly(fmt):
    """The kernel's PTX decode, emulated (fp4_mgpu.e2m1_pair_reference with cm.prmt's jnp semantics): every
    code in every position of a word comes out as its E2M1 value (NVFP4: times 2^120, which its scales'
    2^-120 cancels) in the right half of the right pair, signs included."""
    codes = (np.arange(16)[:, None] + np.arange(8)[None, :] * 3) % 16          # [16 words, 8 positions]
    words = jnp.asarray((codes << (4 * np.arange(8))).sum(axis=1).astype(np.uint32).view(np.int32))
    want = np.asarray(fp4.E2M1_VALUES, np.float32)[codes] / (f4.NVFP4_SCALE_BIAS if fmt == "nvfp4" else 1.0)
    for part in range(4):
        pairs = np.asarray(f4.e2m1_pair_reference(words, part, fmt)).view(np.uint32)
        got = _bf16_halves(pairs)
        np.testing.assert_array_equal(got, want[:, 2 * part:2 * part + 2])
        np.testing.assert_array_equal(np.signbit(got), np.signbit(want[:, 2 * part:2 * part + 2]))
    ptx = f4._word_ptx()
    assert "prmt.b32 pair0, lo0, hi0, 0x5140;" in ptx and "prmt.b32 pair3, lo1, hi1, 0x7362;" in ptx


def _bf16_halves(pairs):
    """uint32 bf16 pairs [n] -> their two halves as f32 [n, 2] (low half first)."""
    halves = np.stack([pairs & 0xFFFF, pairs >> 16], axis=1).astype(np.uint16).view(ml_dtypes.bfloat16)
    return halves.astype(np.float32)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_every_scale_byte_becomes_a_pair_of_its_value(fmt):
    """The kernel's scale PTX, emulated (fp4_mgpu.scale_pair_reference): every byte (NVFP4: every E4M3 but
    NaN, subnormals and negatives included; MXFP4: E8M0 1..254) in every position of a word gives both halves
    of its pair equal to its value (NVFP4: times 2^-120), bit for bit; the PTX holds the same constants."""
    if fmt == "nvfp4":
        codes = np.array([b for b in range(256) if b & 0x7F != 0x7F], np.uint8)
        want = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float64) * f4.NVFP4_SCALE_BIAS
    else:
        codes = np.arange(1, 255, dtype=np.uint8)
        want = np.exp2(codes.astype(np.float64) - 127)
    codes = np.resize(codes, -(-codes.size // 4) * 4)
    want = np.resize(want, codes.size).reshape(-1, 4)
    for shift in range(4):                             # every byte in every position of the word
        rolled = np.roll(codes.reshape(-1, 4), shift, axis=1)
        words = jnp.asarray(rolled.copy().view(np.uint32).view(np.int32)[:, 0])
        for j in range(4):
            got = _bf16_halves(np.asarray(f4.scale_pair_reference(words, j, fmt)).view(np.uint32))
            expect = np.roll(want, shift, axis=1)[:, j].astype(np.float32)
            np.testing.assert_array_equal(got, np.stack([expect, expect], axis=1))
    ptx = f4._scale_ptx(fmt)
    low_shift, low_mask, high_shift, high_mask, sign = f4.SCALE_BITS[fmt]
    assert f"shl.b32 lo, $4, {low_shift};" in ptx and f"shr.b32 hi, $4, {high_shift};" in ptx
    assert all(f"{v:#x}" in ptx for v in (low_mask, high_mask, sign) if v) and "prmt.b32 $3, lo, hi, 0x7373;" in ptx


def test_the_kernel_reads_the_stored_scales_padded_to_whole_tma_rows():
    rng = np.random.default_rng(3)
    stored = jnp.asarray(npo.e4m3(rng.uniform(0.01, 400, (256, 64))))
    assert f4.kernel_scales(stored) is stored                  # K / 16 = 64 columns: read as they are
    odd = jnp.asarray(rng.integers(100, 140, (256, 36)).astype(np.uint8))   # MXFP4, K = 1152
    padded = f4.kernel_scales(odd)
    assert padded.shape == (256, 48) and padded.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(padded[:, :36]), np.asarray(odd))
    assert not np.asarray(padded[:, 36:]).any()


def _operands(fmt, m, n, k, rng=None):
    rng = rng or np.random.default_rng(5)
    x = jnp.asarray(npo.rand_x(rng, m, k))
    packed = jnp.asarray(npo.rand_packed(rng, n, k))
    if fmt == "nvfp4":
        return x, packed, jnp.asarray(npo.e4m3(rng.uniform(1, 400, (n, k // 16)))), jnp.float32(3e-4)
    return x, packed, jnp.asarray(rng.integers(118, 126, (n, k // 32)).astype(np.uint8))


def _call(fmt, operands, cfg):
    fn = f4.nvfp4_matmul_mgpu if fmt == "nvfp4" else f4.mxfp4_matmul_mgpu
    return fn(*operands, config=cfg)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_lowers_with_one_bf16_wgmma_per_k_step(wgmma_operands, fmt):
    """The block scales are applied in registers, so each 128-K step is one wgmma of the whole [64, 128] bf16
    tile (the plan's pipeline step holds two), and the PTX multiplies every decoded pair by its scale."""
    cfg = dispatch.fp4_mgpu_config(fmt, 40, 512, 1024)
    assert cfg.sub_steps == 2
    fn = f4.nvfp4_matmul_mgpu if fmt == "nvfp4" else f4.mxfp4_matmul_mgpu
    text = fn.trace(*_operands(fmt, 40, 512, 1024), config=cfg).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
    assert wgmma_operands == [jax.ShapeDtypeStruct((64, 128), jnp.bfloat16)] * 2
    assert all(f"mul.rn.bf16x2 ${p}, pair{p}, ${5 + p};" in f4._word_ptx() for p in range(4))


def test_configs_fit_the_shared_memory_and_split_k_on_whole_scale_rows():
    nv, mx = dispatch.fp4_mgpu_config("nvfp4", 64, 6144, 4096), dispatch.fp4_mgpu_config("mxfp4", 64, 6144, 4096)
    assert nv.tile_tokens == mx.tile_tokens == 64 and nv.stages >= 2
    assert nv.stages == w4.fit_stages(64, split_k=nv.split_k, asym=False, scale_rows=8, sub_steps=nv.sub_steps)
    assert mx.stages == w4.fit_stages(64, split_k=mx.split_k, asym=False, scale_rows=8, sub_steps=mx.sub_steps)
    # K = 1536 (12 K-steps), 5 channel tiles at M=16: W4A16 splits K by 4 (3 steps each); MXFP4's 16-byte
    # scale rows cover 4 steps, so it cannot split; NVFP4's cover 2, so it splits by 2.
    split4 = dispatch.mgpu_w4_config(16, 640, 1536, group=32)
    mx, nv = dispatch.fp4_mgpu_config("mxfp4", 16, 640, 1536), dispatch.fp4_mgpu_config("nvfp4", 16, 640, 1536)
    assert split4.split_k == 4 and mx.split_k == 1 and nv.split_k == 2
    assert f4.can_use("mxfp4", 16, 640, 1536, mx) and not f4.can_use("mxfp4", 16, 640, 1536, split4)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_bad_operands_name_what_is_wrong(fmt):
    cfg = dispatch.fp4_mgpu_config(fmt, 16, 256, 256)
    x, packed, scale, *rest = _operands(fmt, 16, 256, 256)
    with pytest.raises(ValueError, match="scale"):
        _call(fmt, (x, packed, scale[:, 1:], *rest), cfg)
    with pytest.raises(ValueError, match="N % 128"):
        _call(fmt, (x, packed[:192], scale[:192], *rest), cfg)
    if fmt == "nvfp4":
        with pytest.raises(ValueError, match="global_scale"):
            _call(fmt, (x, packed, scale, jnp.ones((256,), jnp.float32)), cfg)


@on_hopper
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("m", [2, 40, 300])
@pytest.mark.parametrize("n, k", [(384, 1152), (256, 4096)])
def test_matches_the_float64_oracle_on_hopper(fmt, m, n, k):
    """Random codes and scales, fresh x, unaligned token counts (the kernel allocates its output, so there is
    nothing to poison), K = 1152 (scale columns padded, no K split) and 4096 (split 4: each part starts on its
    own scale row): |y - ref| <= 1e-2 |ref| + 1e-2 rms(ref)."""
    operands = _operands(fmt, m, n, k, np.random.default_rng(m + len(fmt) + k))
    x, packed, scale, *rest = (np.asarray(v) for v in operands)
    w = npo.nvfp4_weight(packed, scale, *rest) if fmt == "nvfp4" else npo.mxfp4_weight(packed, scale)
    ref = npo.f64(x) @ w.T
    got = _call(fmt, operands, dispatch.fp4_mgpu_config(fmt, m, n, k))
    assert got.shape == (m, n) and got.dtype == jnp.bfloat16
    npo.check_close(got, ref)


@on_hopper
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_every_code_and_scale_decodes_exactly_on_hopper(fmt):
    """x = the identity (K = 256 tokens, one per column), so y^T is the decoded weight itself: every code in
    every column position, times every scale (NVFP4: every E4M3 but NaN, subnormals and negatives included;
    MXFP4: E8M0 2..250, whose products stay normal bf16), matches bit for bit."""
    k = n = 256
    group = f4.GROUPS[fmt]
    codes = (np.arange(n * k).reshape(n, k) + np.arange(n)[:, None]) % 16
    values = [b for b in range(256) if b & 0x7F != 0x7F] if fmt == "nvfp4" else list(range(2, 251))
    scale_bytes = np.resize(np.array(values, np.uint8), n * k // group).reshape(n, k // group)
    if fmt == "nvfp4":
        scale = scale_bytes.view(ml_dtypes.float8_e4m3fn)
        operands = (jnp.eye(k, dtype=jnp.bfloat16), jnp.asarray(npo.pack(codes)), jnp.asarray(scale), jnp.float32(1))
        scale_values = scale.astype(np.float64)
    else:
        operands = (jnp.eye(k, dtype=jnp.bfloat16), jnp.asarray(npo.pack(codes)), jnp.asarray(scale_bytes))
        scale_values = np.exp2(scale_bytes.astype(np.float64) - 127)
    y = _call(fmt, operands, dispatch.fp4_mgpu_config(fmt, k, n, k))
    want = np.asarray(fp4.E2M1_VALUES, np.float64)[codes] * np.repeat(scale_values, group, axis=1)
    np.testing.assert_array_equal(np.asarray(y, np.float32), want.T.astype(np.float32))


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_the_planned_configs_fit_the_kernel_on_every_aligned_shape(fmt):
    """dispatch.fp4_mgpu_config gives a config the kernel takes (a K split on whole scale rows, stages that
    fit) for every token count and 128-aligned N, K the dispatcher may send it, so the plan never falls off
    the Mosaic kernel for a config reason."""
    for m in (2, 16, 40, 64, 200, 256, 1024, 4096):
        for n in (128, 640, 4096, 6144, 28672):
            for k in range(128, 4097, 128):
                cfg = dispatch.fp4_mgpu_config(fmt, m, n, k)
                assert f4.can_use(fmt, m, n, k, cfg), (m, n, k, cfg)
