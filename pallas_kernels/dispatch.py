"""Pick the fastest correct GEMM path per (recipe, M bucket, shape), with tuning knobs per bucket.

Paths:
  'pallas'       the recipe's Pallas Triton kernel with a tuned config
  'gemv'         M=1: the int32-word GEMVs (CUDA cores, no MMA) of w4a16_gemv.py (W4A16; W4A8 on its E4M3
                 codes, input_scale after the sum) and fp4_gemv.py (NVFP4, MXFP4)
  'mgpu'         the Mosaic GPU kernels (TMA, wgmma, warp specialization; Hopper only): W4A16 (groups 128,
                 64, 32) from M=2 (w4a16_mgpu.py, weights decoded in registers, swap-AB; W4A8 from M=2 on its FP8
                 variant: weights decoded to e4m3, e4m3 wgmma), NVFP4 / MXFP4 from M=2 (fp4_mgpu.py,
                 E2M1 decoded to bf16 in registers) and FP8 block-scaled at large M (fp8_block_mgpu.py). In
                 interpret mode or on another GPU the recipe's plan without Mosaic stands in
  'xla_dequant'  dequantise the weights once per call to bf16, then XLA's cuBLAS dot (large M, where the
                 GEMM is compute-bound and cuBLAS beats the Pallas kernel by more than the dequant pass)
  'xla'          XLA's own FP8 cuBLASLt path (per-tensor and rowwise FP8)
The crossovers and configs come from benchmarks/gemm.py --tune runs (benchmarks/results/, card named
there; notes in benchmarks/results/gemm_notes.md); packed4.default_config / fp8.fp8_default_config are
the shape-only heuristics for anything the tables do not cover.

Weights per recipe (the canonical layouts of each kernel module):
  w4a16:       packed [N, K/2] u8, scale [N, K/G], zero None | [N, K/G], perm None | [K]
  nvfp4:       packed, block_scale e4m3 [N, K/16], global_scale f32 []
  mxfp4:       packed, scale u8 [N, K/32]
  w4a8:        packed, weight_scale [N, K/G], input_scale f32 []
  w4a8_mxfp4:  packed, scale u8 [N, K/32], input_scale f32 []               (FP8 activations x MXFP4)
  w4a8_nvfp4:  packed, block_scale e4m3 [N, K/16], global_scale f32 [], input_scale f32 []
  fp8_block:   wq e4m3 [N, K], w_scale f32 [ceil(N/128), ceil(K/128)]
  fp8:         wq e4m3 [N, K], w_scale f32 [], input_scale f32 [] (static activation scale)
  fp8_rowwise: wq e4m3 [N, K], w_scale f32 [N] (activations quantized per token, dynamically)
w4a16 and w4a8 may also carry mgpu_rows (with_step_rows: the Mosaic kernels' scale rows, built once so that
no call transposes the scales).

Groups: weights that share x (q, k, v; gate, up) run as one launch where `group_plan` allows it
(`quantized_matmul_group`: on the word GEMV at M=1, W4A8 with a row of E4M3 codes per weight; on the Mosaic
GPU kernels from M=2), planned as their [M, sum N] product.

Activations: x in its model dtype, quantized here where the recipe has FP8 activations (static ones as
e4m3(x / input_scale)). The FP4 x FP8 recipes (W4A8_FP4) also take x already as float8_e4m3fn codes:
then input_scale is their dequant multiplier, and out_dtype (default bf16) the result's dtype.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _common as cm
from pallas_kernels import (_mgpu, fp4, fp4_gemv, fp4_mgpu, fp8, fp8_block_mgpu, packed4, w4a8, w4a8_fp4, w4a16,
                            w4a16_gemv)
from pallas_kernels import w4a16_mgpu
from pallas_kernels.fp8 import Fp8Config
from pallas_kernels.fp8_block_mgpu import MgpuFp8Config
from pallas_kernels.packed4 import Packed4Config
from pallas_kernels.w4a16_gemv import GemvConfig
from pallas_kernels.w4a16_mgpu import MgpuW4Config

RECIPES = ("w4a16", "nvfp4", "mxfp4", "w4a8", "w4a8_mxfp4", "w4a8_nvfp4", "fp8_block", "fp8", "fp8_rowwise")
W4A8_FP4 = ("w4a8_mxfp4", "w4a8_nvfp4")  # FP4 weights x static FP8 activations (w4a8_fp4.py)
M_BUCKETS = (1, 16, 64, 256, 1024, 4096)


@dataclasses.dataclass(frozen=True)
class Plan:
    path: str                                           # 'pallas' | 'gemv' | 'mgpu' | 'xla_dequant' | 'xla'
    config: Packed4Config | Fp8Config | GemvConfig | MgpuFp8Config | MgpuW4Config | None = None


def m_bucket(m: int) -> int:
    """The smallest bucket >= m (the largest bucket for anything above it)."""
    return next((b for b in M_BUCKETS if m <= b), M_BUCKETS[-1])


# Smallest M bucket from which 'xla_dequant' beats the recipe's Pallas kernel. Measured on an H100
# (benchmarks/results/gemm_NVIDIA_H100_80GB_HBM3_2026-11-27*.json): at M=256 the tuned packed-4 kernel
# beat XLA dequant-then-dot on every 8B layer (e.g. 8b.gate_up 257 us vs 412 us); from M=1024 the
# dequant-then-cuBLAS path wins (8b.qkv M=1024: 146 us vs 212 us; 118 us since the dequant unpacks by a
# uint4 bitcast, gemm_probe *_xla4.json, and 8b.gate_up 524 us, *_run5_bench.json). FP8 block: the Pallas kernel beat
# the bf16-dequant path at every M tried (256..4096), so it has no entry. The FP4 recipes on the H200 (run 76,
# gemm_probe --parts fp4paths, device us on 8b qkv / gate_up / down, packed-4 plan vs xla_dequant): NVFP4 and
# MXFP4 keep the plan to M=64 (NVFP4 M=64: 27.2 / 93.9 / 50.8 vs 50.4 / 205.1 / 110.1) and dequantise from
# M=256 (NVFP4 79.8 / 273.5 / 188.5 vs 56.9 / 244.0 / 118.0; MXFP4 gate_up 250.7 vs 256.1, the rest the
# dequant's); W4A8 x MXFP4 the same (M=64: 58.2 / 219.8 / 97.5 vs 54.9 / 221.7 / 121.8; M=256: 215.6 / 730.2
# / 452.0 vs 64.7 / 259.8 / 135.7); W4A8 x NVFP4's block-MMA packed-4 mode lost from M=16 (74.1 / 244.5 /
# 133.8 vs 48.5 / 204.2 / 109.5; 587-2040 us at M=256).
XLA_DEQUANT_FROM: dict[str, int] = {"w4a16": 1024, "nvfp4": 256, "mxfp4": 256, "w4a8": 1024,
                                    "w4a8_mxfp4": 256, "w4a8_nvfp4": 16}

# NVFP4 / MXFP4 run the Mosaic GPU kernel (fp4_mgpu.py) from M=2 on Hopper wherever it takes the shape (run 88
# timed its current form, reading the stored scales: gate_up M=16 47.1 / 43.5 us NVFP4 / MXFP4). H200,
# run 85 (gemm_probe --parts fp4paths, device us on 8b qkv / gate_up / down, NVFP4; MXFP4 alike): M=16 15.8 /
# 50.1 / 25.7 against packed-4's 32.0 / 76.5 / 55.9 (run 82) and XLA bf16's 16.8 / 57.4 / 33.0; M=256 32.7 /
# 107.3 / 60.2 against xla_dequant's 56.8 / 242.4 / 118.0; M=4096 287.3 / 1349.2 / 667.3 against 304.4 /
# 1465.5 / 676.6. Shapes off its grid keep the packed-4 plan, then xla_dequant from XLA_DEQUANT_FROM.

# Packed-4 tiles per M bucket, tuned on W4A16 (shared by every packed-4 recipe: one skeleton; the W4A8_FP4
# recipes' block-MMA mode ignores presplit_x and is not yet tuned), H100:
# (block_m, block_n, num_warps, unroll, presplit_x); split_k then fills about one wave of SMs.
PACKED4_TILES: dict[int, tuple[int, int, int, int, bool]] = {
    1: (16, 64, 2, 2, False),       # N < GEMV_MIN_N: MMA with split-K (8b.o 12.9 us)
    16: (16, 64, 2, 2, False),
    64: (64, 128, 4, 1, False),
    256: (64, 128, 4, 1, True),
}
# M=1 from N = 6144 up: the GEMV path, no split (measured: GEMV won on 8b.qkv N=6144, 15 us, and
# 8b.gate_up, 45 us; the MMA split-K tile won on 8b.o N=4096).
GEMV_MIN_N = 6144
GEMV_TILE = Packed4Config(block_m=1, block_n=16, block_k=128, split_k=1, num_warps=2, num_stages=3, unroll=4)
# W4A16 at M=1: the word GEMV beat the packed-4 plan on every Llama-3.1-8B layer (H100,
# benchmarks/results/gemm_probe_NVIDIA_H100_80GB_HBM3_2026-11-27.json). Tiles by shape class, (block_n, block_k,
# unroll, num_warps, programs that split-K aims for, prefetch). Re-swept after the FMA-chain decode (H200, device
# us, run 62, benchmarks/results/gemv_tile_sweep_NVIDIA_H200_2026-11-28_run62.json; the old tiles' time in
# brackets):
# wide 8b.gate_up 24.3 (27.1), 70b.gate_up 83.7 (97.4); deep 8b.down 16.8 (16.6), 70b.down 43.8 (55.8),
# 70b.qkv 20.5 (23.4), 70b.o 15.5 (16.9); small 8b.qkv 8.1 (9.3), 8b.o 6.7 (6.5).
# The register prefetch (GemvConfig.prefetch; run 71, gemm_probe --parts gemvprefetch, device us, without in
# brackets): wide on 16 channels 8b.gate_up 23.4 (24.4 on 32), 70b.gate_up 80.0 (83.6); small 8b.o 6.1 (6.6),
# 8b.qkv 8.1 (8.1); not deep: 70b.down 47.7 (44.2). K splits 1-8 (run 70): the deep class's powers of two
# stay (8b.down 15.1 us at split 3 vs 16.8 at 4, but 70b.down 48.9 at 3 vs 44.0 at 2: no wave rule fits both).
# The deep class on 16 channels x 1024 K with the prefetch (run 91, gemm_probe --parts gemvdeep, H200 device
# us, the 32-channel tile without it in brackets): 8b.down 15.0 (17.0, split 2 vs 4), 70b.qkv 18.5 (20.9),
# 70b.o 14.8 (15.9), 70b.down 44.4 (44.2), splits 1 on the 70B layers; without the prefetch 70b.down lost 5 %.
GEMV_WIDE_N, GEMV_DEEP_K = 14336, 8192
# A grouped GEMV (q / k / v in one launch) takes the wide tile from a summed N of 6144: device time (run 40,
# H100) 9.0 us vs 10.1 on the small tile with split-K for 8b.qkv, 26.7 vs 27.6 (the fused weight on the deep
# tile) for 70b.qkv.
GROUP_GEMV_WIDE_N = 6144
GEMV_TILES: dict[str, tuple[int, int, int, int, int, bool]] = {
    "wide": (16, 1024, 1, 4, 0, True),      # N >= GEMV_WIDE_N (gate_up): enough programs without split-K
    "deep": (16, 1024, 1, 4, 512, True),    # K >= GEMV_DEEP_K (down, and every 70B layer)
    "small": (16, 512, 2, 4, 0, True),      # the rest (8B qkv, o)
}
# NVFP4 / MXFP4 at M=1: the FP4 word GEMV beat the packed-4 plan on every 8B layer (H100,
# benchmarks/results/gemm_probe_NVIDIA_H100_80GB_HBM3_2026-11-27_fp4gemv.json, NVFP4 / MXFP4 us):
# gate_up 61.7 / 60.1 vs 69.2 / 68.7, down 34.3 / 33.5 vs 57.1 / 54.6, qkv 16.5 / 15.7 vs 26.0 / 25.4,
# o 12.4 / 13.4 vs 20.7 / 20.4. Same shape classes and fields as GEMV_TILES.
# After the FMA chain (run 63, H200 device us, NVFP4 / MXFP4): the wide tile below 42.6 / 40.7 on 8b.gate_up
# (the old (32, 256) tile 44.7 / 41.6; NVFP4 took 66.3 before the FMAs, ncu run 56). With the byte-permute
# decode (runs 69, 71): wide 8b.gate_up 31.9 / 28.6, 70b.gate_up 113.9 / 102.6; small on the wide tile 8b.qkv
# 9.2 / 8.4 (10.0 / 9.8 on the old (64, 256) split 8), 8b.o 7.6 / 7.2 (7.6 / 7.4); deep with the prefetch
# 8b.down 19.0 / 17.3 (19.9 / 17.8 without), 70b.down 63.9 / 56.0 (69.1 / 60.4).
FP4_GEMV_TILES: dict[str, tuple[int, int, int, int, int, bool]] = {
    "wide": (16, 512, 2, 4, 0, False),
    "deep": (32, 256, 2, 4, 512, True),
    "small": (16, 512, 2, 4, 0, False),
}
FP8_LARGE_M = Fp8Config(128, 128, 128, split_k=1, swap_ab=False, num_warps=8, num_stages=4)
# FP8 block-scaled from the M=256 bucket on: the Mosaic GPU kernel, H100 (gemm_probe *_mgpu.json), TFLOP/s:
# 8b.gate_up M=4096 856-889 (Triton 336, XLA bf16 647-651), M=1024 806-877 (Triton 325-331); 8b.qkv M=4096
# 851-868 (Triton 328), M=1024 760-767, M=256 435 with the warpgroups side by side along N (Triton 226).
MGPU_FP8_FROM = 256
MGPU_FP8_TILES = {256: MgpuFp8Config(64, 128, "n", 4), "larger": MgpuFp8Config(64, 128, "m", 4)}
# Where its CTA tiles fill under half of the SMs the FP8 block kernel splits K like the W4A16 kernel's 128-token
# tiles (_half_wave_split), with 3 stages (its f32 epilogue buffers take the fourth's shared memory). Device time
# (run 47, H200, us at split 1 / 2 / 4, M=256, XLA bf16 last): 8b.down (64 tiles) 76.9 / 57.0 / 62.2, 46.6;
# 8b.qkv (96 tiles) 29.2 / 38.1 / 38.9, 24.6; 70b.qkv (160 tiles, a wave or more: no split) 88.3 / 87.1 / 86.8.
FP8_SPLIT_STAGES = 3
# W4A16 (group 128, sym and asym) from M=2 on: the Mosaic GPU kernel, H100 (gemm_probe *_2026-11-28*.json, us,
# kernel / previous plan / XLA bf16): 8b.gate_up M=16 43 / 56 / 86, M=64 51 / 89 / 89, M=256 124 / 248 / 128,
# M=1024 364 / 528 / 390, M=4096 1475 / 1648 / 1601; 8b.down M=64 35 / 48 / 56, M=1024 173 / 239 / 166; 8b.qkv
# M=256 46 / 76 / 37. Token tile per M bucket; the K split and the 128 / 256 choice by how full the last wave
# of CTA tiles is (measured: qkv M=1024 t128 94 us vs t256 100; down M=1024 t256 173 vs t128 203). M=256 (run
# 17, us): t128 split 1 / 2 / 4, t64 split 1 / 2: qkv 42.5 / 45.4 / 42.0, 48.9 / 45.5; down 98.2 / 59.9 / 62.8,
# 77.9 / 85.0 (XLA bf16 31.9 and 59.7): t128, split only below half the SMs, or in two where a grid of more
# than one wave leaves its last one mostly idle (run 26, 70b.qkv M=256, 160 tiles: 120.4 / 102.9 / 102.8 us at
# split 1 / 2 / 4; W4A8 102.2 / 94.7 / 96.2). Groups of 64 and 32 run the same tiles (one wgmma per group; run
# 23, us, plan vs the packed-4 kernel, symmetric, qkv / down / gate_up): g64 M=16 22.6 / 27.0 / 44.8 vs 38.5 /
# 42.4 / 62.6, M=256 39.8 / 58.1 / 124.7 vs 97.3 / 204.6 / 367.7; g32 M=16 21.3 / 30.4 / 50.2 vs 44.6 / 82.5 /
# 131.6, M=256 38.0 / 63.8 / 129.9 vs 163.8 / 448.1 / 607.4; at M=4096 against XLA dequant, within the run's
# noise (g32 345 / 746 / 1572 vs 323 / 749 / 1723; the g128 plan timed twice read 454 and 306 on qkv).
# From 129 tokens, 256-token tiles where their last wave is at least 80 % full (run 44, H200, device us, t128 /
# t256 at the best split, M=256): 8b.gate_up (224 t256 tiles, 85 %) 117.4 / 101.4 (XLA bf16 102.0); 8b.qkv
# (48, 36 %) 30.8 / 33.1; 8b.down (32) 56.5 / 54.9; 70b.qkv (80, 61 %) 92.6 / 94.8.
MGPU_W4_TILE = {16: 16, 64: 64, 256: 256, "larger": 256}
# W4A8 from M=2: the FP8-tensor-core variant (w4a8_matmul_mgpu, INT4 -> e4m3 in registers, e4m3 wgmma
# promoted per K-step), token tiles <= 128. Run 17 (us, qkv / gate_up / down, against the W4A16 kernel on the
# E4M3 codes widened to bf16 and XLA bf16): M=64 26.9 / 50.5 / 37.9 vs 29.5 / 56.0 / 33.4 vs 46.1 / 86.8 /
# 58.8; M=256 30.8 / 101.9 / 56.5 vs 54.7 / 127.2 / 91.0 vs 49.9 / 128.0 / 60.0; M=4096 302 / 1257 / 703 vs
# 346 / 1482 / 826 vs 313 / 1527 / 729. It is also the more exact: its e4m3 x int4 products and per-step sums
# are exact, where the widened path rounds weight_scale * input_scale and each weight to bf16 (which failed
# the elementwise 1e-2 check at gate_up M=256 and M=4096). M=16 (run 18, a noisy run: its XLA bf16 qkv M=256
# read 58.8 us against 31.9 in run 17): 31.9 / 44.4 / 36.9 vs the packed-4 kernel's 29.8 / 179.0 / 43.2.

# Chained tiles (a CTA's tiles as one pipeline of pipelines, MgpuW4Config / MgpuFp8Config.chain_tiles) where the
# grid gives every SM at least this many CTA tiles. Run 42 (H200, device us, plan / chained): 4096 tokens,
# 8b.gate_up W4A16 1332 / 1324, W4A8 1224 / 1184, FP8 block 1056 / 1040; 8b.qkv 287 / 284, 291 / 280, 271 / 263;
# 8b.down 659 / 656, 668 / 649, 652 / 646. 256 tokens: gate_up (3.4 tiles per SM) W4A8 98.4 / 94.7, FP8 block
# 92.1 / 89.2; qkv (1.5) 30.8 / 31.6, 27.9 / 28.8, 29.6 / 31.8; down (under 1) FP8 block 76.7 / 85.6. 16 tokens,
# gate_up (1.7): W4A16 38.9 / 40.9.
CHAIN_MIN_TILES_PER_SM = 3


def chained(tiles: int) -> bool:
    """Whether a Mosaic GPU grid of `tiles` CTA tiles runs them chained (CHAIN_MIN_TILES_PER_SM)."""
    return tiles >= CHAIN_MIN_TILES_PER_SM * cm.NUM_SMS


def _wave_fill(tiles: int) -> float:
    """Fraction of the SM slots busy over the waves a grid of `tiles` CTA tiles takes (0 for no tiles: N under
    one 128-channel tile, which the kernel's can_use then refuses)."""
    return tiles / (cm.cdiv(tiles, cm.NUM_SMS) * cm.NUM_SMS) if tiles else 0.0


# W4A16 token tiles under 128 on 256-channel CTA tiles (MgpuW4Config.wg_channels 128: one x tile for twice the
# weights, two sub-steps: four would not fit the registers) where those tiles still fill this share of the SMs:
# the gate_up layers. Device time (runs 102-103, H200, us, plan (64 channels, 4 / 2 sub-steps at M=16 / 64) /
# 128 channels, 2 sub-steps, sym then asym): 8b.gate_up (112 wide tiles) M=16 34.6 / 31.4, 41.4 / 38.7; M=64
# 44.7 / 41.1, 50.2 / 46.5; 70b.gate_up (224) M=16 115.9 / 107.8, 126.0 / 131.6; M=64 165.7 / 146.1, 177.9 /
# 165.2. Narrower layers lose (at the best split): 70b.qkv (40) M=16 32.1 / 33.2, M=64 41.1 / 45.6; 8b.down
# (16) M=64 24.0 / 25.4; 8b.qkv (24) M=64 15.0 / 15.6.
WIDE_WG_MIN_FILL = 0.8


def mgpu_w4_config(m: int, n: int, k: int, fp8: bool = False, group: int = 128, wide_warpgroups: bool = True,
                   most_sub_steps: int = 4) -> MgpuW4Config:
    """W4A16 Mosaic GPU tiles for this shape (fp8: for the W4A8 FP8-tensor-core variant, token tiles <= 128;
    group: the quantization group, whose 128 / group scale rows per K-step size the pipeline's stages):
    the bucket's token tile (from 129 tokens: 256 unless its last wave is under 80 % full, then 128), then the K
    split: token tiles < 128 balance the waves (_balanced_split), tiles >= 128 take the smallest split
    (<= 4) that gives a tile to half of the SMs. Measured, 8b.down M=16: 70 / 40 / 37 us at split 1 / 2 / 4;
    M=256 with t128 (run 17): down (64 tiles) 98 / 60 us at split 1 / 2, qkv (96 tiles) 42.5 / 45.4. Token
    tiles >= 128 also split in two where the grid takes more than one wave and fills under 65 % of its SM
    slots (70b.qkv M=256, 160 tiles: 120 / 103 us). Tiles chain where there are enough (chained); token tiles
    under 128 take two or four K-steps per pipeline step (sub_steps). W4A16 (not fp8; wide_warpgroups, which
    the FP4 kernels' plans turn off) with token tiles under 128 runs 128 channels per warpgroup where its
    256-channel tiles fill WIDE_WG_MIN_FILL of the SMs. most_sub_steps caps the sub-steps."""
    bucket = m_bucket(m)
    t = MGPU_W4_TILE.get(bucket, MGPU_W4_TILE["larger"])
    channel_tiles = n // w4a16_mgpu.CTA_CHANNELS
    if t == 256 and (fp8 or m <= 128 or _wave_fill(channel_tiles * cm.cdiv(m, 256)) < 0.8):
        t = 128
    wide = (wide_warpgroups and not fp8 and t < 128 and n % (2 * w4a16_mgpu.CTA_CHANNELS) == 0
            and n // (2 * w4a16_mgpu.CTA_CHANNELS) * cm.cdiv(m, t) >= WIDE_WG_MIN_FILL * cm.NUM_SMS)
    wg_channels = 2 * w4a16_mgpu.WG_CHANNELS if wide else w4a16_mgpu.WG_CHANNELS
    tiles = n // (2 * wg_channels) * cm.cdiv(m, t)
    if t < 128:
        split = _balanced_split(tiles, k)
    else:
        split = _half_wave_split(tiles, k)
        if tiles > cm.NUM_SMS and _wave_fill(tiles) < 0.65 and k % 256 == 0:
            split = 2
    subs = min(sub_steps(t, k // w4a16_mgpu.GROUP // split, fp8), 2 if wide else most_sub_steps)
    stages = w4a16_mgpu.fit_stages(t, split_k=split, asym=not fp8, x_bytes=1 if fp8 else 2,
                                   scale_rows=w4a16_mgpu.GROUP // group, sub_steps=subs, wg_channels=wg_channels)
    return MgpuW4Config(tile_tokens=t, stages=stages, split_k=split, chain_tiles=chained(tiles * split),
                        sub_steps=subs, wg_channels=wg_channels)


def sub_steps(tile_tokens: int, k_steps: int, fp8: bool = False) -> int:
    """128-K sub-steps per pipeline step of the swap-AB Mosaic kernels (MgpuW4Config.sub_steps), for token
    tiles under 128 where the K-steps of a split divide: 4 for 16-token tiles of W4A16 / FP4 (3 stages fit),
    else 2; 1 from 128-token tiles (at most 2 stages of two fit there). Device time (run 96, H200, us, 1 / 2
    sub-steps, W4A16 / NVFP4 / MXFP4): M=16 8b.gate_up 38.9 / 37.7, 47.1 / 42.3, 43.5 / 40.3; 8b.down 22.7 /
    19.9, 23.5 / 21.8, 22.2 / 20.0; 70b.qkv 35.6 / 33.8, 40.3 / 37.4, 38.1 / 35.6; M=64 8b.gate_up 48.1 /
    44.2, 53.3 / 50.1, 51.2 / 46.7; 8b.down 25.4 / 24.1, 27.3 / 25.9, 25.6 / 24.0; 70b.qkv 43.9 / 41.3, 47.7
    / 46.0, 46.4 / 43.1. M=256 (128-token tiles, 2 stages left) mixed: 8b.down 56.1 / 55.7, 60.0 / 58.4, 58.1
    / 62.4; 70b.qkv 96.6 / 97.5, 107.8 / 101.0, 101.7 / 103.7. Run 98 (us, 1 / 2 / 4 sub-steps): M=16
    8b.gate_up W4A16 38.5 / 37.6 / 34.4, NVFP4 46.9 / 42.4 / 41.8, MXFP4 43.3 / 40.1 / 39.4, W4A8 39.4 / 36.2
    / 35.8; 8b.down 22.4 / 19.5 / 19.4, 23.4 / 21.6 / 21.5, 22.2 / 19.9 / 20.0, 22.6 / 21.0 / 21.4; 70b.qkv
    35.2 / 33.8 / 32.5, 39.7 / 37.5 / 36.9, 37.3 / 35.0 / 34.9, 34.1 / 33.0 / 32.9; W4A8 M=64 (four fit
    there) 8b.gate_up 45.4 / 43.3 / 43.9, 8b.down 26.1 / 24.3 / 25.0, 70b.qkv 42.2 / 41.9 / 41.7: W4A8
    takes 2."""
    if tile_tokens >= 128:
        return 1
    if tile_tokens <= 16 and not fp8 and k_steps % 4 == 0:
        return 4
    return 2 if k_steps % 2 == 0 else 1


def fp4_mgpu_config(fmt_kind: str, m: int, n: int, k: int) -> MgpuW4Config:
    """NVFP4 / MXFP4 on fp4_mgpu.py: W4A16's Mosaic tiles and K split for this shape (the split halved until
    each part starts on a scale row: fp4_mgpu.SCALE_STEPS) and sub-steps, with the stages refitted to its scale
    tile per K-step (16 bytes per channel, the bytes of 8 bf16 rows) and no zero rows."""
    cfg = mgpu_w4_config(m, n, k, group=fp4_mgpu.GROUPS[fmt_kind], wide_warpgroups=False)
    split = cfg.split_k
    while split > 1 and (k // w4a16_mgpu.GROUP // split) % fp4_mgpu.SCALE_STEPS[fmt_kind]:
        split //= 2
    subs = sub_steps(cfg.tile_tokens, k // w4a16_mgpu.GROUP // split)
    stages = w4a16_mgpu.fit_stages(cfg.tile_tokens, split_k=split, asym=False,
                                   scale_rows=w4a16_mgpu.SCALE_ROW_BYTES // 2, sub_steps=subs)
    return dataclasses.replace(cfg, split_k=split, stages=stages, sub_steps=subs)


def _half_wave_split(tiles: int, k: int) -> int:
    """The K split of W4A16 / W4A8 token tiles >= 128 and of the FP8 block kernel: the smallest (<= 4, K a
    multiple of 128 x split) that gives a CTA tile to half of the SMs."""
    split = 1
    while tiles * split < 0.5 * cm.NUM_SMS and split < 4 and k % (256 * split) == 0:
        split *= 2
    return split


def _balanced_split(tiles: int, k: int) -> int:
    """The K split of W4A16 / W4A8 token tiles < 128: none for a grid of a wave or more (the f32 partials
    would cost more than the last wave's idle SMs: 8b.gate_up M=64 would write 29 MB of them); below, the K
    split (1, 2 or 4) whose waves of CTA tiles give each SM the least K to stream, ceil(tiles * split / SMs)
    / split, the smaller split on a tie (fewer partials to sum). Device time (run 40, H100, us at split 1 / 2 /
    4 / 8, W4A16): 8b.qkv (48 tiles) M=64 23.7 / 16.5 / 18.9 / 20.4; 70b.qkv (80 tiles) M=64 45.3 / 50.8 /
    44.8 / 48.3, M=16 40.6 / 39.2 / 35.8 / 36.5; 8b.o (32 tiles) M=64 23.0 / 15.4 / 11.3 / 13.8. W4A8 the same
    within 2 us."""
    if tiles >= cm.NUM_SMS:
        return 1
    candidates = [1] + [s for s in (2, 4) if k % (w4a16_mgpu.GROUP * s) == 0]      # split 1 fits any K
    return min(candidates, key=lambda s: (cm.cdiv(tiles * s, cm.NUM_SMS) / s, s))


def fill_split(progs: int, chunks: int, target: int) -> int:
    """Largest power-of-two split (dividing chunks, >= 4 chunks per split) until progs * split >= target."""
    split = 1
    while progs * split < target and split * 2 <= max(chunks // 4, 1) and chunks % (split * 2) == 0:
        split *= 2
    return split


def _gemv_tile(n: int, k: int, tiles: dict, wide_n: int = GEMV_WIDE_N) -> GemvConfig:
    """The GEMV tile of this shape class (wide from N = wide_n), split-K sized so the grid reaches the class's
    program target."""
    shape_class = "wide" if n >= wide_n else "deep" if k >= GEMV_DEEP_K else "small"
    bn, bk, unroll, warps, target, prefetch = tiles[shape_class]
    iterations, split = cm.cdiv(k, bk) // unroll, 1
    while cm.cdiv(n, bn) * split < target and iterations >= 4 * split:     # >= 2 iterations per split
        split *= 2
    return GemvConfig(bn, bk, split, unroll, warps, 3, prefetch)


def gemv_config(n: int, k: int, group: int, wide_n: int = GEMV_WIDE_N) -> GemvConfig:
    """W4A16: the measured GEMV tile for this shape class; the heuristic where invalid."""
    cfg = _gemv_tile(n, k, GEMV_TILES, wide_n)
    return cfg if w4a16_gemv.config_is_valid(group, cfg) else w4a16_gemv.default_config(n, k, group)


def fp4_gemv_config(fmt_kind: str, n: int, k: int) -> GemvConfig:
    """NVFP4 / MXFP4: the measured FP4 GEMV tile for this shape class; the heuristic where invalid."""
    cfg = _gemv_tile(n, k, FP4_GEMV_TILES)
    return cfg if fp4_gemv.config_is_valid(fmt_kind, cfg) else fp4_gemv.default_config(n, k)


def packed4_config(fmt: packed4.Packed4Format, m: int, n: int, k: int) -> Packed4Config:
    """Measured tiles for the bucket of m with split_k for this (n, k); the shape heuristic elsewhere."""
    bucket = m_bucket(m)
    bk = min(128, fmt.group) if fmt.post_scale else 128
    if bucket == 1 and n >= GEMV_MIN_N:
        cfg = dataclasses.replace(GEMV_TILE, block_k=bk)
    elif bucket in PACKED4_TILES:
        bm, bn, warps, unroll, presplit = PACKED4_TILES[bucket]
        progs = cm.cdiv(m, bm) * cm.cdiv(n, bn)
        split = 1 if presplit else fill_split(progs, cm.cdiv(k, bk) // unroll, cm.NUM_SMS)
        cfg = Packed4Config(bm, bn, bk, split, presplit, warps, 3, unroll)
    else:
        return packed4.default_config(fmt, m, n, k)
    return cfg if packed4.config_is_valid(fmt, cfg) else packed4.default_config(fmt, m, n, k)


def plan(recipe: str, m: int, n: int, k: int, group: int = 128, mosaic: bool = True) -> Plan:
    """The path and config for one GEMM; shapes are static, so this runs at trace time. mosaic=False: the
    plan without the W4A16 / W4A8 Mosaic GPU kernel (interpret mode, GPUs before Hopper)."""
    if recipe in ("fp8", "fp8_rowwise"):
        return Plan("xla")
    if mosaic and m > 1 and (recipe == "w4a16" or (recipe == "w4a8" and group == w4a16_mgpu.GROUP)):
        cfg = mgpu_w4_config(m, n, k, fp8=recipe == "w4a8", group=group)
        if w4a16_mgpu.can_use(m, n, k, group, cfg):
            return Plan("mgpu", cfg)
    if mosaic and recipe in fp4_mgpu.GROUPS and m > 1:
        cfg = fp4_mgpu_config(recipe, m, n, k)
        if fp4_mgpu.can_use(recipe, m, n, k, cfg):
            return Plan("mgpu", cfg)
    if m_bucket(m) >= XLA_DEQUANT_FROM.get(recipe, 1 << 30):
        return Plan("xla_dequant")
    if recipe == "fp8_block":
        bucket = m_bucket(m)
        mgpu = MGPU_FP8_TILES.get(bucket, MGPU_FP8_TILES["larger"])
        if bucket >= MGPU_FP8_FROM and fp8_block_mgpu.can_use(m, n, k, mgpu):
            tiles = cm.cdiv(m, mgpu.cta_m) * (n // mgpu.cta_n)
            split = _half_wave_split(tiles, k)
            return Plan("mgpu", dataclasses.replace(mgpu, split_k=split, stages=mgpu.stages if split == 1 else
                                                    FP8_SPLIT_STAGES, chain_tiles=chained(tiles * split)))
        return Plan("pallas", FP8_LARGE_M if m > 64 else fp8.fp8_default_config(m, n, k))
    if recipe in ("w4a16", "w4a8") and w4a16_gemv.shape_is_supported(m, n, k, group):
        return Plan("gemv", gemv_config(n, k, group))
    if recipe in ("nvfp4", "mxfp4") and fp4_gemv.shape_is_supported(recipe, m, n, k):
        return Plan("gemv", fp4_gemv_config(recipe, n, k))
    fmt = {
        "w4a16": packed4.Packed4Format("int4", group),
        "nvfp4": fp4.NVFP4,
        "mxfp4": fp4.MXFP4,
        "w4a8": packed4.Packed4Format("int4", group, act="fp8", has_global=True),
        "w4a8_mxfp4": w4a8_fp4.MXFP4_FP8,
        "w4a8_nvfp4": w4a8_fp4.NVFP4_FP8,
    }[recipe]
    return Plan("pallas", packed4_config(fmt, m, n, k))


def group_plan(recipe: str, m: int, ns: tuple, k: int, group: int = 128, mosaic: bool = True) -> Plan | None:
    """The plan for one launch over weights of widths ns that share x [M, K] (a grouped GEMM), or None where
    they should run as separate calls. W4A16 and W4A8 groups, planned as the [M, sum N] product (the fused
    shape gemm.py times): at M=1 on the word GEMV (the wide tile from GROUP_GEMV_WIDE_N; every N but the last
    a multiple of its block_n; W4A8 with one row of E4M3 codes per weight); from M=2 on the Mosaic GPU
    kernels (Hopper, every N a multiple of their 128-channel tile, 64 channels per warpgroup, W4A8 one
    sub-step and groups of 128)."""
    if recipe not in ("w4a16", "w4a8") or len(ns) < 2:
        return None
    n = sum(ns)
    if m == 1:
        if not w4a16_gemv.shape_is_supported(m, n, k, group):
            return None
        cfg = gemv_config(n, k, group, wide_n=GROUP_GEMV_WIDE_N)
        return Plan("gemv", cfg) if all(w % cfg.block_n == 0 for w in ns[:-1]) else None
    if not mosaic or any(w % w4a16_mgpu.CTA_CHANNELS for w in ns):
        return None
    p = plan(recipe, m, n, k, group, mosaic)
    if p.path != "mgpu":
        return None
    fp8 = recipe == "w4a8"  # grouped launches keep the tilings run grouped: 64-channel warpgroups, W4A8 one sub-step
    cfg = mgpu_w4_config(m, n, k, fp8, group, wide_warpgroups=False, most_sub_steps=1 if fp8 else 4)
    return Plan("mgpu", cfg) if w4a16_mgpu.can_use(m, n, k, group, cfg) else None


@functools.partial(jax.jit, static_argnames=("recipe", "launch_plan", "interpret"))
def quantized_matmul_group(x, recipe: str, weights: tuple, launch_plan: Plan, interpret: bool = False) -> jax.Array:
    """y [M, sum N] = x [M, K] @ [W_0; W_1; ...]^T in one launch, on a plan from group_plan (the caller
    checks it is not None). weights: one dict per weight as quantized_matmul takes them (w4a16: packed,
    scale, zero, optional mgpu_rows, no perm; w4a8: packed, weight_scale, input_scale, optional mgpu_rows),
    all with the same group, packing and symmetry; W4A8 weights may differ in input_scale (x is quantized
    once per weight). interpret: the GEMV plan in Pallas interpret mode (the Mosaic GPU kernels have none)."""
    if launch_plan.path not in ("gemv", "mgpu") or recipe not in ("w4a16", "w4a8") or any(
            w.get("perm") is not None for w in weights):
        raise ValueError(f"quantized_matmul_group: recipe {recipe!r} on path {launch_plan.path!r}: groups are "
                         "w4a16 or w4a8 weights without act-order (perm) on the word GEMV or the Mosaic GPU "
                         "kernel")
    packed = tuple(w["packed"] for w in weights)
    rows = [w.get("mgpu_rows") for w in weights]
    rows = None if any(r is None for r in rows) else tuple(rows)
    if recipe == "w4a8" and launch_plan.path == "gemv":  # E4M3 codes, one row per weight; input_scale after the sum
        scales_in = jnp.stack([jnp.reshape(w["input_scale"], ()).astype(jnp.float32) for w in weights])
        return w4a16_gemv.w4a16_gemv_group(
            cm.quantize_fp8_static(x, scales_in[:, None]), packed, tuple(w["weight_scale"] for w in weights),
            post_scale=scales_in, config=launch_plan.config, out_dtype=x.dtype, interpret=interpret)
    if recipe == "w4a8":
        scales_in = tuple(w["input_scale"] for w in weights)
        return w4a16_mgpu.w4a8_matmul_mgpu_group(
            tuple(cm.quantize_fp8_static(x, s) for s in scales_in), scales_in, packed,
            tuple(w["weight_scale"] for w in weights), config=launch_plan.config, rows=rows).astype(x.dtype)
    zeros = [w.get("zero") for w in weights]
    scales = tuple(w["scale"] for w in weights)
    zeros = None if zeros[0] is None else tuple(zeros)
    if launch_plan.path == "gemv":
        return w4a16_gemv.w4a16_gemv_group(x, packed, scales, zeros, config=launch_plan.config, interpret=interpret)
    return w4a16_mgpu.w4a16_matmul_mgpu_group(x, packed, scales, zeros, config=launch_plan.config,
                                              rows=rows).astype(x.dtype)


def _xla_dot(x, w, out_dtype=None):
    """x [M, K] @ w[N, K]^T on cuBLAS, no transpose ("TN"), f32 accumulation, out_dtype (default x.dtype) out."""
    return lax.dot_general(x, w.astype(x.dtype), (((1,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32).astype(out_dtype or x.dtype)


def dequantize_bf16(recipe: str, **w) -> jax.Array:
    """The recipe's weights as bf16 [N, K] (the 'xla_dequant' path; one fused XLA pass). NVFP4 (both
    recipes): without the global scale, which the caller applies to the f32 product as the references do,
    so the bf16 weights are exact (e2m1 x e4m3 has <= 6 significant bits)."""
    if recipe == "w4a16":
        deq = w4a16.w4a16_dequantize(w["packed"], w["scale"], w.get("zero"))
    elif recipe in ("mxfp4", "w4a8_mxfp4"):
        deq = fp4.mxfp4_dequantize(w["packed"], w["scale"])
    elif recipe in ("nvfp4", "w4a8_nvfp4"):
        deq = fp4.nvfp4_dequantize(w["packed"], w["block_scale"], 1.0)
    elif recipe == "w4a8":
        deq = w4a16.w4a16_dequantize(w["packed"], w["weight_scale"])
    else:
        sw = jnp.repeat(jnp.repeat(w["w_scale"], 128, axis=0), 128, axis=1)
        n, k = w["wq"].shape
        deq = w["wq"].astype(jnp.float32) * sw[:n, :k]
    return deq.astype(jnp.bfloat16)


def _w4a8_fp4(x, recipe: str, w: dict, p: Plan, out_dtype, interpret: bool) -> jax.Array:
    """The W4A8_FP4 recipes on plan p: x quantized as e4m3(x / input_scale), or given as E4M3 codes."""
    if x.dtype == jnp.float8_e4m3fn:
        xq, out_dtype = x, out_dtype or jnp.bfloat16
    else:
        xq, out_dtype = cm.quantize_fp8_static(x, w["input_scale"]), out_dtype or x.dtype
    sx = w["input_scale"]
    if p.path == "xla_dequant":                         # exact bf16 operands, per-tensor factor after the dot
        factor = sx if recipe == "w4a8_mxfp4" else sx * w["global_scale"]
        y = _xla_dot(xq.astype(jnp.bfloat16), dequantize_bf16(recipe, **w), jnp.float32)
        return (y * factor).astype(out_dtype)
    if recipe == "w4a8_mxfp4":
        return w4a8_fp4.mxfp4_fp8_matmul(xq, sx, w["packed"], w["scale"], config=p.config, out_dtype=out_dtype,
                                         interpret=interpret)
    return w4a8_fp4.nvfp4_fp8_matmul(xq, sx, w["packed"], w["block_scale"], w["global_scale"], config=p.config,
                                     out_dtype=out_dtype, interpret=interpret)


def reference_matmul(x, recipe: str, weights: dict) -> jax.Array:
    """The pure-jnp reference of quantized_matmul for any recipe (weights named as in the module docstring,
    x in bf16, activations quantized as quantized_matmul quantizes them)."""
    w = weights
    if recipe == "w4a16":
        return w4a16.w4a16_matmul_reference(x, w["packed"], w["scale"], w.get("zero"))
    if recipe == "nvfp4":
        return fp4.nvfp4_matmul_reference(x, w["packed"], w["block_scale"], w["global_scale"])
    if recipe == "mxfp4":
        return fp4.mxfp4_matmul_reference(x, w["packed"], w["scale"])
    if recipe == "w4a8":
        return w4a8.w4a8_matmul_reference(x, w["packed"], w["weight_scale"], w["input_scale"])
    if recipe in W4A8_FP4:                              # x quantized as e4m3(x / input_scale)
        xq, sx = cm.quantize_fp8_static(x, w["input_scale"]), w["input_scale"]
        if recipe == "w4a8_mxfp4":
            return w4a8_fp4.mxfp4_fp8_matmul_reference(xq, sx, w["packed"], w["scale"], x.dtype)
        return w4a8_fp4.nvfp4_fp8_matmul_reference(xq, sx, w["packed"], w["block_scale"], w["global_scale"],
                                                   x.dtype)
    if recipe == "fp8_block":
        return fp8.fp8_block_matmul_reference(x, w["wq"], w["w_scale"])
    if recipe == "fp8":
        xq = cm.quantize_fp8_static(x, w["input_scale"])
        return fp8.fp8_rowwise_matmul_reference(xq, w["input_scale"], w["wq"], w["w_scale"])
    if recipe == "fp8_rowwise":
        xq, sx = fp8.quantize_fp8_rowwise(x)
        return fp8.fp8_rowwise_matmul_reference(xq, sx, w["wq"], w["w_scale"])
    raise ValueError(f"unknown recipe {recipe!r}; expected one of {RECIPES}")


def with_step_rows(recipe: str, weights: dict) -> dict:
    """weights plus 'mgpu_rows': the scale rows the W4A16 / W4A8 Mosaic kernels read per K-step
    (w4a16_mgpu.step_rows / w4a8_step_rows), for a caller that builds them once (at load time) instead of
    per call, which costs an XLA transpose of about 2 us per call on an H100. Other recipes: unchanged."""
    w = dict(weights)
    if recipe == "w4a16":
        w["mgpu_rows"] = w4a16_mgpu.step_rows(w["scale"], w.get("zero"))
    elif recipe == "w4a8":
        w["mgpu_rows"] = w4a16_mgpu.w4a8_step_rows(w["weight_scale"], w["input_scale"])
    return w


@functools.partial(jax.jit, static_argnames=("recipe", "plan_override", "out_dtype", "interpret"))
def quantized_matmul(x, recipe: str, weights: dict, plan_override: Plan | None = None, out_dtype=None,
                     interpret: bool = False) -> jax.Array:
    """y [M, N] = x [M, K] @ W^T for any recipe, through the planned path. weights: the dict of the
    recipe's arrays named as in the module docstring; x as described there. out_dtype: only for the
    W4A8_FP4 recipes (default x.dtype, bf16 for E4M3 codes); the others return x.dtype."""
    w = weights
    m, k = x.shape
    n = (w.get("packed") if "packed" in w else w["wq"]).shape[0]
    group = 128
    if recipe in ("w4a16", "w4a8"):
        group = k // w["scale" if recipe == "w4a16" else "weight_scale"].shape[1]
    mosaic = not interpret and _mgpu.is_hopper()
    p = plan_override or plan(recipe, m, n, k, group, mosaic)
    if p.path == "mgpu" and recipe in ("w4a16", "w4a8", "nvfp4", "mxfp4") and not mosaic:
        p = plan(recipe, m, n, k, group, mosaic=False)
    if recipe in W4A8_FP4:
        return _w4a8_fp4(x, recipe, w, p, out_dtype, interpret)
    if p.path == "xla":
        if recipe == "fp8":
            xq = cm.quantize_fp8_static(x, w["input_scale"])
            return fp8.fp8_matmul_xla(xq, w["input_scale"], w["wq"], w["w_scale"], out_dtype=x.dtype)
        xq, sx = fp8.quantize_fp8_rowwise(x)
        return fp8.fp8_matmul_xla(xq, sx, w["wq"], w["w_scale"], out_dtype=x.dtype)
    if p.path == "xla_dequant":
        if recipe == "w4a16" and w.get("perm") is not None:
            x = jnp.take(x, w["perm"], axis=1)
        if recipe == "w4a8":                            # W4A8 numerics up to the bf16 weight rounding
            xq = cm.quantize_fp8_static(x, w["input_scale"]).astype(x.dtype)
            y = _xla_dot(xq, dequantize_bf16(recipe, **w)).astype(jnp.float32)
            return (y * w["input_scale"]).astype(x.dtype)
        if recipe == "fp8_block":
            xq, sx = fp8.quantize_fp8_1x128(x)
            xd = (xq.astype(jnp.float32) * jnp.repeat(sx, 128, axis=1)[:, :k]).astype(x.dtype)
            return _xla_dot(xd, dequantize_bf16(recipe, **w))
        if recipe == "nvfp4":
            y = _xla_dot(x, dequantize_bf16(recipe, **w), jnp.float32)
            return (y * w["global_scale"]).astype(x.dtype)
        return _xla_dot(x, dequantize_bf16(recipe, **w))
    cfg = p.config
    if p.path == "mgpu" and recipe == "nvfp4":
        return fp4_mgpu.nvfp4_matmul_mgpu(x.astype(jnp.bfloat16), w["packed"], w["block_scale"], w["global_scale"],
                                          config=cfg).astype(x.dtype)
    if p.path == "mgpu" and recipe == "mxfp4":
        return fp4_mgpu.mxfp4_matmul_mgpu(x.astype(jnp.bfloat16), w["packed"], w["scale"],
                                          config=cfg).astype(x.dtype)
    if p.path == "gemv" and recipe == "nvfp4":
        return fp4_gemv.nvfp4_gemv(x, w["packed"], w["block_scale"], w["global_scale"], config=cfg,
                                   interpret=interpret)
    if p.path == "gemv" and recipe == "mxfp4":
        return fp4_gemv.mxfp4_gemv(x, w["packed"], w["scale"], config=cfg, interpret=interpret)
    if p.path == "gemv" and recipe == "w4a8":          # E4M3 codes as x (widened in the kernel), input_scale last
        xq = cm.quantize_fp8_static(x, w["input_scale"])
        return w4a16_gemv.w4a16_gemv(xq, w["packed"], w["weight_scale"], post_scale=w["input_scale"],
                                     config=cfg or gemv_config(n, k, group), out_dtype=x.dtype, interpret=interpret)
    if p.path == "mgpu" and recipe == "w4a8":           # FP8 tensor cores on the E4M3 codes
        xq = cm.quantize_fp8_static(x, w["input_scale"])
        return w4a16_mgpu.w4a8_matmul_mgpu(xq, w["input_scale"], w["packed"], w["weight_scale"],
                                           config=cfg, rows=w.get("mgpu_rows")).astype(x.dtype)
    if p.path == "mgpu" and recipe == "w4a16":
        if w.get("perm") is not None:
            x = jnp.take(x, w["perm"], axis=1)
        return w4a16_mgpu.w4a16_matmul_mgpu(x, w["packed"], w["scale"], w.get("zero"), config=cfg,
                                            rows=w.get("mgpu_rows")).astype(x.dtype)
    if p.path == "gemv":
        if w.get("perm") is not None:
            x = jnp.take(x, w["perm"], axis=1)
        return w4a16_gemv.w4a16_gemv(x, w["packed"], w["scale"], w.get("zero"), config=cfg, interpret=interpret)
    if recipe == "w4a16":
        return w4a16.w4a16_matmul(x, w["packed"], w["scale"], w.get("zero"), w.get("perm"), config=cfg,
                                  interpret=interpret)
    if recipe == "nvfp4":
        return fp4.nvfp4_matmul(x, w["packed"], w["block_scale"], w["global_scale"], config=cfg,
                                interpret=interpret)
    if recipe == "mxfp4":
        return fp4.mxfp4_matmul(x, w["packed"], w["scale"], config=cfg, interpret=interpret)
    if recipe == "w4a8":
        return w4a8.w4a8_matmul(x, w["packed"], w["weight_scale"], w["input_scale"], config=cfg,
                                interpret=interpret)
    xq, sx = fp8.quantize_fp8_1x128(x)
    return fp8_block_prequantized(xq, sx, w["wq"], w["w_scale"], p, x.dtype, interpret)


def fp8_block_prequantized(xq, x_scale, wq, w_scale, p: Plan, out_dtype, interpret: bool = False) -> jax.Array:
    """FP8 block-scaled GEMM of already quantized operands (fp8.py layouts) on plan p ('mgpu' or 'pallas').
    The Mosaic GPU kernel has no interpret mode: there the Triton kernel with the large-M tile stands in."""
    if p.path == "mgpu" and not interpret and _mgpu.is_hopper():
        return fp8_block_mgpu.fp8_block_matmul_mgpu(xq, x_scale, wq, w_scale, config=p.config, out_dtype=out_dtype)
    cfg = FP8_LARGE_M if p.path == "mgpu" else p.config if p.path == "pallas" else None
    return fp8.fp8_matmul(xq, x_scale, wq, w_scale, mode="block", config=cfg, out_dtype=out_dtype,
                          interpret=interpret)
