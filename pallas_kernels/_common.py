"""Helpers shared by the GEMM kernels: Triton compiler params, tiling arithmetic, nibble unpacking,
and the activation-quantization functions whose numerics the kernels and references share."""
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

E4M3_MAX = 448.0
# Hopper SXM (H100/H200) multiprocessors: the split-K heuristics aim for a few programs per SM.
NUM_SMS = 132


def triton_params(num_warps: int, num_stages: int) -> pltriton.CompilerParams:
    """Selects the Triton lowering (without compiler params a GPU pallas_call goes to Mosaic GPU)."""
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def call_split_k(kernel, args, *, m: int, n: int, block_m: int, block_n: int, split: int, out_dtype,
                 num_warps: int, num_stages: int, interpret: bool, name: str) -> jax.Array:
    """Launches a Triton-lowered GEMM kernel on the grid (M tiles, N tiles, split) and returns y [m, n] in
    out_dtype: the kernel writes y itself when split == 1, else f32 partials [split, m, n] (program_id(2)
    the split) that one XLA fusion sums and casts."""
    out_shape = (jax.ShapeDtypeStruct((m, n), out_dtype) if split == 1
                 else jax.ShapeDtypeStruct((split, m, n), jnp.float32))
    y = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(cdiv(m, block_m), cdiv(n, block_n), split),
        compiler_params=triton_params(num_warps, num_stages),
        interpret=interpret,
        name=name,
    )(*args)
    return y if split == 1 else jnp.sum(y, axis=0).astype(out_dtype)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def is_pow2(v: int) -> bool:
    return v >= 1 and (v & (v - 1)) == 0


def pow2_ceil(v: int) -> int:
    return 1 << max(int(math.ceil(math.log2(max(v, 1)))), 0)


def unpack_nibbles(packed: jax.Array) -> jax.Array:
    """uint8 [..., K/2] -> uint8 codes [..., K]; the low nibble holds the even k (the canonical layout).
    Written as a bitcast to uint4 (low nibble first): XLA turns it into one vectorized shift-and-mask
    fusion, which streamed the weights faster on an H100 than a stack of the two nibble planes."""
    codes = lax.bitcast_convert_type(packed, jnp.uint4).astype(jnp.uint8)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def pack_nibbles(codes: jax.Array) -> jax.Array:
    """uint8 codes [..., K] in [0, 15] -> uint8 [..., K/2], low nibble = even k."""
    pairs = codes.astype(jnp.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def cast_e4m3_saturating(v: jax.Array) -> jax.Array:
    """f32 -> float8_e4m3fn, round to nearest even, clipped to +-448 (ml_dtypes casts overflow to NaN).
    An optimization barrier keeps the rounding: XLA on GPU folds convert(convert(x, e4m3), bf16) into one
    convert (measured on an H100: 1257 distinct values came out of an e4m3 cast widened to bf16), which
    would hand unquantized activations to a widened-FP8 path such as W4A8's dequantise-then-dot."""
    return jax.lax.optimization_barrier(jnp.clip(v, -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn))


def quantize_fp8_static(x: jax.Array, input_scale: jax.Array) -> jax.Array:
    """Static per-tensor FP8 activations: x_q = e4m3_sat(x / input_scale), computed in f32."""
    return cast_e4m3_saturating(x.astype(jnp.float32) / jnp.asarray(input_scale, jnp.float32))


def fma(a: jax.Array, b: jax.Array, c: jax.Array, *, native: bool) -> jax.Array:
    """f32 a * b + c, broadcast. native (a Triton-lowered kernel): one fma.rn.f32 per element, rounded once.
    Pallas' Triton lowering emits a separate multiply and add for `a * b + c` and nothing contracts them
    (Nsight Compute found FMUL + FADD and no FFMA in the word GEMV, session 14), so the kernels that are
    issue-bound ask for the FMA explicitly. Not native (interpret mode, which cannot run PTX): a * b + c."""
    shape = jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b), jnp.shape(c))
    a, b, c = (jnp.broadcast_to(jnp.asarray(v, jnp.float32), shape) for v in (a, b, c))
    if not native:
        return a * b + c
    [out] = pltriton.elementwise_inline_asm("fma.rn.f32 $0, $1, $2, $3;", args=[a, b, c], constraints="=f,f,f,f",
                                            pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(shape, jnp.float32)])
    return out


def prmt(a, b, selector, *, native: bool) -> jax.Array:
    """PTX prmt.b32 in its default mode on int32 operands, broadcast: output byte i is byte s & 7 of the eight
    bytes {b, a} (a's bytes 0-3, b's 4-7), s the selector's nibble i (only its low 16 bits count); s & 8
    replicates that byte's top bit over the output byte (0x00 or 0xFF). native (a Triton-lowered kernel):
    one PRMT per element; else the same in jnp (interpret mode)."""
    shape = jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b), jnp.shape(selector))
    a, b, c = (jnp.broadcast_to(jnp.asarray(v, jnp.int32), shape) for v in (a, b, selector))
    if native:
        [out] = pltriton.elementwise_inline_asm("prmt.b32 $0, $1, $2, $3;", args=[a, b, c], constraints="=r,r,r,r",
                                                pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(shape, jnp.int32)])
        return out
    out = jnp.zeros(shape, jnp.int32)
    for i in range(4):
        s = lax.shift_right_logical(c, jnp.int32(4 * i)) & 0xF
        source = jnp.where((s & 4) != 0, b, a)
        byte = lax.shift_right_logical(source, (s & 3) * 8) & 0xFF
        byte = jnp.where((s & 8) != 0, jnp.where((byte & 0x80) != 0, 0xFF, 0), byte)
        out = out | (byte << (8 * i))
    return out


def f16_half_to_f32(words, half: int, *, native: bool) -> jax.Array:
    """The float16 in bits 16 * half .. 16 * half + 15 of each int32 word, as f32 (exact). native: one
    cvt.f32.f16 per element (the half read as a register half, no shift); else jnp."""
    if native:
        asm = ("{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $1; cvt.f32.f16 $0, %s; }" % ("hi" if half else "lo"))
        [out] = pltriton.elementwise_inline_asm(asm, args=[words], constraints="=f,r", pack=1,
                                                result_shape_dtypes=[jax.ShapeDtypeStruct(words.shape, jnp.float32)])
        return out
    bits = (lax.shift_right_logical(words, jnp.int32(16 * half)) & 0xFFFF).astype(jnp.uint16)
    return lax.bitcast_convert_type(bits, jnp.float16).astype(jnp.float32)


def split_even_odd(x: jax.Array) -> jax.Array:
    """x [M, K] -> [2, M, K/2]: x[:, 0::2] then x[:, 1::2], the operands of the low and high nibbles."""
    m, k = x.shape
    return jnp.moveaxis(x.reshape(m, k // 2, 2), -1, 0)


def masked_load(ref, idx, mask):
    """ref[idx] where mask is None (the tile is known to be in bounds), else a load that reads zeros
    where mask is False."""
    if mask is None:
        return ref[idx]
    return pltriton.load(ref.at[idx], mask=mask, other=jnp.zeros((), ref.dtype))


def masked_store(ref, idx, value, mask):
    if mask is None:
        ref[idx] = value
    else:
        pltriton.store(ref.at[idx], value, mask=mask)


def range_mask(start, size: int, limit: int, needed: bool):
    """Bool [size]: start + i < limit, or None when the caller proved the range is in bounds."""
    if not needed:
        return None
    return start + jnp.arange(size) < limit


def and_masks(a, b):
    """Outer AND of two optional [p] and [q] masks -> optional [p, q]."""
    if a is None and b is None:
        return None
    if a is None:
        return b[None, :]
    if b is None:
        return a[:, None]
    return a[:, None] & b[None, :]


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [P, R] . b [Q, R]^T -> f32 [P, Q] (both operands K-contiguous: the layout fp8 wgmma wants)."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def multiple_of(v, m: int):
    return pl.multiple_of(v, m) if isinstance(v, jax.Array) else v


def k_loop(load, accumulate, first_chunk, chunks: int, unroll: int, acc, prefetch: bool = False):
    """The K loop of a split-K program: `chunks` chunks from `first_chunk` (a multiple of unroll), `unroll`
    chunks per iteration with all their loads issued before their math (memory-level parallelism where
    Triton's pipeliner does not apply). load(chunk) -> tile; accumulate(acc, tile) -> acc. prefetch: the
    loop carries the next iteration's tiles, loaded before this iteration's math (a register double
    buffer: a load is in flight while the program computes; the last iteration reloads its own chunks)."""
    def loads(i, clamp: bool = False):
        ids = [first_chunk + i * unroll + u for u in range(unroll)]
        return [load(jnp.minimum(c, first_chunk + chunks - 1) if clamp else c) for c in ids]

    def accumulate_all(acc, tiles):
        for t in tiles:
            acc = accumulate(acc, t)
        return acc

    if not prefetch:
        return lax.fori_loop(0, chunks // unroll, lambda i, acc: accumulate_all(acc, loads(i)), acc)

    def body(i, carry):
        acc, tiles = carry
        ahead = loads(i + 1, clamp=True)
        return accumulate_all(acc, tiles), ahead

    return lax.fori_loop(0, chunks // unroll, body, (acc, loads(0)))[0]
