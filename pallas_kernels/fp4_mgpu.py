"""FP4 weights (NVFP4, MXFP4) x bf16 activations from M=2 on Hopper's bf16 tensor cores, with the Mosaic GPU
lowering: w4a16_mgpu.py's swap-AB grid (y^T = W @ x^T, 64 channels per compute warpgroup, the weights as
wgmma's A operand decoded in registers) with an E2M1 decode in place of the INT4 one.

Per 128-K step each compute warpgroup
  1. loads its [64, 128] tile of 4-bit codes c (sign bit 3, magnitude index e1 e0 m in bits 0-2) as int4 in
     Mosaic's 4-bit upcast layout and moves it to the wgmma operand layout, still 4-bit (inside the decode's
     inline_mgpu body, where the registers still show the 32-bit words they were sliced from);
  2. reads its rows' block scales for the step from the channel-major scale tile in shared memory (the
     checkpoint's own [N, K/G] bytes, one 16-byte TMA row per channel covering 2 NVFP4 / 4 MXFP4 K-steps; one
     8- or 4-byte load per row) and turns each scale byte into a bf16 pair by PTX shifts, masks and a prmt
     (_scale_ptx: MXFP4's E8M0 u is 2^(u - 127); NVFP4's E4M3 is moved into a bf16 whose exponent field is
     E4M3's own, i.e. the value times 2^-120, subnormals included);
  3. decodes each 32-bit word of 8 codes by byte permutes (PTX prmt, one inline asm block per word):
     the low and the high bytes of the bf16 magnitudes are looked up in two 8-byte tables (the 3-bit indices
     as prmt selectors, 4 codes per lookup; NVFP4's table holds the magnitudes times 2^120, which the scales'
     2^-120 cancels), the sign bits moved to the high bytes' top bits, and the two byte sets interleaved into
     bf16 pairs: 21 instructions per word with step 4's multiplies (fp4_gemv.py decodes to float16 the same
     way);
  4. multiplies each decoded bf16 pair by its block's scale pair in the same PTX (mul.rn.bf16x2; E2M1 x
     scale has at most 6 significant bits and stays in bf16's range: exact), the scale of a register chosen
     by the 8-column tile it holds, and issues one wgmma of the whole [64, 128] tile into the warpgroup's f32
     accumulator (x in shared memory keeps W4A16's 128-byte swizzle).
With two or four 128-K steps per pipeline step (MgpuW4Config.sub_steps) every tile is decoded before the first
wgmma (NVFP4's four take a 32-byte scale block per channel: two TMA rows).
NVFP4's global scale (an f32 operand read in the epilogue) multiplies the f32 accumulator before the
epilogue rounds it once to bf16; MXFP4 rounds the accumulator as it is.

Numerics: the same model as fp4.py's references (exact weights, exact products, f32 sums, one rounding);
only the f32 summation order differs. Tolerance: |y - ref| <= 1e-2 |ref| + 1e-2 rms(ref).

Inputs: x bf16 [M, K]; packed uint8 [N, K/2] (low nibble = even k), read as an int4 view of the same bytes;
NVFP4 block_scale float8_e4m3fn [N, K/16] and global_scale f32 []; MXFP4 scale uint8 E8M0 [N, K/32] (valid
for u in [1, 254], the bf16 exponent range; fp4.py's kernels take u <= 248). The kernel reads the scales as
they are stored (no per-call pass) where K/G is a multiple of 16 (K % 256 NVFP4, K % 512 MXFP4); otherwise
each call pads their columns to one (kernel_scales).
Shapes: K % 128 == 0, N % 128 == 0; a K split must give each part whole scale rows; M is padded to the token
tile. Needs a Hopper GPU and jax >= 0.11; the CPU checks the rules and that it lowers.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _common as cm
from pallas_kernels import w4a16_mgpu
from pallas_kernels.fp4_gemv import BYTE_TOP_BITS, SIGN_SELECTORS
from pallas_kernels.w4a16_mgpu import GROUP, SCALE_ROW_BYTES, WG_CHANNELS, MgpuW4Config

GROUPS = {"nvfp4": 16, "mxfp4": 32}                    # K elements per block scale
SCALE_STEPS = {f: SCALE_ROW_BYTES * g // GROUP for f, g in GROUPS.items()}   # K-steps per 16-byte scale row
# Low and high bytes of the bf16 E2M1 magnitudes 0, .5, 1, 1.5 (word 0) and 2, 3, 4, 6 (word 1): prmt tables.
# NVFP4's high bytes carry 120 more in the exponent (x 2^120) for its scales' 2^-120.
BF16_LOW_TABLE = (0xC0800000, 0xC0804000)
BF16_HIGH_TABLES = {"mxfp4": (0x3F3F3F00, 0x40404040), "nvfp4": (0x7B7B7B00, 0x7C7C7C7C)}
# prmt selectors: the bf16 pair of codes (2p, 2p + 1) of four from {low bytes, high bytes}, p = 0, 1.
PAIR_SELECTORS = (0x5140, 0x7362)
# A word of 4 scale bytes -> low bytes (w << shift) & mask and high bytes ((w >> shift) & mask) | (w & sign)
# of the bf16 of each: NVFP4 E4M3 s.eeee.mmm -> s.0000eee|e.mmm0000 (the value x 2^-120), MXFP4 E8M0 u ->
# u << 7 (2^(u - 127)). prmt then gives scale byte j as a pair of that bf16 (selector 0x(4+j)j(4+j)j).
SCALE_BITS = {"nvfp4": (4, 0xF0F0F0F0, 4, 0x07070707, 0x80808080), "mxfp4": (7, 0x80808080, 1, 0x7F7F7F7F, 0)}
NVFP4_SCALE_BIAS = 2.0 ** -120                          # what NVFP4's scale pairs hold: E4M3 value x this


def can_use(fmt_kind: str, m: int, n: int, k: int, cfg: MgpuW4Config) -> bool:
    """Shapes and configs this kernel takes (callers check it, with a Hopper GPU, before calling)."""
    return (fmt_kind in GROUPS and w4a16_mgpu.can_use(m, n, k, GROUP, cfg) and cfg.wg_channels == WG_CHANNELS
            and (cfg.split_k == 1 or (k // GROUP // cfg.split_k) % SCALE_STEPS[fmt_kind] == 0))


def kernel_scales(scale):
    """The block scales as the kernel reads them: [N, K/G] as stored where K/G % 16 == 0, else with zero
    columns up to the next multiple of 16 (TMA rows are 16-byte multiples)."""
    pad = -scale.shape[1] % SCALE_ROW_BYTES
    return jnp.pad(scale, ((0, 0), (0, pad))) if pad else scale


def _word_ptx() -> str:
    """PTX: the four bf16 pairs $0..$3 of the int32 word $4 (code i in bits 4i..4i+3; pair p = codes 2p, 2p + 1),
    each times its bf16 scale pair $5..$8 (the block scale in both halves); $9..$12: the tables
    BF16_LOW_TABLE + the format's BF16_HIGH_TABLES, passed in registers (prmt reads no immediates) that the
    compiler keeps across words. One asm block per word, so the index, table and sign work is shared by the
    word's 4 pairs."""
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


def _scale_selector(j: int) -> int:
    return (4 + j) << 12 | j << 8 | (4 + j) << 4 | j


def _scale_ptx(fmt_kind: str) -> str:
    """PTX: the bf16 pairs $0..$3 of the 4 scale bytes of the int32 word $4 (SCALE_BITS)."""
    low_shift, low_mask, high_shift, high_mask, sign = SCALE_BITS[fmt_kind]
    lines = [".reg .b32 lo, hi, sign;", f"shl.b32 lo, $4, {low_shift};", f"and.b32 lo, lo, {low_mask:#x};",
             f"shr.b32 hi, $4, {high_shift};", f"and.b32 hi, hi, {high_mask:#x};"]
    if sign:
        lines += [f"and.b32 sign, $4, {sign:#x};", "or.b32 hi, hi, sign;"]
    lines += [f"prmt.b32 ${j}, lo, hi, {_scale_selector(j):#x};" for j in range(4)]
    return "{\n" + "\n".join(lines) + "\n}"


def _as_int32(v: int):
    return jnp.uint32(v).view(jnp.int32)


def e2m1_pair_reference(words, part: int, fmt_kind: str):
    """What _word_ptx computes for pair `part` before its scale multiply, in jnp (cm.prmt's emulation): int32
    words -> int32 bf16 pairs (NVFP4: the values x 2^120)."""
    quad = part // 2
    sel = lax.shift_right_logical(words & 0x77777777, jnp.int32(16 * quad))
    lo = cm.prmt(*map(_as_int32, BF16_LOW_TABLE), sel, native=False)
    hi = cm.prmt(*map(_as_int32, BF16_HIGH_TABLES[fmt_kind]), sel, native=False)
    sign = cm.prmt(words << 4, words, SIGN_SELECTORS[quad], native=False) & BYTE_TOP_BITS
    return cm.prmt(lo, hi | sign, PAIR_SELECTORS[part % 2], native=False)


def scale_pair_reference(words, j: int, fmt_kind: str):
    """What _scale_ptx computes for scale byte j of int32 words of 4 scale bytes, in jnp: int32 bf16 pairs."""
    low_shift, low_mask, high_shift, high_mask, sign = SCALE_BITS[fmt_kind]
    lo = (words << low_shift) & _as_int32(low_mask)
    hi = (lax.shift_right_logical(words, jnp.int32(high_shift)) & _as_int32(high_mask)) | (words & _as_int32(sign))
    return cm.prmt(lo, hi, _scale_selector(j), native=False)


def _i32(v: int):
    """An MLIR i32 constant of v (values >= 2^31 written as their negative int32)."""
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith
    i32 = ir.IntegerType.get_signless(32)
    return arith.constant(i32, ir.IntegerAttr.get(i32, v - (1 << 32) if v >= 1 << 31 else v))


def _asm4(ptx: str, args: list) -> list:
    """One inline PTX block of 4 int32 outputs ($0..$3) over int32 register args ($4...)."""
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import llvm
    i32 = ir.IntegerType.get_signless(32)
    out = llvm.inline_asm(llvm.StructType.get_literal([i32] * 4), args, ptx, "=r,=r,=r,=r" + ",r" * len(args))
    return [llvm.extractvalue(i32, out, [i]) for i in range(4)]


def _thread_scale_pairs(scales_smem, fmt_kind: str) -> dict:
    """This thread's scales of the step, from scales_smem (memref [64, bytes per step], rows 16 bytes apart):
    {register index of a [64, 8] WGMMA array (its row): [bf16 pair (int32) of each block of the step]}, one
    4- or 8-byte load per row and one _scale_ptx block per 4 scale bytes."""
    import numpy as np
    from jax.experimental.mosaic.gpu import fragmented_array as mfa
    from jax.experimental.mosaic.gpu import utils
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith, llvm, vector

    i32 = ir.IntegerType.get_signless(32)
    ref_ty = ir.MemRefType(scales_smem.type)
    n_words = ref_ty.shape[1] // 4
    base, row_stride = utils.memref_ptr(scales_smem), ref_ty.get_strides_and_offset()[0][0]
    ptx, pairs = _scale_ptx(fmt_kind), {}
    for ri, (row, _) in zip(np.ndindex(mfa.WGMMA_LAYOUT.registers_shape((WG_CHANNELS, 8))),
                            mfa.WGMMA_LAYOUT.thread_idxs((WG_CHANNELS, 8))):
        offset = arith.muli(arith.index_cast(i32, row), _i32(row_stride))
        ptr = utils.getelementptr(base, [offset], ir.IntegerType.get_signless(8))
        words = llvm.load(ir.VectorType.get((n_words,), i32), ptr, alignment=4 * n_words)
        pairs[ri] = [p for w in range(n_words)
                     for p in _asm4(ptx, [vector.extract(words, dynamic_position=[], static_position=[w])])]
    return pairs


def _word_slices(fa) -> dict:
    """The 32-bit words the 2-code registers of fa (4-bit, WGMMA layout) were sliced from: {source word: {pair
    p: register index}} (pair p = the slice at offset 2p); NotImplementedError for registers made otherwise."""
    import numpy as np
    from jax.experimental.mosaic.gpu import utils
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import vector

    words: dict = {}
    for idx, reg in np.ndenumerate(fa.registers):
        op = getattr(reg.owner, "opview", None)
        if (not isinstance(op, vector.ExtractStridedSliceOp) or utils.bitwidth(op.source.type) != 32
                or ir.VectorType(reg.type).shape != [2] or op.strides[0].value != 1):
            raise NotImplementedError(f"fp4_mgpu: expected registers of 2 codes sliced from 32-bit words; "
                                      f"got {reg.type} from {reg.owner}")
        words.setdefault(op.source, {})[op.offsets[0].value // 2] = idx
    return words


def _decode_scaled(codes, scale_ref, fmt_kind: str):
    """int4 codes [64, 128] as loaded (Mosaic's 4-bit upcast layout) and scale_ref, this warpgroup's [64,
    GROUP // G] block scale bytes of the step (a shared-memory slice, rows 16 bytes apart) -> the scaled
    E2M1 values as bf16 [64, 128] (WGMMA layout), exact. After the relayout to WGMMA, done here, the registers
    hold 2 codes each (registers index 1: the tile's 8-column block; the rest: as in a [64, 8] array), each a
    slice of a 32-bit word of 8 codes; every word is decoded by one _word_ptx block. Decoding the words
    themselves matters: rebuilding them from the 2-code registers cost more than the decode (H200, run 83)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    layout = plgpu.Layout.WGMMA
    group = GROUPS[fmt_kind]

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA_UPCAST_4X, plgpu.RefType()),
                       return_type=plgpu.ShapeDtypeStruct(codes.shape, jnp.bfloat16, layout=layout))
    def decode(_ctx, loaded, scales_smem):
        import numpy as np
        from jax.experimental.mosaic.gpu import fragmented_array as mfa
        from jax.experimental.mosaic.gpu import utils
        from jaxlib.mlir import ir

        fa = loaded.to_layout(mfa.WGMMA_LAYOUT)           # here, so that its registers still show their words
        scale_pairs = _thread_scale_pairs(scales_smem, fmt_kind)
        blocks = len(next(iter(scale_pairs.values())))
        if fa.registers.shape[1] != blocks * group // 8:
            raise NotImplementedError(f"fp4_mgpu: expected {group // 8} 8-column blocks per scale; got "
                                      f"{fa.registers.shape} registers and {blocks} scales")
        i32 = ir.IntegerType.get_signless(32)
        pair_ty = ir.VectorType.get((2,), ir.BF16Type.get())
        ptx, tables = _word_ptx(), [_i32(v) for v in BF16_LOW_TABLE + BF16_HIGH_TABLES[fmt_kind]]
        out = np.empty_like(fa.registers)
        for source, parts in _word_slices(fa).items():
            first = next(iter(parts.values()))            # a scale for pairs the word's registers do not use
            scales = [scale_pairs[(i[0], 0, *i[2:])][i[1] // (group // 8)]
                      for i in (parts.get(p, first) for p in range(4))]
            pairs = _asm4(ptx, [utils.bitcast(source, i32), *scales, *tables])
            for part, idx in parts.items():
                out[idx] = utils.bitcast(pairs[part], pair_ty)
        return mfa.FragmentedArray(_registers=out, _layout=fa.layout, _is_signed=None)

    return decode(codes, scale_ref)


def _fp4_step(wg, _scratch, kb, *refs, flip: bool, fmt_kind: str, sub_steps: int = 1):
    """One pipeline step kb of a compute warpgroup, sub_steps 128-K sub-steps (module docstring): every
    sub-step's tile decoded and scaled, then one wgmma each. refs: the sub-steps' x tiles, their code tiles,
    the scale block (max(SCALE_STEPS, sub_steps) K-steps per channel), the accumulator ref. flip is the int4
    launcher's flag for INT4 codes and does not apply to E2M1 (the int4 view's bits are the codes as they are)."""
    del flip
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    x_smems, w_smems = refs[:sub_steps], refs[sub_steps:2 * sub_steps]
    s_smem, acc_ref = refs[2 * sub_steps:]
    channels = pl.ds(wg * WG_CHANNELS, WG_CHANNELS)
    per_step = GROUP // GROUPS[fmt_kind]                # scale bytes per channel per 128-K step
    tiles = []
    for h, w_smem in enumerate(w_smems):
        codes = plgpu.load(w_smem.at[channels], (), layout=plgpu.Layout.WGMMA_UPCAST_4X)
        first = lax.rem(kb * sub_steps + h, max(SCALE_STEPS[fmt_kind], sub_steps)) * per_step
        tiles.append(_decode_scaled(codes, s_smem.at[channels, pl.ds(first, per_step)], fmt_kind))
    for a, x_smem in zip(tiles, x_smems):
        plgpu.wgmma(acc_ref, a, x_smem.T)
    plgpu.wgmma_wait(0)
    return acc_ref


def _check(fn: str, fmt_kind: str, x, packed, scale, cfg: MgpuW4Config):
    m, k = x.shape
    n = packed.shape[0]
    group = GROUPS[fmt_kind]
    scale_dtype = jnp.float8_e4m3fn if fmt_kind == "nvfp4" else jnp.uint8
    if (x.dtype != jnp.bfloat16 or packed.dtype != jnp.uint8 or packed.shape != (n, k // 2)
            or scale.shape != (n, k // group) or scale.dtype != scale_dtype or not can_use(fmt_kind, m, n, k, cfg)):
        raise ValueError(f"{fn}: x {x.shape} {x.dtype}, packed {packed.shape} {packed.dtype}, scale {scale.shape} "
                         f"{scale.dtype} do not fit {cfg} (needs bf16 x (M, K), uint8 packed (N, K/2), "
                         f"{jnp.dtype(scale_dtype)} scale (N, K/{group}), K % 128 == 0, N % 128 == 0, K / 128 / "
                         f"split_k a multiple of {SCALE_STEPS[fmt_kind]} when split, K % (128 * split_k * "
                         "sub_steps) == 0, wg_channels 64)")


def _launch(fmt_kind: str, x, packed, scale, cfg: MgpuW4Config, out_scale=None):
    step = functools.partial(_fp4_step, fmt_kind=fmt_kind, sub_steps=cfg.sub_steps)
    return w4a16_mgpu.launch_swap_ab(x, [packed], [[kernel_scales(scale)]], cfg, step, acc_in_ref=True,
                                     scale_steps=SCALE_STEPS[fmt_kind], out_scale=out_scale)


@functools.partial(jax.jit, static_argnames=("config",))
def nvfp4_matmul_mgpu(x, packed, block_scale, global_scale, *, config: MgpuW4Config = w4a16_mgpu.DEFAULT):
    """y [M, N] bf16 = ((x @ (e2m1 * block_scale)^T) in f32 * global_scale), rounded once."""
    _check("nvfp4_matmul_mgpu", "nvfp4", x, packed, block_scale, config)
    if jnp.size(global_scale) != 1:
        raise ValueError(f"nvfp4_matmul_mgpu: global_scale must be a scalar, got shape {jnp.shape(global_scale)}")
    return _launch("nvfp4", x, packed, block_scale, config, out_scale=global_scale)


@functools.partial(jax.jit, static_argnames=("config",))
def mxfp4_matmul_mgpu(x, packed, scale, *, config: MgpuW4Config = w4a16_mgpu.DEFAULT):
    """y [M, N] bf16 = x @ (e2m1 * 2^(scale - 127))^T, f32 sums rounded once."""
    _check("mxfp4_matmul_mgpu", "mxfp4", x, packed, scale, config)
    return _launch("mxfp4", x, packed, scale, config)
