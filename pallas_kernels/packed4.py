"""The one GEMM skeleton behind every packed 4-bit weight format: y[M, N] = x[M, K] @ W[N, K]^T.

W arrives as uint8 [N, K/2] (low nibble = even k, the canonical layout of jaxq.formats), with per-group
scales along K. Formats plug in a decoder (W4A16 INT4, NVFP4, MXFP4, W4A8 with INT4 or FP4 weights); the
tiling, split-K and masking live here once.

Shape of the computation (swap-AB: the weights are the MMA's M side, so M=1 still fills a 64-row wgmma
and the freshly decoded weights can stay in registers as its A operand):
  program (pm, pn, ps) owns out rows [pm*bm, +bm), columns [pn*bn, +bn), and K chunks
  [ps*per_split, +per_split) of bk elements each;
  per chunk: bytes [bn, bk/2] -> lo nibbles (even k) and hi nibbles (odd k), each [bn, bk/2];
             x chunk [bm, bk] -> even and odd columns, each [bm, bk/2];
             acc[bn, bm] += dot(lo, x_even^T) + dot(hi, x_odd^T), with the format's scaling.
  split_k > 1 writes f32 partials [split_k, M, N] that one XLA fusion sums and casts.

Three scaling modes:
  * post-scale (INT4 formats): one group covers the whole chunk (group % bk == 0), the weights enter the
    MMA as exact small integers (plus a constant offset c that the decoder's bit trick leaves in), and
    acc += s[n] * (dot - c[n] * sum_k x[m, k]) per chunk: one FMA per output per group, not per weight.
  * pre-scale (FP4 formats, 16/32-element blocks): decoded values times their block scale are exact in
    bf16 (E2M1 x E4M3/E8M0 has at most 6 significant bits), so the scaled weights enter the MMA directly.
  * block-MMA (FP4 weights x FP8 activations, Packed4Format.block_mma): a scaled E2M1 value does not fit
    E4M3 (4 significant bits), so the codes enter the FP8 MMA unscaled (E2M1 values are exact in E4M3:
    integer ops build the bits) and each block's partial product is scaled in the f32 accumulator. The
    chunk is decoded in natural k order ([bn, bk], both nibbles interleaved back; x is read unsplit) and
    cut into 32-element pieces, the minimum FP8 MMA depth: acc += s_b * dot(W_b, x_b^T) per piece.
    MXFP4 (32-blocks): one MMA per block. NVFP4 (16-blocks, below the MMA depth): one MMA per block as
    well, each over its piece's 32 lanes with x zeroed on the other block's 16 lanes. A product with a
    zeroed x is exactly 0 and adding an exact 0 changes no partial sum, so each MMA returns what a
    16-deep MMA over its block alone would: the block's products (E4M3 x E2M1: <= 6 significant bits,
    exact) summed in f32, then multiplied by that block's scale once, in f32. The cost is two MMAs per
    32 K elements instead of one, plus selects on bm x 32 activations (fewer than the bn x 32 decoded
    weights); not yet timed on a GPU. At bm = 1 (no MMA) the products are summed per block directly.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _common as cm

FP8_MMA_DEPTH = 32  # K elements of the smallest FP8 MMA (wgmma k32)


@dataclasses.dataclass(frozen=True)
class Packed4Config:
    """Static tuning knobs of `packed4_matmul` (all block sizes powers of two).

    block_m: activation rows per program (the MMA's N side, >= 16); 1 selects the GEMV path for M=1:
      no MMA, products and a row reduction on the CUDA cores (fewer registers, more programs per SM).
    block_n: output channels per program (the MMA's M side, >= 16; 64 fills one warpgroup's wgmma).
    block_k: K elements per chunk; INT4 formats need group % block_k == 0, FP4 block_k % block == 0;
      block_k/2 >= 16 for bf16 and >= 32 for fp8 activations (minimum MMA depth; block-MMA formats
      run 32-deep MMAs in natural k order and need block_k >= 32).
    split_k: programs along K (split-K, so all SMs stay busy when M and N are small).
    presplit_x: split x into even/odd columns once in XLA ([2, M, K/2]) instead of in every program;
      pays at large M, where the in-kernel split would touch as many x elements as weights. Ignored by
      block-MMA formats (they read x in natural k order), so one tile table serves every format.
    num_warps, num_stages: Triton's warps per program and software-pipelining depth.
    unroll: K chunks per loop iteration, all their loads issued before their math (memory-level
      parallelism where Triton's pipeliner does not apply, e.g. the GEMV path).
    """

    block_m: int = 16
    block_n: int = 128
    block_k: int = 128
    split_k: int = 1
    presplit_x: bool = False
    num_warps: int = 4
    num_stages: int = 3
    unroll: int = 1


@dataclasses.dataclass(frozen=True)
class Packed4Format:
    """Static description of one weight format.

    kind: 'int4' (codes u, value (u - zero) * scale, zero 8 when symmetric), 'nvfp4' (E2M1 x E4M3 block
      scale) or 'mxfp4' (E2M1 x E8M0 block scale).
    group: K elements per scale.
    act: dtype the MMA runs in: 'bf16' or 'fp8' (x given as float8_e4m3fn; with an FP4 kind: block-MMA).
    asym: INT4 with an explicit zero tensor [N, K/group].
    has_global: a f32 [1] scalar multiplies the result (NVFP4 global scale, W4A8 input scale, or their
      product).
    """

    kind: str
    group: int
    act: str = "bf16"
    asym: bool = False
    has_global: bool = False

    @property
    def post_scale(self) -> bool:
        return self.kind == "int4"

    @property
    def block_mma(self) -> bool:
        """FP4 weights on the FP8 MMA: one MMA per 32 K elements, block scales in the accumulator."""
        return self.kind != "int4" and self.act == "fp8"


def config_is_valid(fmt: Packed4Format, cfg: Packed4Config) -> bool:
    blocks = (cfg.block_m, cfg.block_n, cfg.block_k, cfg.split_k, cfg.unroll)
    if not all(cm.is_pow2(b) for b in blocks) or cfg.block_n < 16 or 1 < cfg.block_m < 16:
        return False
    if fmt.block_mma:                                   # bk a power of two, so a multiple of the block
        return cfg.block_k >= FP8_MMA_DEPTH
    min_depth = FP8_MMA_DEPTH if fmt.act == "fp8" else 16
    if cfg.block_k // 2 < min_depth:
        return False
    if fmt.post_scale:
        return fmt.group % cfg.block_k == 0
    return cfg.block_k % fmt.group == 0


def uses_presplit_x(fmt: Packed4Format, cfg: Packed4Config) -> bool:
    return cfg.presplit_x and not fmt.block_mma


def shape_is_supported(fmt: Packed4Format, m: int, n: int, k: int) -> bool:
    return m >= 1 and n >= 1 and k % fmt.group == 0 and k % 2 == 0 and cm.is_pow2(fmt.group)


def default_config(fmt: Packed4Format, m: int, n: int, k: int) -> Packed4Config:
    """Heuristic: bm the smallest MMA width covering M; bn 128; split K until the grid holds about
    two programs per SM; deeper pipelining when each program streams only weights."""
    bm = min(max(cm.pow2_ceil(m), 16), 128)
    bn = 128 if n >= 128 else max(cm.pow2_ceil(n), 16)
    bk = 128
    if fmt.post_scale:
        bk = min(bk, fmt.group)
    if fmt.act == "fp8":
        bk = max(bk, 64)
    chunks = cm.cdiv(k, bk)
    progs = cm.cdiv(m, bm) * cm.cdiv(n, bn)
    split = 1
    while progs * split < 2 * cm.NUM_SMS and split * 2 <= chunks // 4 and chunks % (split * 2) == 0:
        split *= 2
    warps = 4 if bm <= 64 else 8
    stages = 4 if bm <= 64 else 3
    return Packed4Config(bm, bn, bk, split, presplit_x=m > 64 and not fmt.block_mma, num_warps=warps,
                         num_stages=stages)


# ---------------------------------------------------------------------------------------------------
# Decoders: uint8 bytes [bn, bk/2] -> (lo, hi) MMA operands [bn, bk/2] for the even and odd k.


def _int4_offset_bf16(wb):
    """bf16 bits 0x4300 | u are exactly 128 + u: two integer ops per nibble, no int->float convert.
    The constant 128 is removed after the MMA through the x row sums."""
    w16 = wb.astype(jnp.int16)
    lo = lax.bitcast_convert_type((w16 & 0xF) | 0x4300, jnp.bfloat16)
    hi = lax.bitcast_convert_type((w16 >> 4) | 0x4300, jnp.bfloat16)
    return lo, hi


def _int4_signed_fp8(wb):
    """f16 bits 0x6400 | u are exactly 1024 + u; minus 1032 gives u - 8 in [-8, 7], exact in E4M3."""
    w16 = wb.astype(jnp.int16)

    def one(nib):
        v = lax.bitcast_convert_type(nib | 0x6400, jnp.float16) - jnp.float16(1032.0)
        return v.astype(jnp.float8_e4m3fn)

    return one(w16 & 0xF), one(w16 >> 4)


def _e2m1_as_e4m3_x64(codes):
    """E2M1 codes (uint8 in [0, 15]) -> float8_e4m3fn holding exactly code value * 2^-6.

    Placing the 3 magnitude bits as E4M3 bits ((c & 7) << 2, sign to bit 7) gives value * 2^-6,
    subnormals included (both formats have one mantissa bit for c's low bit): two integer ops, no table.
    The 2^6 is folded into the block scales (_block_scales_x64)."""
    bits = ((codes & 7) << 2) | ((codes & 8) << 4)
    return lax.bitcast_convert_type(bits, jnp.float8_e4m3fn)


def _e2m1_scaled_f32(codes, scale_x64):
    """E2M1 codes -> code value * scale, f32 (the hardware E4M3 -> f32 conversion does the decoding)."""
    return _e2m1_as_e4m3_x64(codes).astype(jnp.float32) * scale_x64


def _block_scales_x64(fmt, s_ref, n_rows, n_mask, chunk, bk, k, ragged):
    """Scales of K chunk `chunk` (one per block of fmt.group), times 64 (see _e2m1_as_e4m3_x64): f32 [bn, bk/group]."""
    per = bk // fmt.group                               # scales in the chunk
    s0 = chunk * per
    kmask = cm.range_mask(s0, per, k // fmt.group, ragged)
    raw = cm.masked_load(s_ref, (n_rows, pl.ds(s0, per)), cm.and_masks(n_mask, kmask))  # [bn, per]
    if fmt.kind == "nvfp4":                             # E4M3
        return raw.astype(jnp.float32) * 64.0
    return lax.bitcast_convert_type((raw.astype(jnp.int32) + 6) << 23, jnp.float32)  # E8M0 u: 2^(u-127) * 2^6


def _per_byte(s, group):
    """Block scales [bn, per] -> one per byte of the chunk, [bn, per * group / 2]."""
    bn, per = s.shape
    return jnp.broadcast_to(s[:, :, None], (bn, per, group // 2)).reshape(bn, per * (group // 2))


def _split_cols(a, parts: int):
    """a [r, c] -> `parts` consecutive column slices [r, c / parts] (parts a power of two)."""
    return (a,) if parts == 1 else lax.split(a, (a.shape[1] // parts,) * parts, axis=1)


def _block_mma(fmt, wb, xv, s):
    """sum_b s[:, b] * (W_b . x_b^T) over the blocks b of one chunk, f32 [bn, bm] (block-MMA mode, module
    docstring). wb: u8 [bn, bk/2]; xv: e4m3 [bm, bk] in natural k order; s: f32 [bn, bk/group]."""
    bn, bk = wb.shape[0], 2 * wb.shape[1]
    g = fmt.group
    codes = jnp.stack([wb & 0xF, wb >> 4], axis=-1).reshape(bn, bk)          # natural k order
    w = _e2m1_as_e4m3_x64(codes)                                               # e4m3 [bn, bk]
    if xv.shape[0] == 1:                       # no MMA: products, summed per block, scaled, summed
        p = w.astype(jnp.float32) * xv.astype(jnp.float32)                     # [bn, bk]
        sums = jnp.sum(p.reshape(bn, bk // g, g), axis=2)                      # [bn, blocks]
        return jnp.sum(sums * s, axis=1, keepdims=True)
    pieces = bk // FP8_MMA_DEPTH
    ws, xs, ss = _split_cols(w, pieces), _split_cols(xv, pieces), _split_cols(s, bk // g)
    per_piece = FP8_MMA_DEPTH // g                                             # 1 (MXFP4) or 2 (NVFP4)
    lane = jnp.arange(FP8_MMA_DEPTH)[None, :]
    zero = jnp.zeros((), xv.dtype)
    out = None
    for p in range(pieces):
        for j in range(per_piece):
            xb = xs[p] if per_piece == 1 else jnp.where((lane >= j * g) & (lane < (j + 1) * g), xs[p], zero)
            term = ss[p * per_piece + j] * cm.dot_nt(ws[p], xb)               # [bn, 1] * [bn, bm]
            out = term if out is None else out + term
    return out


def _mac(w, x):
    """w [bn, d] . x [bm, d]^T -> f32 [bn, bm]: the MMA, or for bm == 1 products and a row sum."""
    if x.shape[0] == 1:
        return jnp.sum(w.astype(jnp.float32) * x.astype(jnp.float32), axis=1, keepdims=True)
    return cm.dot_nt(w, x)


# ---------------------------------------------------------------------------------------------------


def packed4_matmul_kernel(*refs, fmt: Packed4Format, cfg: Packed4Config, m: int, n: int, k: int):
    """One program of the skeleton above.

    refs, in order:
      x_ref  [M, K] bf16 / e4m3, or [2, M, K/2] when uses_presplit_x (even columns, then odd)
      w_ref  [N, K/2] uint8
      s_ref  [N, K/group] scales (int4: any float; nvfp4: e4m3; mxfp4: uint8 E8M0, valid for u <= 248)
      z_ref  [N, K/group] zeros (only fmt.asym)
      g_ref  [1] f32 global multiplier (only fmt.has_global)
      o_ref  [M, N] out dtype, or [split_k, M, N] f32 partials when cfg.split_k > 1
    """
    x_ref, w_ref, s_ref, *rest = refs
    z_ref = rest.pop(0) if fmt.asym else None
    g_ref = rest.pop(0) if fmt.has_global else None
    (o_ref,) = rest
    bm, bn, bk, split, unroll = cfg.block_m, cfg.block_n, cfg.block_k, cfg.split_k, cfg.unroll
    pm, pn, ps = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    m0, n0 = pm * bm, pn * bn
    chunks = cm.cdiv(k, bk)
    per_split = cm.cdiv(cm.cdiv(chunks, split), unroll) * unroll   # chunks per split, whole iterations
    k_ragged = k % bk != 0 or chunks != per_split * split          # some chunk reaches past K
    m_mask = cm.range_mask(m0, bm, m, m % bm != 0)
    n_mask = cm.range_mask(n0, bn, n, n % bn != 0)
    n_rows = pl.ds(n0, bn)
    half = bk // 2
    presplit = uses_presplit_x(fmt, cfg)

    def load(chunk):
        """Every global load of one K chunk (issued for all unrolled chunks before any math)."""
        k0 = cm.multiple_of(chunk * bk, bk)
        kb0 = cm.multiple_of(chunk * half, half)
        kb_mask = cm.range_mask(kb0, half, k // 2, k_ragged)
        t = {"k0": k0, "chunk": chunk}
        t["wb"] = cm.masked_load(w_ref, (n_rows, pl.ds(kb0, half)), cm.and_masks(n_mask, kb_mask))  # u8 [bn, bk/2]
        x_mask = cm.and_masks(m_mask, kb_mask)
        if presplit:
            t["xe"] = cm.masked_load(x_ref, (jnp.int32(0), pl.ds(m0, bm), pl.ds(kb0, half)), x_mask)  # [bm, bk/2]
            t["xo"] = cm.masked_load(x_ref, (jnp.int32(1), pl.ds(m0, bm), pl.ds(kb0, half)), x_mask)  # [bm, bk/2]
        else:
            full_mask = cm.and_masks(m_mask, cm.range_mask(k0, bk, k, k_ragged))
            t["xv"] = cm.masked_load(x_ref, (pl.ds(m0, bm), pl.ds(k0, bk)), full_mask)               # [bm, bk]
        if fmt.post_scale:
            g = chunk // (fmt.group // bk)
            g_mask = n_mask
            if k_ragged:                                # a whole chunk past K: its group index is OOB
                ok = jnp.full((bn,), k0 < k)
                g_mask = ok if n_mask is None else n_mask & ok
            t["s"] = cm.masked_load(s_ref, (n_rows, g), g_mask)                                      # [bn]
            if fmt.asym:
                t["z"] = cm.masked_load(z_ref, (n_rows, g), g_mask)                                  # [bn]
        else:
            t["sc"] = _block_scales_x64(fmt, s_ref, n_rows, n_mask, chunk, bk, k, k_ragged)         # [bn, bk/G]
        return t

    def accumulate(acc, t):                             # acc: f32 [bn, bm]
        wb = t["wb"]
        if fmt.block_mma:
            return acc + _block_mma(fmt, wb, t["xv"], t["sc"])
        if presplit:
            xe, xo = t["xe"], t["xo"]
        else:
            xe, xo = jnp.unstack(t["xv"].reshape(bm, half, 2), axis=-1)              # [bm, bk/2] each
        if fmt.post_scale:
            lo, hi = _int4_signed_fp8(wb) if fmt.act == "fp8" else _int4_offset_bf16(wb)
            d = _mac(lo, xe) + _mac(hi, xo)                                           # [bn, bm]
            s = t["s"].astype(jnp.float32)[:, None]
            if fmt.act == "fp8":                        # exact u - 8: no offset to remove
                return acc + s * d
            xsum = jnp.sum(xe.astype(jnp.float32) + xo.astype(jnp.float32), axis=1)   # [bm]
            c = (128.0 + t["z"].astype(jnp.float32))[:, None] if fmt.asym else 136.0
            return acc + s * (d - c * xsum[None, :])
        sc = _per_byte(t["sc"], fmt.group)                                           # [bn, bk/2]
        lo = _e2m1_scaled_f32(wb & 0xF, sc).astype(jnp.bfloat16)
        hi = _e2m1_scaled_f32(wb >> 4, sc).astype(jnp.bfloat16)
        return acc + _mac(lo, xe) + _mac(hi, xo)

    acc = cm.k_loop(load, accumulate, ps * per_split, per_split, unroll, jnp.zeros((bn, bm), jnp.float32))
    if g_ref is not None:
        acc = acc * g_ref[0]
    out = acc.T.astype(o_ref.dtype)                     # [bm, bn]
    idx = (pl.ds(m0, bm), n_rows) if split == 1 else (ps, pl.ds(m0, bm), n_rows)
    cm.masked_store(o_ref, idx, out, cm.and_masks(m_mask, n_mask))


@functools.partial(jax.jit, static_argnames=("fmt", "config", "out_dtype", "interpret"))
def packed4_matmul(x, packed, scale, zero=None, global_scale=None, *, fmt: Packed4Format,
                   config: Packed4Config, out_dtype=jnp.bfloat16, interpret: bool = False):
    """y = x @ W^T for the packed 4-bit format `fmt`; inputs as in packed4_matmul_kernel (x unsplit).

    The caller (a format's wrapper) has checked shape_is_supported and config_is_valid."""
    m, k = x.shape
    n = packed.shape[0]
    cfg = config
    xin = cm.split_even_odd(x) if uses_presplit_x(fmt, cfg) else x
    args = [xin, packed, scale]
    if fmt.asym:
        args.append(zero)
    if fmt.has_global:
        args.append(jnp.reshape(global_scale, (1,)).astype(jnp.float32))
    kernel = functools.partial(packed4_matmul_kernel, fmt=fmt, cfg=cfg, m=m, n=n, k=k)
    return cm.call_split_k(kernel, args, m=m, n=n, block_m=cfg.block_m, block_n=cfg.block_n, split=cfg.split_k,
                           out_dtype=out_dtype, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                           interpret=interpret, name=f"packed4_{fmt.kind}_{fmt.act}")
