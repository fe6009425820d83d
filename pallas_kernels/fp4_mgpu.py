"""FP4 weights (NVFP4, MXFP4) x bf16 activations from M=2 on Hopper's bf16 tensor cores, with the Mosaic GPU
lowering: w4a16_mgpu.py's swap-AB grid (y^T = W @ x^T, 64 channels per compute warpgroup, the weights as
wgmma's A operand decoded in registers) with an E2M1 decode in place of the INT4 one.

Per 128-K step each compute warpgroup
  1. loads its [64, 128] tile of 4-bit codes c (sign bit 3, magnitude index e1 e0 m in bits 0-2) as int4 in
     Mosaic's 4-bit upcast layout and moves it to the wgmma operand layout, still 4-bit (inside the decode's
     inline_mgpu body, where the registers still show the 32-bit words they were sliced from);
  2. decodes each 32-bit word of 8 codes by byte permutes (PTX prmt, one inline asm block per word):
     the low and the high bytes of the bf16 magnitudes are looked up in two 8-byte tables (the 3-bit indices
     as prmt selectors, 4 codes per lookup), the sign bits moved to the high bytes' top bits, and the two
     byte sets interleaved into bf16 pairs: 21 instructions per word with step 3's multiplies (fp4_gemv.py
     decodes to float16 the same way);
  3. multiplies each decoded bf16 pair by its block's scale in the same PTX (mul.rn.bf16x2; NVFP4: the E4M3
     block scale as bf16; MXFP4: 2^(u - 127) as bf16; both exact, and so is E2M1 x scale, at most 6
     significant bits), the scale of a register chosen by the 8-column tile it holds, and issues one wgmma
     of the whole [64, 128] tile into the warpgroup's f32 accumulator (x in shared memory keeps W4A16's
     128-byte swizzle).
NVFP4's global scale (an f32 operand read in the epilogue) multiplies the f32 accumulator before the
epilogue rounds it once to bf16; MXFP4 rounds the accumulator as it is.

Numerics: the same model as fp4.py's references (exact weights, exact products, f32 sums, one rounding);
only the f32 summation order differs. Tolerance: |y - ref| <= 1e-2 |ref| + 1e-2 rms(ref).

Inputs: x bf16 [M, K]; packed uint8 [N, K/2] (low nibble = even k), read as an int4 view of the same bytes;
NVFP4 block_scale float8_e4m3fn [N, K/16] and global_scale f32 []; MXFP4 scale uint8 E8M0 [N, K/32] (valid
for u in [1, 254], the bf16 exponent range; fp4.py's kernels take u <= 248). The per-step scale rows
([K/G, N] bf16) come from step_rows, built per call or once beforehand (`rows`). jaxq's QDense builds them
per call (a transpose of the block scales, part of the times measured; 6 us on 8b.gate_up, H200 run 84):
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


def _word_ptx() -> str:
    """PTX: the four bf16 pairs $0..$3 of the int32 word $4 (code i in bits 4i..4i+3; pair p = codes 2p, 2p + 1),
    each times its bf16 scale pair $5..$8 (the block scale in both halves); $9..$12: the tables
    BF16_LOW_TABLE + BF16_HIGH_TABLE, passed in registers (prmt reads no immediates) that the compiler keeps
    across words. One asm block per word, so the index, table and sign work is shared by the word's 4 pairs."""
    lines = [".reg .b32 sel, moved, lo<2>, hi<2>, sign<2>, pair<4>;",
             "and.b32 sel, $4, 0x77777777;", "shl.b32 moved, $4, 4;"]
    for quad in range(2):
        if quad:
            lines.append("shr.b32 sel, sel, 16;")
        lines += [f"prmt.b32 lo{quad}, $9, $10, sel;", f"prmt.b32 hi{quad}, $11, $12, sel;",
                  f"prmt.b32 sign{quad}, moved, $4, {SIGN_SELECTORS[quad]:#x};",
                  f"and.b32 sign{quad}, sign{quad}, {BYTE_TOP_BITS & 0xFFFFFFFF:#x};",
                  f"or.b32 hi{quad}, hi{quad}, sign{quad};"]
    for part in range(4):
        quad = part // 2
        lines += [f"prmt.b32 pair{part}, lo{quad}, hi{quad}, {PAIR_SELECTORS[part % 2]:#x};",
                  f"mul.rn.bf16x2 ${part}, pair{part}, ${5 + part};"]
    return "{\n" + "\n".join(lines) + "\n}"


def e2m1_pair_reference(words, part: int):
    """What _word_ptx computes for pair `part` before its scale multiply, in jnp (cm.prmt's emulation): int32
    words -> int32 bf16 pairs."""
    quad = part // 2
    sel = lax.shift_right_logical(words & 0x77777777, jnp.int32(16 * quad))
    as_int32 = lambda table: [jnp.uint32(v).view(jnp.int32) for v in table]  # noqa: E731
    lo = cm.prmt(*as_int32(BF16_LOW_TABLE), sel, native=False)
    hi = cm.prmt(*as_int32(BF16_HIGH_TABLE), sel, native=False)
    sign = cm.prmt(words << 4, words, SIGN_SELECTORS[quad], native=False) & BYTE_TOP_BITS
    return cm.prmt(lo, hi | sign, PAIR_SELECTORS[part % 2], native=False)


def _decode_scaled(codes, scales, group: int):
    """int4 codes [64, 128] as loaded (Mosaic's 4-bit upcast layout), scales: per block of `group` columns its
    [64, 8] WGMMA array of the block scale per row -> the scaled E2M1 values as bf16 [64, 128] (WGMMA layout),
    exact. After the relayout to WGMMA, done here, the registers hold 2 codes each (registers index 1: the
    tile's 8-column block; the rest: as in a [64, 8] array), each a slice of a 32-bit word of 8 codes (pair p
    of the word = the slice at offset 2p); every word is decoded by one _word_ptx block. Decoding the words
    themselves matters: rebuilding them from the 2-code registers cost more than the decode (H200, run 83)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    layout = plgpu.Layout.WGMMA

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA_UPCAST_4X,) + (layout,) * len(scales),
                       return_type=plgpu.ShapeDtypeStruct(codes.shape, jnp.bfloat16, layout=layout))
    def decode(_ctx, loaded, *scale_fas):
        import numpy as np
        from jax.experimental.mosaic.gpu import fragmented_array as mfa
        from jax.experimental.mosaic.gpu import utils
        from jaxlib.mlir import ir
        from jaxlib.mlir.dialects import arith, llvm, vector

        fa = loaded.to_layout(mfa.WGMMA_LAYOUT)           # here, so that its registers still show their words
        i32 = ir.IntegerType.get_signless(32)
        pair_ty = ir.VectorType.get((2,), ir.BF16Type.get())
        words: dict = {}                                # source word -> {pair p: register index}
        for idx, reg in np.ndenumerate(fa.registers):
            op = getattr(reg.owner, "opview", None)
            if (not isinstance(op, vector.ExtractStridedSliceOp) or utils.bitwidth(op.source.type) != 32
                    or ir.VectorType(reg.type).shape != [2] or op.strides[0].value != 1):
                raise NotImplementedError(f"fp4_mgpu: expected registers of 2 codes sliced from 32-bit words; "
                                          f"got {reg.type} from {reg.owner}")
            words.setdefault(op.source, {})[op.offsets[0].value // 2] = idx
        if fa.registers.shape[1] != len(scale_fas) * group // 8 or any(s.registers.shape[1] != 1 for s in scale_fas):
            raise NotImplementedError(f"fp4_mgpu: expected {group // 8} 8-column blocks per scale; got "
                                      f"{fa.registers.shape} registers and {len(scale_fas)} scales")
        ptx, four_i32 = _word_ptx(), llvm.StructType.get_literal([i32] * 4)
        tables = [arith.constant(i32, ir.IntegerAttr.get(i32, v - (1 << 32) if v >= 1 << 31 else v))
                  for v in BF16_LOW_TABLE + BF16_HIGH_TABLE]
        out = np.empty_like(fa.registers)
        for source, parts in words.items():
            first = next(iter(parts.values()))            # a scale for pairs the word's registers do not use
            scales = [utils.bitcast(scale_fas[i[1] // (group // 8)].registers[(i[0], 0, *i[2:])], i32)
                      for i in (parts.get(p, first) for p in range(4))]
            pairs = llvm.inline_asm(four_i32, [utils.bitcast(source, i32), *scales, *tables], ptx,
                                    "=r,=r,=r,=r" + ",r" * 9)
            for part, idx in parts.items():
                out[idx] = utils.bitcast(llvm.extractvalue(i32, pairs, [part]), pair_ty)
        return mfa.FragmentedArray(_registers=out, _layout=fa.layout, _is_signed=None)

    return decode(codes, *scales)


def _fp4_step(wg, _scratch, x_smem, w_smem, s_smem, acc_ref, *, flip: bool, group: int):
    """One 128-K step of a compute warpgroup (module docstring); flip is the int4 launcher's flag for INT4
    codes and does not apply to E2M1 (the int4 view's bits are the codes as they are)."""
    del flip
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    channels = pl.ds(wg * WG_CHANNELS, WG_CHANNELS)
    codes = plgpu.load(w_smem.at[channels], (), layout=plgpu.Layout.WGMMA_UPCAST_4X)
    scales = [w4a16_mgpu.per_channel_row(s_smem, j, channels, (WG_CHANNELS, 8)) for j in range(GROUP // group)]
    a = _decode_scaled(codes, scales, group)
    plgpu.wgmma(acc_ref, a, x_smem.T)
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


def _launch(fmt_kind: str, x, packed, rows, cfg: MgpuW4Config, out_scale=None):
    group = GROUPS[fmt_kind]
    step = functools.partial(_fp4_step, group=group)
    return w4a16_mgpu.launch_swap_ab(x, [packed], [list(rows)], cfg, step, acc_in_ref=True, row_k=group,
                                     out_scale=out_scale)


@functools.partial(jax.jit, static_argnames=("config",))
def nvfp4_matmul_mgpu(x, packed, block_scale, global_scale, *, config: MgpuW4Config = w4a16_mgpu.DEFAULT,
                      rows=None):
    """y [M, N] bf16 = ((x @ (e2m1 * block_scale)^T) in f32 * global_scale), rounded once. rows:
    step_rows("nvfp4", block_scale) built beforehand, or None to build them here."""
    _check("nvfp4_matmul_mgpu", "nvfp4", x, packed, block_scale, rows, config)
    if jnp.size(global_scale) != 1:
        raise ValueError(f"nvfp4_matmul_mgpu: global_scale must be a scalar, got shape {jnp.shape(global_scale)}")
    rows = step_rows("nvfp4", block_scale) if rows is None else rows
    return _launch("nvfp4", x, packed, rows, config, out_scale=global_scale)


@functools.partial(jax.jit, static_argnames=("config",))
def mxfp4_matmul_mgpu(x, packed, scale, *, config: MgpuW4Config = w4a16_mgpu.DEFAULT, rows=None):
    """y [M, N] bf16 = x @ (e2m1 * 2^(scale - 127))^T, f32 sums rounded once. rows: step_rows("mxfp4", scale)
    built beforehand, or None to build them here."""
    _check("mxfp4_matmul_mgpu", "mxfp4", x, packed, scale, rows, config)
    rows = step_rows("mxfp4", scale) if rows is None else rows
    return _launch("mxfp4", x, packed, rows, config)
