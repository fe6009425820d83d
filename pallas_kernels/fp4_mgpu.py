"""NVFP4 / MXFP4 weight-only GEMMs (E2M1 weights with block scales, bf16 activations) on Hopper with the
Mosaic GPU lowering: the swap-AB grid of w4a16_mgpu.py (y^T = W x^T, 64 channels per compute warpgroup,
tokens as wgmma's N, one f32 accumulator over all of K, transposed epilogue) with an E2M1 decode.

Hopper has neither FP4 tensor cores nor an E2M1 convert, so per 128-K step each compute warpgroup
  1. loads its [64, 128] tile of 4-bit codes from shared memory in Mosaic's 4-bit upcast layout and converts
     the nibbles, read as signed int4 v, to bf16 (exact),
  2. decodes E2M1 in bf16 arithmetic (`e2m1_from_signed_nibble`: the magnitude code m = v or v + 8, its
     value 2m - min(m, 4) / 2 - min(m, 6), the sign from v < 0; every step exact),
  3. per block of 16 (NVFP4) or 32 (MXFP4) columns, multiplies the tile's slice by the block's per-channel
     scale (E2M1 x E4M3 or x 2^e is exact in bf16) and issues one wgmma of that slice against the same
     columns of the x tile (x is swizzled so that slices of 16 / 32 columns are legal wgmma operands),
all into the warpgroup's accumulator. NVFP4's global scale multiplies the f32 result once, in the XLA
fusion that rounds it to bf16 (the kernel writes f32 then).

Numerics: the same as fp4.py's reference (exact weights, f32 products and sums, global scale on the f32
sum, one rounding), up to summation order. Tolerance stated by the tests and the probe:
|y - ref| <= 1e-2 * |ref| + 1e-2 * rms(ref) against fp4.nvfp4_matmul_reference / mxfp4_matmul_reference.

Inputs: x bf16 [M, K]; the canonical packed uint8 [N, K/2] (fp4.py: low nibble = even k, code = sign * 8 +
index), read through an int4 view of the same bytes (no pass); NVFP4 block_scale float8_e4m3fn [N, K/16] and
global_scale f32 []; MXFP4 scale uint8 E8M0 [N, K/32]. The block scales are widened to bf16 and transposed
to one row per block ([K/16, N] / [K/32, N]) per call.
Shapes: K % 128 == 0, N % 128 == 0; M is padded to tile_tokens (w4a16_mgpu.can_use's rules, group 128).
Needs a Hopper GPU and jax >= 0.11 (no interpret mode): CPU CI checks the decode, the rules and that it
lowers; benchmarks/gemm_probe.py --parts fp4mgpu checks it against the reference on a GPU. Not planned by
the dispatcher until measured there.
"""
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import fp4
from pallas_kernels import w4a16_mgpu as w4
from pallas_kernels.w4a16_mgpu import MgpuW4Config

BLOCK = {"nvfp4": 16, "mxfp4": 32}


def e2m1_from_signed_nibble(v):
    """E2M1 values from the 4-bit codes read as signed int4 and converted to a float type (v in [-8, 7]:
    code c = v mod 16, sign = c >= 8, magnitude index m = c mod 8). Elementwise, so the same code runs on
    Mosaic register arrays and on jnp arrays; exact in bf16."""
    negative = v < 0
    m = jnp.where(negative, v + 8, v)
    magnitude = 2 * m - 0.5 * jnp.minimum(m, 4) - jnp.minimum(m, 6)   # 0, .5, 1, 1.5, 2, 3, 4, 6
    return jnp.where(negative, -magnitude, magnitude)


def _step(wg, _scratch, x_smem, w_smem, s_smem, acc_ref, *, flip: bool, block: int):
    """One 128-K step of a compute warpgroup: its E2M1 tile decoded to bf16 in registers, then per block of
    `block` columns one scaled slice and one wgmma into the running accumulator."""
    assert not flip, "FP4 codes are read as they are"
    v, channels = w4.bf16_tile(wg, w_smem, flip=False)                 # the nibbles as signed ints
    return w4.wgmma_blocks(acc_ref, e2m1_from_signed_nibble(v), x_smem, block,
                           lambda j, a_j: a_j * w4.per_channel_row(s_smem, j, channels, a_j.shape))


def fit_stages(kind: str, tile_tokens: int, split_k: int = 1) -> int:
    """The most pipeline stages that fit in shared memory for this format and tiling."""
    return w4.fit_stages(tile_tokens, split_k=split_k, asym=False, scale_rows=w4.GROUP // BLOCK[kind],
                         f32_out=kind == "nvfp4")


def _check(fn: str, x, packed, scale, scale_name: str, scale_dtype, block: int, cfg: MgpuW4Config):
    m, k = x.shape
    n = packed.shape[0]
    if (packed.shape != (n, k // 2) or packed.dtype != jnp.uint8 or scale.shape != (n, k // block)
            or scale.dtype != scale_dtype or not w4.can_use(m, n, k, w4.GROUP, cfg)):
        raise ValueError(f"{fn}: x {x.shape}, packed {packed.shape} {packed.dtype}, {scale_name} {scale.shape} "
                         f"{scale.dtype} do not fit {cfg} (needs packed uint8 (N, K/2), {scale_name} "
                         f"{jnp.dtype(scale_dtype).name} (N, K/{block}), K % 128 == 0, N % 128 == 0)")


def _run(x, packed, scale_rows, cfg: MgpuW4Config, block: int, post_scale=None):
    step = functools.partial(_step, block=block)
    return w4.launch_swap_ab(x.astype(jnp.bfloat16), w4.bits_as_int4(packed), [scale_rows], cfg, step,
                             acc_in_ref=True, sub_k=block, post_scale=post_scale)


@functools.partial(jax.jit, static_argnames=("config",))
def nvfp4_matmul_mgpu(x, packed, block_scale, global_scale, *, config: MgpuW4Config = w4.DEFAULT):
    """y [M, N] bf16 = (x @ (e2m1 * block_scale)^T in f32) * global_scale, one rounding."""
    _check("nvfp4_matmul_mgpu", x, packed, block_scale, "block_scale", jnp.float8_e4m3fn, 16, config)
    rows = block_scale.astype(jnp.bfloat16).T                                       # [K/16, N], exact
    return _run(x, packed, rows, config, 16, post_scale=global_scale)


@functools.partial(jax.jit, static_argnames=("config",))
def mxfp4_matmul_mgpu(x, packed, scale, *, config: MgpuW4Config = w4.DEFAULT):
    """y [M, N] bf16 = x @ (e2m1 * 2^(scale - 127))^T in f32, one rounding (scales within bf16's range:
    E8M0 1..254)."""
    _check("mxfp4_matmul_mgpu", x, packed, scale, "scale", jnp.uint8, 32, config)
    rows = fp4.e8m0_to_f32(scale).astype(jnp.bfloat16).T                          # [K/32, N], exact
    return _run(x, packed, rows, config, 32)
