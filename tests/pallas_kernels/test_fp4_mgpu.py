"""The Mosaic GPU NVFP4 / MXFP4 kernel (pallas_kernels/fp4_mgpu.py) on the CPU: its E2M1 decode from the
signed int4 view, shared-memory fit, errors, and that it lowers for CUDA to one Mosaic GPU kernel issuing
bf16 wgmma with the token tile as wgmma's N. Its numbers are checked on a GPU by
benchmarks/gemm_probe.py --parts fp4mgpu."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _common as cm
from pallas_kernels import fp4
from pallas_kernels import fp4_mgpu as f4
from pallas_kernels import w4a16_mgpu as w4
from pallas_kernels.w4a16_mgpu import MgpuW4Config

from . import np_oracle as npo


def test_e2m1_decode_of_every_code_from_its_signed_nibble():
    codes = np.arange(16)
    signed = np.where(codes >= 8, codes - 16, codes)
    got = np.asarray(f4.e2m1_from_signed_nibble(jnp.asarray(signed, jnp.bfloat16)).astype(jnp.float32))
    want = np.asarray(fp4.E2M1_VALUES, np.float32)
    np.testing.assert_array_equal(got, want)
    assert np.all(np.signbit(got[9:]))                                 # negative codes decode negative


def test_decode_of_the_int4_view_equals_the_reference_table():
    """The kernel's path, bytes -> int4 view -> bf16 -> e2m1_from_signed_nibble, on random bytes."""
    packed = jnp.asarray(npo.rand_packed(npo.rng_for("fp4_mgpu_view"), 24, 256))
    got = f4.e2m1_from_signed_nibble(w4.bits_as_int4(packed).astype(jnp.bfloat16))
    want = fp4.e2m1_decode(cm.unpack_nibbles(packed))
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(want))


def test_stages_fit_the_block_scales():
    """NVFP4 carries 8 scale rows per step (2 KiB) and an f32 epilogue: never more stages than W4A16 sym."""
    for t in (16, 64, 128, 256):
        assert 2 <= f4.fit_stages("nvfp4", t) <= f4.fit_stages("mxfp4", t) <= w4.fit_stages(t, asym=False)


def _operands(kind, m, n, k, scale_cols=None, scale_dtype=None):
    x, packed = jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((n, k // 2), jnp.uint8)
    block = f4.BLOCK[kind]
    dtype = scale_dtype or (jnp.float8_e4m3fn if kind == "nvfp4" else jnp.uint8)
    scale = jax.ShapeDtypeStruct((n, scale_cols or k // block), dtype)
    return (x, packed, scale, jax.ShapeDtypeStruct((), jnp.float32)) if kind == "nvfp4" else (x, packed, scale)


def _fn(kind, cfg):
    if kind == "nvfp4":
        return jax.jit(lambda x, p, s, g: f4.nvfp4_matmul_mgpu(x, p, s, g, config=cfg))
    return jax.jit(lambda x, p, s: f4.mxfp4_matmul_mgpu(x, p, s, config=cfg))


@pytest.mark.parametrize("kind", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("tokens,split", [(16, 4), (128, 1), (256, 1)])
def test_lowers_to_one_mosaic_gpu_kernel_with_bf16_wgmma(kind, tokens, split):
    cfg = MgpuW4Config(tile_tokens=tokens, stages=f4.fit_stages(kind, tokens, split), split_k=split)
    text = _fn(kind, cfg).trace(*_operands(kind, 200, 512, 1024)).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 1
    assert f"wgmma.mma_async.sync.aligned.m64n{tokens}k16.f32.bf16.bf16" in text


@pytest.mark.parametrize("kind,bad,match", [
    ("nvfp4", dict(scale_cols=32), r"block_scale \(512, 32\)"),                 # blocks of 32, not 16
    ("nvfp4", dict(scale_dtype=jnp.bfloat16), r"block_scale \(512, 64\) bfloat16"),
    ("mxfp4", dict(scale_cols=64), r"scale \(512, 64\)")])
def test_bad_scales_name_the_tensor(kind, bad, match):
    with pytest.raises(ValueError, match=match):
        _fn(kind, w4.DEFAULT).trace(*_operands(kind, 64, 512, 1024, **bad))


def test_shapes_off_the_tiles_are_refused():
    with pytest.raises(ValueError, match=r"N % 128 == 0"):
        _fn("mxfp4", w4.DEFAULT).trace(*_operands("mxfp4", 64, 448, 1024))
