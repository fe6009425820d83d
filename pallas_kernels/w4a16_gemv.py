"""W4A16 at M=1 (decode): y[N] = x[K] . W[N, K]^T on the CUDA cores, reading the packed weights as int32
words, one accumulator element per word, reduced once at the end.

The canonical uint8 [N, K/2] bytes (low nibble = even k) are, read as little-endian int32 [N, K/8], words
whose nibble j (bits 4j..4j+3) is k = 8i + j; the wrapper only bitcasts them. Per K chunk of bk elements,
a program holds words [bn, bk/8] and the x chunk [bk], de-interleaved in registers into x[8i + j] per j:
  f32 bits 0x43000000 | (u << 16) are exactly 128 + u, so each nibble costs a shift and a mask-or, and
  t[n, i] = sum_j (128 + u[n, 8i+j]) * x[8i+j]            (8 FMAs per word, exact products)
  acc[n, i] += s[n, g] * (t[n, i] - c[n, g] * xs[i])      (xs[i] = sum_j x[8i+j]; c = 128 + zero, 136 sym)
There is no cross-thread reduction inside the loop: acc keeps one f32 per word column and is summed over
its columns once, after the last chunk. Split-K programs write f32 partials [split_k, N] that one XLA
fusion sums and casts.

Numerics as w4a16.py states (exact weights and products, f32 accumulation, one rounding to x.dtype; the
128 + u offset cancels to about 1e-6 relative). Tolerance: |y - ref| <= 1e-2 * |ref| + 1e-2 * rms(ref).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _common as cm

WORD = 8                                                # nibbles per int32 word


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """Static tuning knobs of `w4a16_gemv` (block sizes powers of two).

    block_n: output channels per program.
    block_k: K elements per chunk (a multiple of 8 words' worth, >= 32); chunks span whole groups or
      divide one: block_k % group == 0 or group % block_k == 0.
    split_k: programs along K.
    unroll: chunks whose loads are issued before their math, per loop iteration.
    num_warps, num_stages: Triton's warps per program and software-pipelining depth.
    """

    block_n: int = 32
    block_k: int = 256
    split_k: int = 1
    unroll: int = 1
    num_warps: int = 4
    num_stages: int = 3


def config_is_valid(group: int, cfg: GemvConfig) -> bool:
    sizes = (cfg.block_n, cfg.block_k, cfg.split_k, cfg.unroll)
    if not all(cm.is_pow2(v) for v in sizes) or cfg.block_k < 32:
        return False
    return cfg.block_k % group == 0 or group % cfg.block_k == 0


def shape_is_supported(m: int, n: int, k: int, group: int) -> bool:
    return m == 1 and n >= 1 and group >= 32 and cm.is_pow2(group) and k % group == 0


def default_config(n: int, k: int, group: int) -> GemvConfig:
    """Heuristic: 32 channels and 256 K per program (or one group when groups are larger); split K until
    the grid holds about four programs per SM."""
    bk = 256 if group <= 256 else group
    bn = 32 if n >= 32 else max(cm.pow2_ceil(n), 1)
    chunks = cm.cdiv(k, bk)
    progs = cm.cdiv(n, bn)
    split = 1
    while progs * split < 4 * cm.NUM_SMS and split * 2 <= chunks // 2 and chunks % (split * 2) == 0:
        split *= 2
    return GemvConfig(bn, bk, split)


def _nibble_plus_128(words, j: int):
    """f32 128 + u for nibble j of every int32 word (bits 16..19 of a 2^7-exponent float)."""
    shift = 16 - 4 * j
    moved = words << shift if shift >= 0 else lax.shift_right_logical(words, jnp.int32(-shift))
    return lax.bitcast_convert_type((moved & 0x000F0000) | 0x43000000, jnp.float32)


def _deinterleave(v, ways: int):
    """v [L] -> `ways` arrays [L / ways], the j-th holding v[ways * i + j] (halving splits: Triton splits
    a trailing axis of 2 in registers)."""
    if ways == 1:
        return [v]
    even, odd = jnp.unstack(v.reshape(v.shape[0] // 2, 2), axis=-1)
    lo, hi = _deinterleave(even, ways // 2), _deinterleave(odd, ways // 2)
    return [part for pair in zip(lo, hi) for part in pair]


def w4a16_gemv_kernel(*refs, cfg: GemvConfig, n: int, k: int, group: int, asym: bool):
    """refs: x [1, K] bf16, words [N, K/8] int32, scale [N, K/G], zero [N, K/G] (asym only),
    out [1, N] (split_k 1) or f32 [split_k, N]."""
    x_ref, w_ref, s_ref, *rest = refs
    z_ref = rest.pop(0) if asym else None
    (o_ref,) = rest
    bn, bk, split, unroll = cfg.block_n, cfg.block_k, cfg.split_k, cfg.unroll
    words = bk // WORD
    pn, ps = pl.program_id(0), pl.program_id(1)
    n0 = pn * bn
    chunks = cm.cdiv(k, bk)
    per_split = cm.cdiv(cm.cdiv(chunks, split), unroll) * unroll
    k_ragged = k % bk != 0 or chunks != per_split * split
    n_mask = cm.range_mask(n0, bn, n, n % bn != 0)
    n_rows = pl.ds(n0, bn)
    per_chunk = max(bk // group, 1)                     # groups in one chunk
    group_words = group // WORD

    def load(chunk):
        k0 = cm.multiple_of(chunk * bk, bk)
        i0 = cm.multiple_of(chunk * words, words)
        w_mask = cm.range_mask(i0, words, k // WORD, k_ragged)
        t = {"w": cm.masked_load(w_ref, (n_rows, pl.ds(i0, words)), cm.and_masks(n_mask, w_mask))}
        t["x"] = cm.masked_load(x_ref, (jnp.int32(0), pl.ds(k0, bk)), cm.range_mask(k0, bk, k, k_ragged))  # [bk]
        g0 = k0 // group
        g_mask = cm.range_mask(g0, per_chunk, k // group, k_ragged)
        sz_idx = (n_rows, pl.ds(g0, per_chunk))
        t["s"] = cm.masked_load(s_ref, sz_idx, cm.and_masks(n_mask, g_mask))           # [bn, per_chunk]
        if asym:
            t["z"] = cm.masked_load(z_ref, sz_idx, cm.and_masks(n_mask, g_mask))
        return t

    def per_word(v):
        """[bn, per_chunk] group values -> [bn, words], one per word column of the chunk."""
        if per_chunk == 1:
            return v
        rep = jnp.broadcast_to(v[:, :, None], (bn, per_chunk, group_words))
        return rep.reshape(bn, words)

    def accumulate(acc, t):
        xs = _deinterleave(t["x"].astype(jnp.float32), WORD)
        dot = sum(_nibble_plus_128(t["w"], j) * xs[j][None, :] for j in range(WORD))   # [bn, words]
        xsum = sum(xs)                                                                   # [words]
        c = 128.0 + per_word(t["z"].astype(jnp.float32)) if asym else 136.0
        s = per_word(t["s"].astype(jnp.float32))
        return acc + s * (dot - c * xsum[None, :])

    acc = cm.k_loop(load, accumulate, ps * per_split, per_split, unroll, jnp.zeros((bn, words), jnp.float32))
    y = jnp.sum(acc, axis=1)                            # [bn]
    idx = (jnp.int32(0), n_rows) if split == 1 else (ps, n_rows)
    cm.masked_store(o_ref, idx, y.astype(o_ref.dtype), n_mask)


def as_words(packed: jax.Array) -> jax.Array:
    """uint8 [N, K/2] -> int32 [N, K/8], the same bytes (little-endian), for K % 8 == 0."""
    n, half = packed.shape
    return lax.bitcast_convert_type(packed.reshape(n, half // 4, 4), jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def w4a16_gemv(x, packed, scale, zero=None, *, config: GemvConfig | None = None, interpret: bool = False):
    """y [1, N] = x [1, K] @ W^T in x.dtype, W as w4a16.py defines it (packed u8 [N, K/2], scale and zero
    [N, K/G]). The caller (w4a16.w4a16_matmul / dispatch) has checked shape_is_supported and, for a given
    config, config_is_valid."""
    m, k = x.shape
    n = packed.shape[0]
    group = k // scale.shape[1]
    cfg = config or default_config(n, k, group)
    asym = zero is not None
    args = [x, as_words(packed), scale] + ([zero] if asym else [])
    split = cfg.split_k
    out_shape = jax.ShapeDtypeStruct((1, n) if split == 1 else (split, n), x.dtype if split == 1 else jnp.float32)
    kernel = functools.partial(w4a16_gemv_kernel, cfg=cfg, n=n, k=k, group=group, asym=asym)
    y = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(cm.cdiv(n, cfg.block_n), split),
        compiler_params=cm.triton_params(cfg.num_warps, cfg.num_stages),
        interpret=interpret,
        name="w4a16_gemv",
    )(*args)
    if split > 1:
        y = jnp.sum(y, axis=0, keepdims=True).astype(x.dtype)
    return y
