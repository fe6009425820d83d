"""FP4 weights (NVFP4, MXFP4) x bf16 activations at M=1 (decode): y[N] = x[K] . W[N, K]^T on the CUDA
cores, the int32-word GEMV of w4a16_gemv.py with an E2M1 decoder and 16/32-element block scales.

Contract (weight layouts as fp4.py defines them; code = sign * 8 + idx into {0, .5, 1, 1.5, 2, 3, 4, 6}):
  nvfp4_gemv: packed u8 [N, K/2] (low nibble = even k), block_scale float8_e4m3fn [N, K/16], global_scale
              f32 scalar; W = e2m1(code) * f32(block_scale[n, k // 16]) * global_scale.
  mxfp4_gemv: packed u8 [N, K/2], scale u8 E8M0 [N, K/32]; W = e2m1(code) * 2^(scale[n, k // 32] - 127).
              2^(u - 127) is built from exponent bits: valid for u in [1, 248] (the limit fp4.py states);
              E8M0 NaN (255) is not special-cased.
  x [1, K]; y [1, N] in x.dtype. The caller (dispatch) has checked shape_is_supported and, for a given
  config, config_is_valid; the wrappers still refuse mismatched operand shapes with a ValueError.

Layout (as w4a16_gemv): the packed bytes are read as little-endian int32 words [N, K/8], nibble j of word
i being k = 8i + j. A program holds words [bn, bk/8] and the x chunk [bk] de-interleaved into x[8i + j]
per j, and keeps one f32 accumulator per word column, reduced once after the K loop. Split-K programs
write f32 partials [split_k, N] that one XLA fusion sums and casts.

Decode (byte permutes, PTX prmt via cm.prmt): the E2M1 magnitudes are looked up as float16 top bytes (the
low byte is 0) in an 8-byte table held in two registers (a kernel input), the signs merged in, and halves
widened to f32 (cvt.f32.f16):
  idx = word & 0x77777777; mag = prmt(table, idx) per 4 nibbles  byte i: f16 top byte of |e2m1(nibble i)|
  sign = prmt(word << 4, word) per 4 nibbles                     byte i's top bit: nibble i's sign bit
  top = mag | sign & 0x80808080;  pair = prmt(top, mag)          two f16 (low bytes from mag's clear top
                                                                  bits, replicated: 0x00) per register
so w = e2m1(code) exactly, for about 21 integer / convert instructions per word of 8 weights, then the FMAs
with x (explicit, cm.fma: Pallas would emit separate multiplies and adds). Per word column
t[n, i] = sum_j w[n, 8i + j] * x[8i + j] (8 FMAs), and acc[n, i] += s[n, i] * t[n, i] (an FMA) with the
word's block scale (NVFP4: f32(e4m3), one per 2 words; MXFP4: f32 bits u << 23 = 2^(u - 127), one per 4
words). Measured on an H200 (gemm_probe, run 69, device us) against the integer bit decode it
replaced (about 48 instructions per word): NVFP4 8b.gate_up 31.8 vs 42.3, 8b.down 19.1 vs 25.4, 70b.gate_up
113.8 vs 155.9; MXFP4 28.6 vs 40.2, 17.7 vs 24.4, 103.4 vs 147.7.

Numerics: the decoded values and their products with x are exact in f32 (E2M1 has 2 significant bits,
bf16 8), as are e2m1 x block scale (<= 6 bits, fp4.py); everything else accumulates in f32, in another
order than the reference (8 products per word, times the word's scale, summed over word columns at the
end), and the output is rounded to x.dtype once (split-K: each program scales its f32 partial, XLA sums
them and rounds once). Tolerance used by tests/pallas_kernels/test_fp4_gemv.py:
|y - ref| <= 1e-2 * |ref| + 1e-2 * rms(ref).
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _common as cm
from pallas_kernels import w4a16_gemv
from pallas_kernels.w4a16_gemv import WORD, GemvConfig

GROUPS = {"nvfp4": 16, "mxfp4": 32}                    # K elements per block scale
# float16 top bytes of the E2M1 magnitudes 0, .5, 1, 1.5 (bytes 0-3) and 2, 3, 4, 6 (bytes 4-7): prmt's table.
_F16_TOP_TABLE = (0x3E3C3800, 0x46444240)
# prmt selectors: nibble i's sign bit to byte i's top bit, from {word << 4, word}, for nibbles 0-3 and 4-7.
SIGN_SELECTORS = (0x5140, 0x7362)
# prmt selectors: f16 pairs (nibbles 2q, 2q + 1 of four) from {top, mag}, low bytes 0x00.
_PAIR_SELECTORS = (0x1C0C, 0x3C2C)
BYTE_TOP_BITS = -0x7F7F7F80                            # 0x80808080 as int32


def _group(fmt_kind: str) -> int:
    if fmt_kind not in GROUPS:
        raise ValueError(f"fp4_gemv: unknown format {fmt_kind!r}, expected one of {sorted(GROUPS)}")
    return GROUPS[fmt_kind]


def config_is_valid(fmt_kind: str, cfg: GemvConfig) -> bool:
    """Block sizes and unroll powers of two, block_k >= 32 (every chunk spans whole 16/32 blocks), split_k
    any count >= 1 (as w4a16_gemv's)."""
    _group(fmt_kind)
    sizes = (cfg.block_n, cfg.block_k, cfg.unroll)
    return all(cm.is_pow2(v) for v in sizes) and cfg.block_k >= 32 and cfg.split_k >= 1


def shape_is_supported(fmt_kind: str, m: int, n: int, k: int) -> bool:
    """M = 1 and K a positive multiple of the block (16 NVFP4, 32 MXFP4; whole int32 words either way)."""
    group = _group(fmt_kind)
    return m == 1 and n >= 1 and k >= group and k % group == 0 and k % WORD == 0


def default_config(n: int, k: int) -> GemvConfig:
    """Heuristic (either format): the word GEMV's, 32 channels and 256 K per program, split K until the
    grid holds about four programs per SM (256 spans whole 16 and 32 blocks)."""
    return w4a16_gemv.default_config(n, k, GROUPS["mxfp4"])


def e2m1_by_table(words, table, native: bool) -> list:
    """The 8 E2M1 values of every int32 word as exact f32, nibble j at index j (the decode in the module
    docstring); table: the traced _F16_TOP_TABLE words (register-held)."""
    idx = words & 0x77777777
    moved = words << 4
    values = []
    for quad in range(2):                                # nibbles 0-3, then 4-7
        selector = lax.shift_right_logical(idx, jnp.int32(16)) if quad else idx
        mag = cm.prmt(table[0], table[1], selector, native=native)
        sign = cm.prmt(moved, words, SIGN_SELECTORS[quad], native=native)
        top = mag | (sign & BYTE_TOP_BITS)
        for pair_selector in _PAIR_SELECTORS:
            pair = cm.prmt(top, mag, pair_selector, native=native)
            values += [cm.f16_half_to_f32(pair, 0, native=native), cm.f16_half_to_f32(pair, 1, native=native)]
    return values


def _block_scale_f32(fmt_kind: str, raw):
    """Raw block scales -> f32: e4m3 converted, E8M0 u as the f32 bits u << 23 (2^(u - 127)). Applied once per
    scale, before the broadcast to word columns (run 73, H200 device us, NVFP4 after / before: 8b.gate_up
    31.2 / 32.1, 8b.down 18.4 / 19.1, 70b.down 61.9 / 64.0; MXFP4 within 1 %; W4A16's bf16 scales, converted
    after the broadcast, lost up to 6 % the same way, so they stay as they are)."""
    if fmt_kind == "nvfp4":
        return raw.astype(jnp.float32)
    return lax.bitcast_convert_type(raw.astype(jnp.int32) << 23, jnp.float32)


def fp4_gemv_kernel(*refs, fmt_kind: str, cfg: GemvConfig, n: int, k: int, native: bool):
    """refs: x [1, K], table int32 [2] (_F16_TOP_TABLE), words [N, K/8] int32, scale [N, K/group] (e4m3 or
    u8), global [1] f32 (nvfp4 only), out [1, N] (split_k 1) or f32 [split_k, N]. native: inline PTX (a
    Triton-lowered kernel), else its jnp emulation (interpret mode)."""
    x_ref, table_ref, w_ref, s_ref, *rest = refs
    g_ref = rest.pop(0) if fmt_kind == "nvfp4" else None
    (o_ref,) = rest
    table = (table_ref[0], table_ref[1])

    def word_dot(w, xs, g, acc):
        values = e2m1_by_table(w, table, native)
        dot = values[0] * xs[0][None, :]
        for j in range(1, WORD):
            dot = cm.fma(values[j], xs[j][None, :], dot, native=native)
        return cm.fma(g["s"], dot, acc, native=native)

    post = g_ref[0] if g_ref is not None else None
    w4a16_gemv.word_gemv_program(x_ref, w_ref, {"s": s_ref}, o_ref, cfg=cfg, n=n, k=k, group=GROUPS[fmt_kind],
                                 word_dot=word_dot, post=post,
                                 group_f32=functools.partial(_block_scale_f32, fmt_kind))


def _check_operands(fn: str, x, packed, scale, scale_name: str, scale_dtype, group: int, global_scale=None):
    """ValueError naming the argument, what was expected and what came, for mismatched operands."""
    if x.ndim != 2 or x.shape[0] != 1:
        raise ValueError(f"{fn}: x must have shape (1, K), got {tuple(x.shape)}")
    k = x.shape[1]
    if k % group != 0:
        raise ValueError(f"{fn}: K = {k} (x {tuple(x.shape)}) must be a multiple of {group}")
    if packed.ndim != 2 or packed.shape[1] * 2 != k:
        raise ValueError(f"{fn}: packed must have shape (N, K/2) = (N, {k // 2}) for x {tuple(x.shape)}, "
                         f"got {tuple(packed.shape)}")
    if packed.dtype != jnp.uint8:
        raise ValueError(f"{fn}: packed must be uint8, got {packed.dtype}")
    want = (packed.shape[0], k // group)
    if tuple(scale.shape) != want:
        raise ValueError(f"{fn}: {scale_name} must have shape (N, K/{group}) = {want} for packed "
                         f"{tuple(packed.shape)} and x {tuple(x.shape)}, got {tuple(scale.shape)}")
    if scale.dtype != scale_dtype:
        raise ValueError(f"{fn}: {scale_name} must be {jnp.dtype(scale_dtype)}, got {scale.dtype}")
    if global_scale is not None and jnp.size(global_scale) != 1:
        raise ValueError(f"{fn}: global_scale must be a scalar, got shape {tuple(jnp.shape(global_scale))}")


def _fp4_gemv(fmt_kind: str, x, packed, scale, global_scale, cfg: GemvConfig | None, interpret: bool):
    k = x.shape[1]
    n = packed.shape[0]
    cfg = cfg or default_config(n, k)
    args = [x, jnp.array(_F16_TOP_TABLE, jnp.int32), w4a16_gemv.as_words(packed), scale]
    if fmt_kind == "nvfp4":
        args.append(jnp.reshape(global_scale, (1,)).astype(jnp.float32))
    kernel = functools.partial(fp4_gemv_kernel, fmt_kind=fmt_kind, cfg=cfg, n=n, k=k, native=not interpret)
    return w4a16_gemv.call_word_gemv(kernel, args, x.dtype, n, cfg, interpret, f"{fmt_kind}_gemv")


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def nvfp4_gemv(x, packed, block_scale, global_scale, *, config: GemvConfig | None = None,
               interpret: bool = False):
    """y [1, N] = x [1, K] @ W^T in x.dtype for NVFP4 weights (packed u8 [N, K/2], block_scale e4m3
    [N, K/16], global_scale f32 scalar)."""
    _check_operands("nvfp4_gemv", x, packed, block_scale, "block_scale", jnp.float8_e4m3fn, 16, global_scale)
    return _fp4_gemv("nvfp4", x, packed, block_scale, global_scale, config, interpret)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def mxfp4_gemv(x, packed, scale, *, config: GemvConfig | None = None, interpret: bool = False):
    """y [1, N] = x [1, K] @ W^T in x.dtype for MXFP4 weights (packed u8 [N, K/2], scale u8 E8M0 [N, K/32])."""
    _check_operands("mxfp4_gemv", x, packed, scale, "scale", jnp.uint8, 32)
    return _fp4_gemv("mxfp4", x, packed, scale, None, config, interpret)
