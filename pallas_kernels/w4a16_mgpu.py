"""W4A16 (symmetric INT4, group 128) for large M on Hopper with the Mosaic GPU lowering: an EXPERIMENT,
not yet compiled or checked on a GPU and not planned by pallas_kernels.dispatch. It exists so the next
device run can measure whether a Mosaic kernel closes the prefill gap that dequantise-then-cuBLAS leaves
(71-73 % of XLA bf16 at M=1024, benchmarks/results/gemm_notes.md); benchmarks/gemm_probe.py --parts
w4mgpu checks it against w4a16.w4a16_matmul_reference and times it.

The skeleton is fp8_block_mgpu.py's (persistent tiles, TMA producer warpgroup, two compute warpgroups side
by side along N, one 128-K step per pipeline stage). Per step each compute warpgroup
  1. loads its INT4 weight tile [tile_n, 128] from shared memory in the 4-bit-to-16-bit upcast register
     layout and converts it to bf16 (q in [-8, 7], exact),
  2. stores it to its own bf16 shared buffer, the K-major B operand of wgmma,
  3. runs one wgmma of the x tile [64, 128] (A, shared memory) against it into a fresh f32 accumulator,
  4. adds that partial sum, times the group's scale per output column, to its running f32 sum.
So weights and products are exact and the scales apply in f32 per group, as in w4a16.py's numerics.

Inputs: x bf16 [M, K]; the canonical packed uint8 [N, K/2] (codes u = q + 8, low nibble = even k), turned
into jnp.int4 [N, K] by the wrapper (byte ^ 0x88 flips each code to q; one XLA pass over the weights that a
loader could do once); scale [N, K/128] as f32 rows per K-step (transposed, [K/128, N]).
Shapes: K % 128 == 0, N % (2 * tile_n) == 0; M is padded to 64.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _mgpu

GROUP = 128


@dataclasses.dataclass(frozen=True)
class MgpuW4Config:
    """tile_n: one compute warpgroup's output columns (its rows are 64 tokens); stages: K-steps in flight."""

    tile_n: int = 128
    stages: int = 3
    grid_tile_width: int = 8
    epi_tile_n: int = 64

    @property
    def cta_n(self) -> int:
        return 2 * self.tile_n


TILE_M = 64
DEFAULT = MgpuW4Config()


def can_use(m: int, n: int, k: int, group: int, cfg: MgpuW4Config = DEFAULT) -> bool:
    return group == GROUP and k % GROUP == 0 and n % cfg.cta_n == 0 and cfg.tile_n % cfg.epi_tile_n == 0 and m >= 1


def as_int4(packed: jax.Array) -> jax.Array:
    """Canonical uint8 [N, K/2] (u = q + 8) -> int4 [N, K] holding q (low nibble first, as XLA packs int4)."""
    n = packed.shape[0]
    return lax.bitcast_convert_type(packed ^ jnp.uint8(0x88), jnp.int4).reshape(n, -1)


def _step(wg, scratch, x_smem, w_smem, s_smem, acc, *, cfg: MgpuW4Config):
    """One 128-K step of a compute warpgroup: decode its INT4 tile to bf16 in shared memory, one wgmma
    into a fresh accumulator, promoted into acc with the group scale per column."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    wg_n = pl.ds(wg * cfg.tile_n, cfg.tile_n)
    w_bf16 = scratch["w_bf16"]
    q = plgpu.load(w_smem.at[wg_n], (), layout=plgpu.Layout.WGMMA_UPCAST_4X)
    w_bf16[wg] = q.astype(jnp.bfloat16)                 # layouts left to Mosaic's inference
    plgpu.commit_smem()

    def mma(acc_ref):
        plgpu.wgmma(acc_ref, x_smem, plgpu.transpose_ref(w_bf16.at[wg], (1, 0)))
        return acc_ref[...]

    part = pl.run_scoped(mma, plgpu.ACC((TILE_M, cfg.tile_n), jnp.float32))
    s = plgpu.load(s_smem.at[0, wg_n], (), layout=plgpu.Layout.WGMMA.reduce(0))
    return _mgpu.scaled_sum(acc, part, col_scale=s)


@functools.partial(jax.jit, static_argnames=("config",))
def w4a16_matmul_mgpu(x, packed, scale, *, config: MgpuW4Config = DEFAULT):
    """y [M, N] bf16 = x [M, K] bf16 @ W^T, W symmetric INT4 group 128: packed as w4a16.py's canonical
    uint8 [N, K/2], or already as_int4's int4 [N, K] (then no conversion pass runs)."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    cfg = config
    m, k = x.shape
    n = packed.shape[0]
    want = (n, k) if packed.dtype == jnp.int4 else (n, k // 2)
    if packed.shape != want or scale.shape != (n, k // GROUP) or not can_use(m, n, k, k // scale.shape[1], cfg):
        raise ValueError(f"w4a16_matmul_mgpu: x {x.shape}, packed {packed.shape} {packed.dtype}, scale {scale.shape} "
                         f"do not fit {cfg} (needs packed uint8 (N, K/2) or int4 (N, K), scale (N, K/128), "
                         f"K % 128 == 0, N % {cfg.cta_n} == 0)")
    w = packed if packed.dtype == jnp.int4 else as_int4(packed)
    mp = -(-m // TILE_M) * TILE_M
    xp = jnp.pad(x.astype(jnp.bfloat16), ((0, mp - m), (0, 0)))
    s_t = scale.astype(jnp.float32).T                                                # [K/128, N]
    grid = (mp // TILE_M, n // cfg.cta_n)
    x_transforms = _mgpu.tiled_swizzle(GROUP * 2, 16)
    cta_n = cfg.cta_n
    kernel = functools.partial(
        _mgpu.persistent_kernel,
        in_specs=[plgpu.BlockSpec((TILE_M, GROUP), lambda kb: (0, kb), transforms=x_transforms),
                  plgpu.BlockSpec((cta_n, GROUP), lambda kb: (0, kb), transforms=_mgpu.tiled_swizzle(GROUP // 2, 4)),
                  plgpu.BlockSpec((1, cta_n), lambda kb: (kb, 0))],
        views=lambda mi, ni, ops: (ops[0].at[pl.ds(mi * TILE_M, TILE_M), :], ops[1].at[pl.ds(ni * cta_n, cta_n), :],
                                   ops[2].at[:, pl.ds(ni * cta_n, cta_n)]),
        cta=(TILE_M, cta_n), wg_offset=lambda wg: (0, wg * cfg.tile_n), tile=(TILE_M, cfg.tile_n),
        epi_n=cfg.epi_tile_n, grid=grid, k_iters=k // GROUP, stages=cfg.stages, grid_tile_width=cfg.grid_tile_width,
        step=functools.partial(_step, cfg=cfg),
        scratch={"w_bf16": plgpu.SMEM((2, cfg.tile_n, GROUP), jnp.bfloat16, transforms=x_transforms)})
    y = _mgpu.launch(kernel, (xp, w, s_t), (mp, n), jnp.bfloat16, grid[0] * grid[1])
    return y[:m]
