"""FP8 block-scaled GEMM for large M on Hopper with the Mosaic GPU lowering (TMA, wgmma, warp
specialization): the same contract as fp8.fp8_matmul(mode="block"), for the compute-bound prefill shapes
where the Triton lowering stops near 300 TFLOP/s.

Layouts as fp8.py: xq e4m3 [M, K], x_scale f32 [M, K/128]; wq e4m3 [N, K] (K contiguous: the K-major B
operand fp8 wgmma needs, read through a transposed view, no copy); w_scale f32 [N/128, K/128].

Per output tile the kernel runs a persistent loop over tiles; a memory warpgroup streams [tile, 128] K-steps
of both operands by TMA, and each compute warpgroup, per 128-K step b, issues one wgmma into a fresh f32
accumulator and folds it into its running f32 sum with the step's scales (DeepGEMM's promotion):
    acc[m, n] += wgmma_b[m, n] * x_scale[m, b] * w_scale[n // 128, b]
The scales travel with the operands as K-step rows of x_scale^T [K/128, M] and of w_scale^T expanded per
column [K/128, N] (small XLA ops in the wrapper). Numerics equal fp8.fp8_block_scaled_reference up to the
f32 summation order inside one wgmma (products of e4m3 values are exact), one rounding to out_dtype.
Tolerance stated by the tests: |y - ref| <= 1e-2 * |ref| + 1e-2 * rms(ref).

Shapes: K % 128 == 0 and N % (the config's CTA tile along N) == 0; M is padded to the CTA tile inside the
wrapper. `can_use` says whether a shape fits; callers fall back to fp8.fp8_matmul elsewhere. The kernel
needs a Hopper GPU and jax >= 0.11 (Mosaic GPU); there is no interpret mode, so CPU CI checks only the
config rules, and benchmarks/gemm_probe.py (--parts mgpu) checks it against the reference on the GPU.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

BLOCK = 128
NUM_SMS = 132                                           # H100/H200 SXM; the device's own count where it has one


@dataclasses.dataclass(frozen=True)
class MgpuFp8Config:
    """tile_m x tile_n: one compute warpgroup's output tile (tile_m a multiple of 64); two warpgroups
    side by side along `wg_dim` ("m" or "n") make the CTA tile. stages: K-steps in flight (shared memory:
    stages * (cta_m + cta_n) * 128 bytes). grid_tile_width: tiles per band of the snake order (L2 reuse)."""

    tile_m: int = 64
    tile_n: int = 128
    wg_dim: str = "n"
    stages: int = 4
    grid_tile_width: int = 8
    epi_tile_n: int = 64

    @property
    def cta_m(self) -> int:
        return self.tile_m * (2 if self.wg_dim == "m" else 1)

    @property
    def cta_n(self) -> int:
        return self.tile_n * (2 if self.wg_dim == "n" else 1)


DEFAULT = MgpuFp8Config()


def can_use(m: int, n: int, k: int, cfg: MgpuFp8Config = DEFAULT) -> bool:
    """Shapes this kernel takes (callers check it, with a GPU backend, before calling)."""
    return (k % BLOCK == 0 and n % cfg.cta_n == 0 and cfg.tile_m % 64 == 0 and cfg.tile_n % cfg.epi_tile_n == 0
            and cfg.wg_dim in ("m", "n") and m >= 1)


def _kernel(x_gmem, w_gmem, sx_gmem, sw_gmem, out_gmem, *, cfg: MgpuFp8Config, m_iters: int, n_iters: int,
            k_iters: int, out_dtype):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    tile_m, tile_n, epi_n = cfg.tile_m, cfg.tile_n, cfg.epi_tile_n
    cta_m, cta_n = cfg.cta_m, cfg.cta_n
    swizzle = 128                                       # 128 e4m3 bytes per operand row: the full swizzle
    op_transforms = (plgpu.TilingTransform((8, swizzle)), plgpu.SwizzleTransform(swizzle))
    out_bytes = jnp.dtype(out_dtype).itemsize
    out_swizzle = plgpu.find_swizzle(epi_n * out_bytes * 8)
    out_transforms = (plgpu.TilingTransform((8, out_swizzle // out_bytes)), plgpu.SwizzleTransform(out_swizzle))
    n_epi = tile_n // epi_n

    def pipeline(body, context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_iters,),
            memory_registers=40,
            in_specs=[
                plgpu.BlockSpec((cta_m, BLOCK), lambda kb: (0, kb), transforms=op_transforms),
                plgpu.BlockSpec((cta_n, BLOCK), lambda kb: (0, kb), transforms=op_transforms),
                plgpu.BlockSpec((1, cta_m), lambda kb: (kb, 0)),
                plgpu.BlockSpec((1, cta_n), lambda kb: (kb, 0)),
            ],
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=cfg.stages,
            compute_context=context,
        )

    ignore = lambda *_, **__: None  # noqa: E731  (allocation sizes do not depend on the body)

    @functools.partial(
        pl.run_scoped,
        allocs=pipeline(ignore, ignore).get_allocations(x_gmem, w_gmem, sx_gmem, sw_gmem),
        out_smem=plgpu.SMEM((2, 2, tile_m, epi_n), out_dtype, transforms=out_transforms),
        collective_axes="wg",
    )
    def _scope(allocs, out_smem):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
        def _tiles(info):
            (lin,) = info.index
            mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters), 1, cfg.grid_tile_width)
            m_rows = pl.ds(mi * cta_m, cta_m)
            n_cols = pl.ds(ni * cta_n, cta_n)
            wg_m = pl.ds(wg * tile_m, tile_m) if cfg.wg_dim == "m" else slice(None)
            wg_n = pl.ds(wg * tile_n, tile_n) if cfg.wg_dim == "n" else slice(None)
            wg_m0 = wg * tile_m if cfg.wg_dim == "m" else 0
            wg_n0 = wg * tile_n if cfg.wg_dim == "n" else 0

            def context(run):
                zeros = plgpu.layout_cast(jnp.full((tile_m, tile_n), 0, jnp.float32), plgpu.Layout.WGMMA)
                acc = run(zeros).astype(out_dtype)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                for e in range(n_epi):
                    slot = e % 2
                    plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                    out_smem[wg, slot] = acc[:, e * epi_n:(e + 1) * epi_n]
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(
                        out_smem.at[wg, slot],
                        out_gmem.at[pl.ds(mi * cta_m + wg_m0, tile_m), pl.ds(ni * cta_n + wg_n0 + e * epi_n, epi_n)])

            def step(_, x_smem, w_smem, sx_smem, sw_smem, acc):
                def mma(acc_ref):
                    plgpu.wgmma(acc_ref, x_smem.at[wg_m], plgpu.transpose_ref(w_smem.at[wg_n], (1, 0)))
                    return acc_ref[...]

                part = pl.run_scoped(mma, plgpu.ACC((tile_m, tile_n), jnp.float32))
                sx = plgpu.load(sx_smem.at[0, wg_m], (), layout=plgpu.Layout.WGMMA.reduce(1))
                sw = plgpu.load(sw_smem.at[0, wg_n], (), layout=plgpu.Layout.WGMMA.reduce(0))
                scale = (lax.broadcast_in_dim(sx, (tile_m, tile_n), [0])
                         * lax.broadcast_in_dim(sw, (tile_m, tile_n), [1]))
                return acc + part * scale

            pipeline(step, context)(x_gmem.at[m_rows, :], w_gmem.at[n_cols, :], sx_gmem.at[:, m_rows],
                                    sw_gmem.at[:, n_cols], allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


@functools.partial(jax.jit, static_argnames=("config", "out_dtype"))
def fp8_block_matmul_mgpu(xq, x_scale, wq, w_scale, *, config: MgpuFp8Config = DEFAULT, out_dtype=jnp.bfloat16):
    """y [M, N] out_dtype from e4m3 xq [M, K], f32 x_scale [M, K/128], e4m3 wq [N, K], f32 w_scale
    [N/128, K/128] (shapes as `can_use` requires; the caller checks)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    cfg = config
    m, k = xq.shape
    n = wq.shape[0]
    if not can_use(m, n, k, cfg):
        raise ValueError(f"fp8_block_matmul_mgpu: shape M={m} N={n} K={k} does not fit {cfg} (needs K % 128 == 0 "
                         f"and N % {cfg.cta_n} == 0)")
    kb = k // BLOCK
    if x_scale.shape != (m, kb) or w_scale.shape != (n // BLOCK, kb):
        raise ValueError(f"fp8_block_matmul_mgpu: x_scale {x_scale.shape} / w_scale {w_scale.shape}, expected "
                         f"{(m, kb)} / {(n // BLOCK, kb)}")
    mp = -(-m // cfg.cta_m) * cfg.cta_m
    xq = jnp.pad(xq, ((0, mp - m), (0, 0)))
    sx_t = jnp.pad(x_scale.astype(jnp.float32), ((0, mp - m), (0, 0))).T            # [K/128, Mp]
    sw_t = jnp.repeat(w_scale.astype(jnp.float32), BLOCK, axis=0).T                 # [K/128, N]
    m_iters, n_iters = mp // cfg.cta_m, n // cfg.cta_n
    kernel = functools.partial(_kernel, cfg=cfg, m_iters=m_iters, n_iters=n_iters, k_iters=kb, out_dtype=out_dtype)
    num_sms = getattr(jax.devices()[0], "core_count", NUM_SMS)
    y = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((mp, n), out_dtype),
        grid=(min(num_sms, m_iters * n_iters),),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )(xq, wq, sx_t, sw_t)
    return y[:m]
