"""FP8 block-scaled GEMM for large M on Hopper with the Mosaic GPU lowering (TMA, wgmma, warp
specialization): the same contract as fp8.fp8_matmul(mode="block"), for the compute-bound prefill shapes
where the Triton lowering stops near 300 TFLOP/s.

Layouts as fp8.py: xq e4m3 [M, K], x_scale f32 [M, K/128]; wq e4m3 [N, K] (K contiguous: the K-major B
operand fp8 wgmma needs, read through a transposed view, no copy); w_scale f32 [N/128, K/128].

On the skeleton of _mgpu.py (persistent tiles, a TMA producer warpgroup streaming [tile, 128] K-steps of
both operands, two compute warpgroups), each compute warpgroup, per 128-K step b, issues one wgmma into a
fresh f32 accumulator and folds it into its running f32 sum with the step's scales (DeepGEMM's promotion):
    acc[m, n] += wgmma_b[m, n] * x_scale[m, b] * w_scale[n // 128, b]
The scales travel with the operands as K-step rows of x_scale^T [K/128, M] and of w_scale^T expanded per
column [K/128, N] (small XLA ops in the wrapper). Numerics equal fp8.fp8_block_scaled_reference up to the
f32 summation order inside one wgmma (products of e4m3 values are exact), one rounding to out_dtype.
Tolerance stated by the tests: |y - ref| <= 1e-2 * |ref| + 1e-2 * rms(ref).

Shapes: K % 128 == 0 and N % (the config's CTA tile along N) == 0; M is padded to the CTA tile inside the
wrapper. `can_use` says whether a shape fits; callers fall back to fp8.fp8_matmul elsewhere. The kernel
needs a Hopper GPU and jax >= 0.11 (Mosaic GPU); there is no interpret mode, so CPU CI checks only the
config rules, and benchmarks/gemm_probe.py (--parts mgpu) checks it against the reference on the GPU.

Tried on the H100 and removed (run 22): promoting step b-1's partial product while step b's wgmma runs
(DeepGEMM's overlap, the partial and its scales carried in registers) ran 5-14 % slower at M=4096.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _mgpu

BLOCK = 128


@dataclasses.dataclass(frozen=True)
class MgpuFp8Config:
    """tile_m x tile_n: one compute warpgroup's output tile (tile_m a multiple of 64); two warpgroups
    side by side along `wg_dim` ("m" or "n") make the CTA tile. stages: K-steps in flight (shared memory:
    stages * (cta_m + cta_n) * 128 bytes). grid_tile_width: tiles per band of the snake order (L2 reuse).
    chain_tiles: a CTA's tiles as one pipeline of pipelines (_mgpu.persistent_kernel), stages cut to the
    largest divisor of the K-steps per tile. split_k: K ranges computed by separate CTA tiles into f32
    partial products [split_k, M, N] that one XLA fusion sums and rounds (fills the SMs where M and N give
    few CTA tiles; K a multiple of 128 * split_k; the f32 epilogue buffers double to 64 KiB of shared memory,
    so a 64 x 256 CTA tile fits 3 stages)."""

    tile_m: int = 64
    tile_n: int = 128
    wg_dim: str = "n"
    stages: int = 4
    grid_tile_width: int = 8
    epi_tile_n: int = 64
    chain_tiles: bool = False
    split_k: int = 1

    @property
    def cta_m(self) -> int:
        return self.tile_m * (2 if self.wg_dim == "m" else 1)

    @property
    def cta_n(self) -> int:
        return self.tile_n * (2 if self.wg_dim == "n" else 1)


DEFAULT = MgpuFp8Config()


def can_use(m: int, n: int, k: int, cfg: MgpuFp8Config = DEFAULT) -> bool:
    """Shapes this kernel takes (callers check it, with a GPU backend, before calling)."""
    return (k % (BLOCK * cfg.split_k) == 0 and n % cfg.cta_n == 0 and cfg.tile_m % 64 == 0
            and cfg.tile_n % cfg.epi_tile_n == 0 and cfg.wg_dim in ("m", "n") and m >= 1 and cfg.split_k >= 1)


def _views(wg, cfg: MgpuFp8Config):
    """The warpgroup's rows of x and columns of w inside the CTA tile."""
    import jax.experimental.pallas as pl
    wg_m = pl.ds(wg * cfg.tile_m, cfg.tile_m) if cfg.wg_dim == "m" else slice(None)
    wg_n = pl.ds(wg * cfg.tile_n, cfg.tile_n) if cfg.wg_dim == "n" else slice(None)
    return wg_m, wg_n


def _scales(sx_smem, sw_smem, wg_m, wg_n):
    """The step's x scales (one per row, WGMMA row layout) and w scales (one per column)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    return (plgpu.load(sx_smem.at[0, wg_m], (), layout=plgpu.Layout.WGMMA.reduce(1)),
            plgpu.load(sw_smem.at[0, wg_n], (), layout=plgpu.Layout.WGMMA.reduce(0)))


def _step(wg, _scratch, x_smem, w_smem, sx_smem, sw_smem, acc, *, cfg: MgpuFp8Config):
    """One 128-K step of a compute warpgroup: a fresh wgmma, promoted into acc with the step's scales."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    wg_m, wg_n = _views(wg, cfg)

    def mma(acc_ref):
        plgpu.wgmma(acc_ref, x_smem.at[wg_m], plgpu.transpose_ref(w_smem.at[wg_n], (1, 0)))
        return acc_ref[...]

    part = pl.run_scoped(mma, plgpu.ACC((cfg.tile_m, cfg.tile_n), jnp.float32))
    return _mgpu.scaled_sum(acc, part, *_scales(sx_smem, sw_smem, wg_m, wg_n))


@functools.partial(jax.jit, static_argnames=("config", "out_dtype"))
def fp8_block_matmul_mgpu(xq, x_scale, wq, w_scale, *, config: MgpuFp8Config = DEFAULT, out_dtype=jnp.bfloat16):
    """y [M, N] out_dtype from e4m3 xq [M, K], f32 x_scale [M, K/128], e4m3 wq [N, K], f32 w_scale
    [N/128, K/128] (shapes as `can_use` requires; the caller checks). With config.split_k > 1 the CTA tile
    (s * M_tiles + mi, ni) sums K range s into f32 rows s * Mp + mi * cta_m of a [split_k * Mp, N] buffer,
    reduced here in one fusion."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    cfg = config
    m, k = xq.shape
    n = wq.shape[0]
    if not can_use(m, n, k, cfg):
        raise ValueError(f"fp8_block_matmul_mgpu: shape M={m} N={n} K={k} does not fit {cfg} (needs K % "
                         f"{BLOCK * cfg.split_k} == 0 and N % {cfg.cta_n} == 0)")
    kb = k // BLOCK
    if x_scale.shape != (m, kb) or w_scale.shape != (n // BLOCK, kb):
        raise ValueError(f"fp8_block_matmul_mgpu: x_scale {x_scale.shape} / w_scale {w_scale.shape}, expected "
                         f"{(m, kb)} / {(n // BLOCK, kb)}")
    mp = -(-m // cfg.cta_m) * cfg.cta_m
    xq = jnp.pad(xq, ((0, mp - m), (0, 0)))
    sx_t = jnp.pad(x_scale.astype(jnp.float32), ((0, mp - m), (0, 0))).T            # [K/128, Mp]
    sw_t = jnp.repeat(w_scale.astype(jnp.float32), BLOCK, axis=0).T                 # [K/128, N]
    cta_m, cta_n, split = cfg.cta_m, cfg.cta_n, cfg.split_k
    m_tiles, kb_split = mp // cta_m, kb // split
    grid = (m_tiles * split, n // cta_n)
    op_transforms = _mgpu.tiled_swizzle(BLOCK, 8)      # 128 e4m3 bytes per operand row: the full swizzle

    def views(mi, ni, ops):
        s, rows = mi // m_tiles, pl.ds((mi % m_tiles) * cta_m, cta_m)
        cols, k_range, steps = pl.ds(ni * cta_n, cta_n), pl.ds(s * kb_split * BLOCK, kb_split * BLOCK), \
            pl.ds(s * kb_split, kb_split)
        return ops[0].at[rows, k_range], ops[1].at[cols, k_range], ops[2].at[steps, rows], ops[3].at[steps, cols]

    kernel = functools.partial(
        _mgpu.persistent_kernel,
        in_specs=[plgpu.BlockSpec((cta_m, BLOCK), lambda kb: (0, kb), transforms=op_transforms),
                  plgpu.BlockSpec((cta_n, BLOCK), lambda kb: (0, kb), transforms=op_transforms),
                  plgpu.BlockSpec((1, cta_m), lambda kb: (kb, 0)),
                  plgpu.BlockSpec((1, cta_n), lambda kb: (kb, 0))],
        views=views, cta=(cta_m, cta_n),
        wg_offset=lambda wg: (wg * cfg.tile_m if cfg.wg_dim == "m" else 0,
                              wg * cfg.tile_n if cfg.wg_dim == "n" else 0),
        tile=(cfg.tile_m, cfg.tile_n), epi_n=cfg.epi_tile_n, grid=grid, k_iters=kb_split,
        stages=_mgpu.chain_stages(kb_split, cfg.stages) if cfg.chain_tiles else cfg.stages,
        grid_tile_width=cfg.grid_tile_width, step=functools.partial(_step, cfg=cfg), scratch={},
        chain_tiles=cfg.chain_tiles)
    y = _mgpu.launch(kernel, (xq, wq, sx_t, sw_t), (split * mp, n), jnp.float32 if split > 1 else out_dtype,
                     grid[0] * grid[1])
    if split > 1:                                       # partials [split, Mp, N], summed in f32, rounded once
        y = jnp.sum(y.reshape(split, mp, n), axis=0).astype(out_dtype)
    return y[:m]
