"""The Mosaic GPU skeleton shared by the GEMMs of fp8_block_mgpu.py and w4a16_mgpu.py.

A persistent grid walks the accumulator's CTA tiles in a snake order (L2 reuse). Per tile, a TMA producer
warpgroup streams one K-step of every operand per pipeline stage to shared memory, and two compute
warpgroups each carry an f32 sum for their own [tile_m, tile_n] part of the CTA tile through `step` (a
register value, or a wgmma accumulator ref that every step's wgmma adds into), then write it out in
[tile_m, epi_n] pieces through a double-buffered shared-memory epilogue: to out[rows, cols], or, for a
transposed (swap-AB) product, to out[cols, rows].
Mosaic GPU needs a Hopper GPU (no interpret mode); the module imports it lazily so the CPU can still lower.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax

NUM_SMS = 132                                           # H100/H200 SXM; the device's own count where it has one


def is_hopper() -> bool:
    """Whether the default device is a Hopper GPU (compute capability 9.x), which these kernels need."""
    device = jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9")


def tiled_swizzle(row_bytes: int, itemsize_bits: int):
    """Shared-memory transforms for rows of row_bytes (the largest swizzle that fits), in element units."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    swizzle = plgpu.find_swizzle(row_bytes * 8)
    return plgpu.TilingTransform((8, swizzle * 8 // itemsize_bits)), plgpu.SwizzleTransform(swizzle)


def persistent_kernel(*refs, in_specs, views, cta, wg_offset, tile, epi_n: int, grid, k_iters: int, stages: int,
                      grid_tile_width: int, step, scratch: dict, acc_in_ref: bool = False,
                      transpose_out: bool = False, pipeline_operands: int | None = None, chain_tiles: bool = False,
                      out_scale: bool = False, step_index: bool = False):
    """Kernel body: refs = the gmem operands, then the gmem output ([M, N], or [N, M] with transpose_out).

    in_specs: one plgpu.BlockSpec per operand for one K-step (index map kb -> block index);
    views(mi, ni, operands): the operands' gmem views for CTA tile (mi, ni), in in_specs order, or for a
    grouped grid (tiles drawn from several operand sets, e.g. the q, k and v weights) a list of (condition,
    views): each tile runs the pipeline of the entry whose traced boolean condition holds (exactly one);
    pipeline_operands: how many leading operands make one pipeline's set (default all), which sizes the
    shared memory that every entry reuses; cta = (cta_m, cta_n);
    wg_offset(wg) -> (row, col) of warpgroup wg's tile inside the CTA tile; tile = (tile_m, tile_n);
    grid = (m_iters, n_iters) CTA tiles; scratch: extra shared-memory allocations (name -> plgpu.SMEM);
    step(wg, scratch_refs, *operand_smem_refs, acc) -> acc: one K-step of a compute warpgroup, acc its f32
    [tile_m, tile_n] register sum (WGMMA layout), or with acc_in_ref a zero-initialised wgmma accumulator ref
    (plgpu.ACC) that step passes on. transpose_out: the output holds the accumulator transposed (the CTA tile
    (mi, ni) lands at out[ni * cta_n + col, mi * cta_m + row]). chain_tiles: a CTA's tiles run as one
    pipeline of pipelines (Pallas' PipelinePipeline START / STEADY / STOP), so the producer loads the next
    tile's first K-steps while the compute warpgroups finish a tile and write it out; it needs k_iters to be
    a multiple of stages (ValueError otherwise). out_scale: the last operand is an f32 [1] array that multiplies
    every accumulator (in f32) before it is converted and written. step_index: step also gets the K-step's
    index in the tile's pipeline, step(wg, scratch_refs, kb, *operand_smem_refs, acc)."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    if chain_tiles and k_iters % stages:
        raise ValueError(f"persistent_kernel: chain_tiles needs k_iters ({k_iters}) to be a multiple of stages "
                         f"({stages})")

    *operands, out_gmem = refs
    scale_gmem = operands.pop() if out_scale else None
    (tile_m, tile_n), (cta_m, cta_n), (m_iters, n_iters) = tile, cta, grid
    out_dtype = out_gmem.dtype
    out_bits = jnp.dtype(out_dtype).itemsize * 8

    def pipeline(body, context, state=None):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_iters,), memory_registers=40, in_specs=in_specs, wg_axis="wg", num_compute_wgs=2,
            max_concurrent_steps=stages, compute_context=context, pipeline_state=state)

    ignore = lambda *_, **__: None  # noqa: E731  (allocation sizes do not depend on the body)

    @functools.partial(
        pl.run_scoped,
        allocs=pipeline(ignore, ignore).get_allocations(*operands[:pipeline_operands]),
        out_smem=plgpu.SMEM((2, 2) + ((epi_n, tile_m) if transpose_out else (tile_m, epi_n)), out_dtype,
                        transforms=tiled_swizzle((tile_m if transpose_out else epi_n) * out_bits // 8, out_bits)),
        **scratch,
        collective_axes="wg",
    )
    def _scope(allocs, out_smem, **scratch_refs):
        wg = lax.axis_index("wg")
        row0, col0 = wg_offset(wg)

        @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
        def _tiles(info):
            (lin,) = info.index
            mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters), 1, grid_tile_width)

            def context(run):
                if acc_in_ref:
                    acc = pl.run_scoped(lambda acc_ref: run(acc_ref)[...], plgpu.ACC((tile_m, tile_n), jnp.float32))
                else:
                    acc = run(plgpu.layout_cast(jnp.full((tile_m, tile_n), 0, jnp.float32), plgpu.Layout.WGMMA))
                if scale_gmem is not None:
                    acc = acc * scale_gmem[0]
                acc = acc.astype(out_dtype)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                rows = pl.ds(mi * cta_m + row0, tile_m)
                for e in range(tile_n // epi_n):
                    slot = e % 2
                    cols = pl.ds(ni * cta_n + col0 + e * epi_n, epi_n)
                    piece = acc[:, e * epi_n:(e + 1) * epi_n]
                    plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                    if transpose_out:
                        out_smem.at[wg, slot].T[...] = plgpu.layout_cast(piece, plgpu.Layout.WGMMA_TRANSPOSED)
                    else:
                        out_smem[wg, slot] = piece
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(out_smem.at[wg, slot],
                                            out_gmem.at[cols, rows] if transpose_out else out_gmem.at[rows, cols])

            def body(indices, *smem_and_acc):
                return step(wg, scratch_refs, *(indices[:1] if step_index else ()), *smem_and_acc)

            state = None
            if chain_tiles:                             # a one-tile CTA runs START: its producer skips the final wait
                phases = plgpu.PipelinePipeline
                last = info.local_index == info.num_local_steps - 1
                state = jnp.where(info.local_index == 0, int(phases.START),
                                  jnp.where(last, int(phases.STOP), int(phases.STEADY))).astype(jnp.int32)
            tile_views = views(mi, ni, operands)
            if not isinstance(tile_views, list):
                tile_views = [(None, tile_views)]
            for condition, one in tile_views:
                run = functools.partial(pipeline(body, context, state), *one, allocations=allocs)
                if condition is None:
                    run()
                else:
                    pl.when(condition)(run)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def launch(kernel, operands, out_shape: tuple[int, int], out_dtype, tiles: int):
    """Runs a persistent_kernel body on min(SMs, tiles) CTAs of three warpgroups."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct(out_shape, out_dtype),
        grid=(min(getattr(jax.devices()[0], "core_count", NUM_SMS), tiles),),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )(*operands)


def chain_stages(k_iters: int, stages: int) -> int:
    """The most stages <= `stages` that divide k_iters (persistent_kernel's chain_tiles needs a divisor)."""
    return max(d for d in range(1, min(stages, k_iters) + 1) if k_iters % d == 0)


def scaled_sum(acc, part, row_scale=None, col_scale=None):
    """acc + part * row_scale[m] * col_scale[n] for [tile_m, tile_n] WGMMA-layout arrays (scales optional
    vectors in the WGMMA row / column layouts)."""
    shape = part.shape
    scale = None
    if row_scale is not None:
        scale = lax.broadcast_in_dim(row_scale, shape, [0])
    if col_scale is not None:
        col = lax.broadcast_in_dim(col_scale, shape, [1])
        scale = col if scale is None else scale * col
    return acc + (part if scale is None else part * scale)
