"""The Mosaic GPU FP8 block-scaled kernel (pallas_kernels/fp8_block_mgpu.py). On the CPU (it has no interpret
mode) CI checks its shape rules, its input errors and that it lowers for CUDA to one Mosaic GPU kernel
issuing e4m3 wgmma; on a Hopper GPU a test checks its numbers, K split or not, against the reference (as
benchmarks/gemm_probe.py --parts mgpu / fp8split do on the benchmark shapes)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _mgpu, fp8
from pallas_kernels import fp8_block_mgpu as mg
from pallas_kernels.fp8_block_mgpu import MgpuFp8Config
from . import np_oracle as npo


def test_shape_rules():
    wide_m = MgpuFp8Config(64, 128, "m", 4)
    assert (wide_m.cta_m, wide_m.cta_n) == (128, 128)
    assert (mg.DEFAULT.cta_m, mg.DEFAULT.cta_n) == (64, 256)
    assert mg.can_use(1000, 4096, 4096, wide_m)                  # M is padded inside the wrapper
    assert not mg.can_use(1024, 4096 + 64, 4096, wide_m)         # N off the CTA tile
    assert not mg.can_use(1024, 4096, 4096 + 64, wide_m)         # K off the 128 scale block
    assert not mg.can_use(1024, 4096, 4096, MgpuFp8Config(32, 128))
    assert not mg.can_use(1024, 4096, 4096, MgpuFp8Config(wg_dim="k"))
    assert mg.can_use(256, 4096, 14336, MgpuFp8Config(split_k=2))      # 112 K-steps: 56 per split
    assert not mg.can_use(256, 4096, 128 * 7, MgpuFp8Config(split_k=2))  # 7 K-steps do not split in two


def _operands(m, n, k, sw_shape=None):
    return (jax.ShapeDtypeStruct((m, k), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((m, k // 128), jnp.float32),
            jax.ShapeDtypeStruct((n, k), jnp.float8_e4m3fn),
            jax.ShapeDtypeStruct(sw_shape or (n // 128, k // 128), jnp.float32))


@pytest.mark.parametrize("cfg", [MgpuFp8Config(64, 128, "m", 4), MgpuFp8Config(64, 128, "n", 4),
                                 MgpuFp8Config(64, 128, "m", 3, chain_tiles=True)])         # 8 K-steps: 2 stages
def test_lowers_to_a_mosaic_gpu_kernel_with_fp8_wgmma(cfg):
    text = mg.fp8_block_matmul_mgpu.trace(*_operands(200, 512, 1024), config=cfg).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 1
    assert "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3" in text


@pytest.mark.parametrize("split", [2, 4])
def test_a_k_split_writes_f32_partials_that_one_fusion_sums(split):
    """split_k: the kernel's output is f32 [split * Mp, N] (Mp = 200 padded to the 64-row CTA tile), each CTA
    tile streams K / split, and the wrapper reduces the partials to bf16 [M, N]. The f32 epilogue buffers
    take 64 KiB of shared memory, so the 64 x 256 CTA tile fits 3 stages (4 do not)."""
    cfg = MgpuFp8Config(64, 128, "n", 3, split_k=split)
    lowered = mg.fp8_block_matmul_mgpu.trace(*_operands(200, 512, 1024), config=cfg).lower(
        lowering_platforms=("cuda",))
    text = lowered.as_text()
    (call,) = [line for line in text.splitlines() if "stablehlo.custom_call @mosaic_gpu" in line]
    assert call.rsplit("->", 1)[1].strip().startswith(f"tensor<{split * 256}x512xf32>")
    assert "stablehlo.reduce" in text and lowered.out_info.shape == (200, 512)
    assert lowered.out_info.dtype == jnp.bfloat16


def test_each_step_promotes_its_own_partial_with_both_scales(promotions):
    """The K-step body is traced once and promotes its fresh [tile_m, tile_n] wgmma partial into the sum with
    the step's x scales (per row) and w scales (per column)."""
    cfg = MgpuFp8Config(64, 128, "m", 4)
    mg.fp8_block_matmul_mgpu.trace(*_operands(72, 512, 1024), config=cfg).lower(lowering_platforms=("cuda",))
    assert promotions == [((64, 128), jnp.float32)]                    # (M=72: no earlier trace cached)


def test_bad_shapes_name_what_is_wrong():
    with pytest.raises(ValueError, match="N % 256"):
        mg.fp8_block_matmul_mgpu.trace(*_operands(64, 384, 1024))
    with pytest.raises(ValueError, match="w_scale"):
        mg.fp8_block_matmul_mgpu.trace(*_operands(64, 512, 1024, sw_shape=(4, 7)))


@pytest.mark.skipif(jax.default_backend() != "gpu" or not _mgpu.is_hopper(), reason="Mosaic GPU kernels need Hopper")
@pytest.mark.parametrize("cfg", [MgpuFp8Config(64, 128, "n", 4), MgpuFp8Config(64, 128, "n", 3, split_k=2),
                                 MgpuFp8Config(64, 128, "m", 3, split_k=4)])
def test_the_kernel_equals_the_reference_on_hopper(cfg):
    """M = 200 (padded to the CTA tile), N = 512, K = 2048 (16 K-steps, 4 per split at split 4), fresh random
    codes and scales: |y - ref| <= 1e-2 |ref| + 1e-2 rms(ref) (f32 summation order, one bf16 rounding)."""
    rng = npo.rng_for("fp8_block_mgpu_hopper", cfg.split_k, cfg.wg_dim)
    m, n, k = 200, 512, 2048
    x = jnp.asarray(npo.rand_x(rng, m, k))
    wq = jnp.asarray(npo.e4m3(rng.standard_normal((n, k)) * 64))
    w_scale = jnp.asarray(rng.uniform(1e-4, 4e-4, (n // 128, k // 128)).astype(np.float32))
    xq, sx = fp8.quantize_fp8_1x128(x)
    out = mg.fp8_block_matmul_mgpu(xq, sx, wq, w_scale, config=cfg)
    npo.check_close(np.asarray(out, np.float32), np.asarray(fp8.fp8_block_matmul_reference(x, wq, w_scale),
                                                            np.float32), 1e-2)
