"""FP4 weights (NVFP4, MXFP4) x bf16 activations from M=2 on Hopper's bf16 tensor cores, with the Mosaic GPU
lowering: w4a16_mgpu.py's swap-AB grid (y^T = W @ x^T, 64 channels per compute warpgroup, the weights as
wgmma's A operand decoded in registers) with an E2M1 decode in place of the INT4 one.

Per 128-K step each compute warpgroup
  1. loads its [64, 128] tile of 4-bit codes c (sign bit 3, magnitude index e1 e0 m in bits 0-2) as int4 in
     Mosaic's 4-bit upcast layout and moves it to the wgmma operand layout, still 4-bit;
  2. decodes each 32-bit register word of 8 codes by byte permutes (PTX prmt, inline in the Mosaic kernel):
     the low and the high bytes of the bf16 magnitudes are looked up in two 8-byte tables (the 3-bit indices
     as prmt selectors, 4 codes per lookup), the sign bits moved to the high bytes' top bits, and the two
     byte sets interleaved into bf16 pairs: about 2 instructions per weight (fp4_gemv.py decodes to float16
     the same way);
  3. per block of 16 (NVFP4) or 32 (MXFP4) columns multiplies by the block's scale (NVFP4: the E4M3 block
     scale as bf16; MXFP4: 2^(u - 127) as bf16; both exact, and so is E2M1 x scale, at most 6 significant
     bits) and issues one wgmma of that slice into the warpgroup's f32 accumulator.
NVFP4's global scale multiplies the f32 result (the kernel writes f32 for NVFP4), which is then rounded
once to bf16; MXFP4 rounds the accumulator to bf16 in the kernel's epilogue.

Numerics: the same model as fp4.py's references (exact weights, exact products, f32 sums, one rounding);
only the f32 summation order differs. Tolerance: |y - ref| <= 1e-2 |ref| + 1e-2 rms(ref).

Inputs: x bf16 [M, K]; packed uint8 [N, K/2] (low nibble = even k), read as an int4 view of the same bytes;
NVFP4 block_scale float8_e4m3fn [N, K/16] and global_scale f32 []; MXFP4 scale uint8 E8M0 [N, K/32] (valid
for u in [1, 254], the bf16 exponent range; fp4.py's kernels take u <= 248). The per-step scale rows
([K/G, N] bf16) come from step_rows, built per call or once beforehand (`rows`). jaxq's QDense builds them
per call (a transpose of the block scales, part of the times measured in runs 78-79):
jaxq.nn.kernel_dispatch.with_kernel_rows keeps rows for W4A16 / W4A8 only, since NVFP4's would add 2 bytes
per 16 weights to the 9 the weights take.
Shapes: K % 128 == 0, N % 128 == 0; M is padded to the token tile. Needs a Hopper GPU and jax >= 0.11;
the CPU checks the rules and that it lowers.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _common as cm
from pallas_kernels import fp4, w4a16_mgpu
from pallas_kernels.fp4_gemv import BYTE_TOP_BITS, SIGN_SELECTORS
from pallas_kernels.w4a16_mgpu import GROUP, WG_CHANNELS, MgpuW4Config

GROUPS = {"nvfp4": 16, "mxfp4": 32}                    # K elements per block scale
# Low and high bytes of the bf16 E2M1 magnitudes 0, .5, 1, 1.5 (word 0) and 2, 3, 4, 6 (word 1): prmt tables.
BF16_LOW_TABLE = (0xC0800000, 0xC0804000)
BF16_HIGH_TABLE = (0x3F3F3F00, 0x40404040)
# prmt selectors: the bf16 pair of codes (2p, 2p + 1) of four from {low bytes, high bytes}, p = 0, 1.
PAIR_SELECTORS = (0x5140, 0x7362)


def can_use(fmt_kind: str, m: int, n: int, k: int, cfg: MgpuW4Config) -> bool:
    """Shapes and configs this kernel takes (callers check it, with a Hopper GPU, before calling)."""
    return fmt_kind in GROUPS and w4a16_mgpu.can_use(m, n, k, GROUP, cfg)


def step_rows(fmt_kind: str, scale) -> tuple:
    """The kernel's per-step scale rows from the block scales [N, K/G]: bf16 [K/G, N], exact (NVFP4: the E4M3
    values; MXFP4: 2^(u - 127))."""
    values = scale.astype(jnp.float32) if fmt_kind == "nvfp4" else fp4.e8m0_to_f32(scale)
    return (values.astype(jnp.bfloat16).T,)


def _pair_ptx(part: int) -> str:
    """PTX: the bf16 pair ($0) of codes (2 part, 2 part + 1) of the int32 word $1 (code i in bits 4i..4i+3)."""
    quad = part // 2
    return f"""{{
    .reg .b32 sel, lo, hi, moved, sign, t0, t1, t2, t3;
    and.b32 sel, $1, 0x77777777;
    shr.b32 sel, sel, {16 * quad};
    mov.b32 t0, {BF16_LOW_TABLE[0]:#x};
    mov.b32 t1, {BF16_LOW_TABLE[1]:#x};
    mov.b32 t2, {BF16_HIGH_TABLE[0]:#x};
    mov.b32 t3, {BF16_HIGH_TABLE[1]:#x};
    prmt.b32 lo, t0, t1, sel;
    prmt.b32 hi, t2, t3, sel;
    shl.b32 moved, $1, 4;
    prmt.b32 sign, moved, $1, {SIGN_SELECTORS[quad]:#x};
    and.b32 sign, sign, {BYTE_TOP_BITS & 0xFFFFFFFF:#x};
    or.b32 hi, hi, sign;
    prmt.b32 $0, lo, hi, {PAIR_SELECTORS[part % 2]:#x};
    }}"""


def e2m1_pair_reference(words, part: int):
    """What _pair_ptx(part) computes, in jnp (cm.prmt's emulation): int32 words -> int32 bf16 pairs."""
    quad = part // 2
    sel = lax.shift_right_logical(words & 0x77777777, jnp.int32(16 * quad))
    as_int32 = lambda table: [jnp.uint32(v).view(jnp.int32) for v in table]  # noqa: E731
    lo = cm.prmt(*as_int32(BF16_LOW_TABLE), sel, native=False)
    hi = cm.prmt(*as_int32(BF16_HIGH_TABLE), sel, native=False)
    sign = cm.prmt(words << 4, words, SIGN_SELECTORS[quad], native=False) & BYTE_TOP_BITS
    return cm.prmt(lo, hi | sign, PAIR_SELECTORS[part % 2], native=False)


def _decode_e2m1(codes):
    """int4 codes [64, 128] in the WGMMA layout -> their E2M1 values as bf16 [64, 128] (same layout), exact. The
    layout's registers hold 2 codes each; every 4 of them are packed into one 32-bit word, so the index, sign
    and table work of _pair_ptx is shared by the word's 4 pairs (ptxas merges the repeated instructions of
    the 4 asm blocks that read one word)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    layout = plgpu.Layout.WGMMA

    @plgpu.inline_mgpu(arg_types=(layout,),
                       return_type=plgpu.ShapeDtypeStruct(codes.shape, jnp.bfloat16, layout=layout))
    def decode(_ctx, fa):
        import numpy as np
        from jax.experimental.mosaic.gpu import fragmented_array as mfa
        from jax.experimental.mosaic.gpu import utils
        from jaxlib.mlir import ir
        from jaxlib.mlir.dialects import llvm

        i32 = ir.IntegerType.get_signless(32)
        pair_ty = ir.VectorType.get((2,), ir.BF16Type.get())
        out = np.empty_like(fa.registers)
        entries = list(np.ndenumerate(fa.registers))
        if fa.registers.size % 4 or ir.VectorType(entries[0][1].type).shape != [2]:
            raise NotImplementedError(f"fp4_mgpu: expected registers of 2 codes, a multiple of 4 per thread; got "
                                      f"{fa.registers.size} of {entries[0][1].type}")
        for first in range(0, len(entries), 4):
            four = entries[first:first + 4]
            word = utils.bitcast(utils.vector_concat([reg for _, reg in four]), i32)
            for part, (idx, _) in enumerate(four):
                out[idx] = utils.bitcast(llvm.inline_asm(i32, [word], _pair_ptx(part), "=r,r"), pair_ty)
        return mfa.FragmentedArray(_registers=out, _layout=fa.layout, _is_signed=None)

    return decode(codes)


def _fp4_step(wg, _scratch, x_smem, w_smem, s_smem, acc_ref, *, flip: bool, group: int):
    """One 128-K step of a compute warpgroup (module docstring); flip is the int4 launcher's flag for INT4
    codes and does not apply to E2M1 (the int4 view's bits are the codes as they are)."""
    del flip
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    channels = pl.ds(wg * WG_CHANNELS, WG_CHANNELS)
    codes = plgpu.load(w_smem.at[channels], (), layout=plgpu.Layout.WGMMA_UPCAST_4X)
    a = _decode_e2m1(plgpu.layout_cast(codes, plgpu.Layout.WGMMA))
    for j in range(GROUP // group):
        a_j = a[:, j * group:(j + 1) * group]
        scale = w4a16_mgpu.per_channel_row(s_smem, j, channels, a_j.shape)
        plgpu.wgmma(acc_ref, a_j * scale, x_smem.at[:, pl.ds(j * group, group)].T)
    plgpu.wgmma_wait(0)
    return acc_ref


def _check(fn: str, fmt_kind: str, x, packed, scale, rows, cfg: MgpuW4Config):
    m, k = x.shape
    n = packed.shape[0]
    group = GROUPS[fmt_kind]
    scale_dtype = jnp.float8_e4m3fn if fmt_kind == "nvfp4" else jnp.uint8
    if (x.dtype != jnp.bfloat16 or packed.dtype != jnp.uint8 or packed.shape != (n, k // 2)
            or scale.shape != (n, k // group) or scale.dtype != scale_dtype or not can_use(fmt_kind, m, n, k, cfg)):
        raise ValueError(f"{fn}: x {x.shape} {x.dtype}, packed {packed.shape} {packed.dtype}, scale {scale.shape} "
                         f"{scale.dtype} do not fit {cfg} (needs bf16 x (M, K), uint8 packed (N, K/2), "
                         f"{jnp.dtype(scale_dtype)} scale (N, K/{group}), K % 128 == 0, N % 128 == 0)")
    if rows is not None:
        w4a16_mgpu.check_rows(fn, rows, (((k // group, n), jnp.dtype(jnp.bfloat16)),))


def _launch(fmt_kind: str, x, packed, rows, cfg: MgpuW4Config, f32_out: bool):
    group = GROUPS[fmt_kind]
    step = functools.partial(_fp4_step, group=group)
    return w4a16_mgpu.launch_swap_ab(x, [packed], [list(rows)], cfg, step, acc_in_ref=True, sub_k=group,
                                     f32_out=f32_out)


@functools.partial(jax.jit, static_argnames=("config",))
def nvfp4_matmul_mgpu(x, packed, block_scale, global_scale, *, config: MgpuW4Config = w4a16_mgpu.DEFAULT,
                      rows=None):
    """y [M, N] bf16 = ((x @ (e2m1 * block_scale)^T) in f32 * global_scale), rounded once. rows:
    step_rows("nvfp4", block_scale) built beforehand, or None to build them here."""
    _check("nvfp4_matmul_mgpu", "nvfp4", x, packed, block_scale, rows, config)
    if jnp.size(global_scale) != 1:
        raise ValueError(f"nvfp4_matmul_mgpu: global_scale must be a scalar, got shape {jnp.shape(global_scale)}")
    rows = step_rows("nvfp4", block_scale) if rows is None else rows
    y = _launch("nvfp4", x, packed, rows, config, f32_out=True)
    return (y * jnp.asarray(global_scale, jnp.float32)).astype(jnp.bfloat16)


@functools.partial(jax.jit, static_argnames=("config",))
def mxfp4_matmul_mgpu(x, packed, scale, *, config: MgpuW4Config = w4a16_mgpu.DEFAULT, rows=None):
    """y [M, N] bf16 = x @ (e2m1 * 2^(scale - 127))^T, f32 sums rounded once. rows: step_rows("mxfp4", scale)
    built beforehand, or None to build them here."""
    _check("mxfp4_matmul_mgpu", "mxfp4", x, packed, scale, rows, config)
    rows = step_rows("mxfp4", scale) if rows is None else rows
    return _launch("mxfp4", x, packed, rows, config, f32_out=False)
