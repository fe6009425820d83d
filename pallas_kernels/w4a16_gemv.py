"""W4A16 at M=1 (decode): y[N] = x[K] . W[N, K]^T on the CUDA cores, reading the packed weights as int32
words, one accumulator element per word, reduced once at the end.

The canonical uint8 [N, K/2] bytes (low nibble = even k) are, read as little-endian int32 [N, K/8], words
whose nibble j (bits 4j..4j+3) is k = 8i + j; the wrapper only bitcasts them. Per K chunk of bk elements,
a program holds words [bn, bk/8] and the x chunk [bk], de-interleaved in registers into x[8i + j] per j.
Decode: four shifts of the word (<< 12, << 4, >> 4, >> 12) put nibbles 2q and 2q + 1 at bits 12..15 and
16..19; OR-ed onto the f32 bits of 2^11 and 2^7 they are exactly 2048 + u and 128 + u, one LOP3 each (the
two exponent patterns are kernel inputs, so they sit in registers and the AND and OR fuse). Then
  t[n, i] = sum_j (o_j + u[n, 8i+j]) * x[8i+j] - sum_j (o_j + c[n, g]) * x[8i+j]   (o_j = 2048 even j, 128 odd;
                                                                                    c = zero, 8 sym)
  acc[n, i] += s[n, g] * t[n, i]
as a chain of FMAs (cm.fma: Pallas would emit separate multiplies and adds) that starts from the offset
term, which depends only on x and the zero point. Per word: 4 shifts, 8 LOP3, 9 FMAs. There is no
cross-thread reduction inside the loop: acc keeps one f32 per word column and is summed over its columns
once, after the last chunk. Split-K programs write f32 partials [split_k, N] that one XLA fusion sums and
casts.

Numerics as w4a16.py states (exact weights and products, f32 accumulation, one rounding to x.dtype). The
offsets cancel inside each word: the chain's terms reach about 2^13 |x|, so each word's sum carries an
f32 rounding error of about 2^-10 max|x| (measured: 2e-5 of the output's rms at K = 14336 with
heavy-tailed x, against a float64 oracle). Tolerance:
|y - ref| <= 1e-2 * |ref| + 1e-2 * rms(ref).
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
    """Static tuning knobs of `w4a16_gemv` (block sizes and unroll powers of two).

    block_n: output channels per program.
    block_k: K elements per chunk (a multiple of 8 words' worth, >= 32); chunks span whole groups or
      divide one: block_k % group == 0 or group % block_k == 0.
    split_k: programs along K, any count >= 1 (each takes ceil(chunks / split_k) chunks, rounded up to
      unroll; the chunks past K are masked), so a plan can size the grid to whole waves.
    unroll: chunks whose loads are issued before their math, per loop iteration.
    num_warps, num_stages: Triton's warps per program and software-pipelining depth.
    prefetch: load the next iteration's chunks before this one's math (cm.k_loop), at the cost of a second
      tile of registers.
    """

    block_n: int = 32
    block_k: int = 256
    split_k: int = 1
    unroll: int = 1
    num_warps: int = 4
    num_stages: int = 3
    prefetch: bool = False


def config_is_valid(group: int, cfg: GemvConfig) -> bool:
    sizes = (cfg.block_n, cfg.block_k, cfg.unroll)
    if not all(cm.is_pow2(v) for v in sizes) or cfg.block_k < 32 or cfg.split_k < 1:
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


# f32 bit patterns of 2^11 and 2^7: OR-ed onto a nibble at bits 12..15 / 16..19 they read 2048 + u / 128 + u.
EXP_2048, EXP_128 = 0x45000000, 0x43000000
# Word shifts (negative: logical right) that put nibbles 2q and 2q + 1 at bits 12..15 and 16..19.
PAIR_SHIFTS = (12, 4, -4, -12)


def shift_left(words, s: int):
    """words << s, a logical right shift for negative s."""
    if s >= 0:
        return words << s if s else words
    return lax.shift_right_logical(words, jnp.int32(-s))


def deinterleave(v, ways: int):
    """v [L] -> `ways` arrays [L / ways], the j-th holding v[ways * i + j] (halving splits: Triton splits
    a trailing axis of 2 in registers)."""
    if ways == 1:
        return [v]
    even, odd = jnp.unstack(v.reshape(v.shape[0] // 2, 2), axis=-1)
    lo, hi = deinterleave(even, ways // 2), deinterleave(odd, ways // 2)
    return [part for pair in zip(lo, hi) for part in pair]


def word_gemv_program(x_ref, w_ref, group_refs: dict, o_ref, *, cfg: GemvConfig, n: int, k: int, group: int,
                      word_dot, post=None, block0: int = 0, ids=None, x_row: int = 0, group_f32=None):
    """The program shared by the word GEMVs (this module, fp4_gemv.py), for the output channels of
    program_id(0) and the K range of split program_id(1). block0: in a grouped GEMV, the grid's first
    channel block of this weight: it computes the weight's channels (program_id(0) - block0) * block_n and
    stores them at output columns program_id(0) * block_n (each earlier weight's N a multiple of block_n).
    ids: (program_id(0), program_id(1)) read by the caller, for a program run inside a branch (interpret
    mode cannot lower program_id there).

    x_ref [R, K], its row x_row the activations (R > 1: a group whose weights each have their own x, e.g.
    W4A8's E4M3 codes per input scale); w_ref int32 words [N, K/8]; group_refs: name -> ref [N, K/group] of
    per-group values (scales, zeros); o_ref [1, N] (split_k 1) or f32 [split_k, N]. Per K chunk it loads the words
    [bn, bk/8], the x chunk de-interleaved into the 8 vectors x[8i + j], and each group ref broadcast to
    one value per word column ([bn, bk/8], or [bn, 1] when a group spans the chunk; group_f32, if given,
    converts the raw values to f32 once per group, before the broadcast), and updates the
    accumulator: acc = word_dot(words, xs, groups, acc), f32 [bn, bk/8]. After the K loop the word columns are
    summed, multiplied by `post` (a traced scalar, optional) and stored."""
    bn, bk, split, unroll = cfg.block_n, cfg.block_k, cfg.split_k, cfg.unroll
    words = bk // WORD
    pn, ps = ids or (pl.program_id(0), pl.program_id(1))
    n0 = (pn - block0) * bn
    chunks = cm.cdiv(k, bk)
    per_split = cm.cdiv(cm.cdiv(chunks, split), unroll) * unroll
    k_ragged = k % bk != 0 or chunks != per_split * split
    n_mask = cm.range_mask(n0, bn, n, n % bn != 0)
    n_rows = pl.ds(n0, bn)
    per_chunk = max(bk // group, 1)                     # groups in one chunk
    before_broadcast = group_f32 or (lambda raw: raw)
    group_words = group // WORD

    def per_word(v):
        """[bn, per_chunk] group values -> [bn, words], one per word column of the chunk."""
        if per_chunk == 1:
            return v
        return jnp.broadcast_to(v[:, :, None], (bn, per_chunk, group_words)).reshape(bn, words)

    def load(chunk):
        k0 = cm.multiple_of(chunk * bk, bk)
        i0 = cm.multiple_of(chunk * words, words)
        w_mask = cm.range_mask(i0, words, k // WORD, k_ragged)
        g0 = k0 // group
        g_mask = cm.and_masks(n_mask, cm.range_mask(g0, per_chunk, k // group, k_ragged))
        t = {name: cm.masked_load(ref, (n_rows, pl.ds(g0, per_chunk)), g_mask) for name, ref in group_refs.items()}
        t["_w"] = cm.masked_load(w_ref, (n_rows, pl.ds(i0, words)), cm.and_masks(n_mask, w_mask))
        t["_x"] = cm.masked_load(x_ref, (jnp.int32(x_row), pl.ds(k0, bk)), cm.range_mask(k0, bk, k, k_ragged))
        return t

    def accumulate(acc, t):
        xs = deinterleave(t["_x"].astype(jnp.float32), WORD)
        groups = {name: per_word(before_broadcast(t[name])) for name in group_refs}
        return word_dot(t["_w"], xs, groups, acc)

    acc = cm.k_loop(load, accumulate, ps * per_split, per_split, unroll, jnp.zeros((bn, words), jnp.float32),
                    cfg.prefetch)
    y = jnp.sum(acc, axis=1)                            # [bn]
    if post is not None:
        y = y * post
    out_cols = pl.ds(pn * bn, bn)
    idx = (jnp.int32(0), out_cols) if split == 1 else (ps, out_cols)
    cm.masked_store(o_ref, idx, y.astype(o_ref.dtype), n_mask)


def _int4_word_dot(asym: bool, exps, native_fma: bool):
    """The decode and FMA chain of the module docstring; exps: the traced (EXP_2048, EXP_128) patterns."""
    exp_even, exp_odd = exps

    def word_dot(w, xs, g, acc):
        even, odd = sum(xs[0::2]), sum(xs[1::2])                                        # [words]
        if asym:
            d = cm.fma(-g["z"].astype(jnp.float32), (even + odd)[None, :],
                       -(2048.0 * even + 128.0 * odd)[None, :], native=native_fma)
        else:
            d = -(2056.0 * even + 136.0 * odd)[None, :]
        for q, shift in enumerate(PAIR_SHIFTS):
            moved = shift_left(w, shift)
            lo = lax.bitcast_convert_type((moved & 0x0000F000) | exp_even, jnp.float32)  # 2048 + u, nibble 2q
            hi = lax.bitcast_convert_type((moved & 0x000F0000) | exp_odd, jnp.float32)   # 128 + u, nibble 2q + 1
            d = cm.fma(lo, xs[2 * q][None, :], d, native=native_fma)
            d = cm.fma(hi, xs[2 * q + 1][None, :], d, native=native_fma)
        return cm.fma(g["s"].astype(jnp.float32), d, acc, native=native_fma)
    return word_dot


def w4a16_gemv_kernel(*refs, cfg: GemvConfig, ns: tuple, k: int, group: int, asym: bool, has_post: bool,
                      native_fma: bool):
    """refs: x [1, K] bf16 or e4m3, or [len(ns), K] (row s weight s's own x); exps int32 [2] (EXP_2048,
    EXP_128); per weight s of widths ns, words [N_s, K/8] int32, scale [N_s, K/G] and zero [N_s, K/G] (asym
    only); post f32 [1] or [len(ns)] (has_post only); out [1, sum N] (split_k 1) or f32 [split_k, sum N].
    Several weights (a group) split the grid's channel blocks in order, each N_s but the last a multiple of
    block_n; a program runs the weight its block falls in, on its row of x and post."""
    x_ref, exps_ref, *rest = refs
    per_weight = 3 if asym else 2
    weights = [rest[i * per_weight:(i + 1) * per_weight] for i in range(len(ns))]
    rest = rest[len(ns) * per_weight:]
    post_ref = rest.pop(0) if has_post else None
    (o_ref,) = rest
    own_x = x_ref.shape[0] > 1
    word_dot = _int4_word_dot(asym, (exps_ref[0], exps_ref[1]), native_fma)
    ids = (pl.program_id(0), pl.program_id(1))
    pn = ids[0]
    block0 = 0
    for i, (n, (w_ref, s_ref, *z_ref)) in enumerate(zip(ns, weights)):
        group_refs = {"s": s_ref, **({"z": z_ref[0]} if asym else {})}
        post = None if post_ref is None else post_ref[i if post_ref.shape[0] > 1 else 0]
        program = functools.partial(word_gemv_program, x_ref, w_ref, group_refs, o_ref, cfg=cfg, n=n, k=k,
                                    group=group, word_dot=word_dot, post=post, block0=block0, ids=ids,
                                    x_row=i if own_x else 0)
        blocks = cm.cdiv(n, cfg.block_n)
        if len(ns) == 1:
            program()
        else:
            pl.when((pn >= block0) & (pn < block0 + blocks))(program)
        block0 += blocks


def as_words(packed: jax.Array) -> jax.Array:
    """uint8 [N, K/2] -> int32 [N, K/8], the same bytes (little-endian), for K % 8 == 0."""
    n, half = packed.shape
    return lax.bitcast_convert_type(packed.reshape(n, half // 4, 4), jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "out_dtype", "interpret"))
def w4a16_gemv(x, packed, scale, zero=None, *, post_scale=None, config: GemvConfig | None = None, out_dtype=None,
               interpret: bool = False):
    """y [1, N] = x [1, K] @ W^T in out_dtype (default x.dtype), W as w4a16.py defines it (packed u8 [N, K/2],
    scale and zero [N, K/G]). x: bf16, or float8_e4m3fn codes (widened to f32 in the kernel). post_scale: an
    f32 scalar multiplying the f32 result before its one rounding (W4A8 at M=1 passes its E4M3 activation
    codes as x and input_scale here). The caller (w4a16.w4a16_matmul
    / dispatch) has checked shape_is_supported and, for a given config, config_is_valid."""
    return w4a16_gemv_group(x, (packed,), (scale,), None if zero is None else (zero,), post_scale=post_scale,
                            config=config, out_dtype=out_dtype, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("config", "out_dtype", "interpret"))
def w4a16_gemv_group(x, packed: tuple, scale: tuple, zero: tuple | None = None, *, post_scale=None,
                     config: GemvConfig | None = None, out_dtype=None, interpret: bool = False):
    """Several weights that share x (q, k, v; gate, up) in one launch: y [1, N_0 + N_1 + ...], x @ W_s^T for
    each weight side by side, each as w4a16_gemv computes it alone with this config (default: the heuristic
    for the summed N). One entry per weight in packed, scale and zero, all with the same K, group and
    symmetry; every N but the last a multiple of config.block_n (ValueError otherwise). x [1, K], or one row
    per weight [len(packed), K] and post_scale a scalar or one per weight [len(packed)] (W4A8: each weight's
    E4M3 codes of x and its input_scale)."""
    rows, k = x.shape
    ns = tuple(p.shape[0] for p in packed)
    post_rows = 1 if post_scale is None else jnp.size(post_scale)
    if rows not in (1, len(ns)) or post_rows not in (1, len(ns)):
        raise ValueError(f"w4a16_gemv_group: x {x.shape} and post_scale of {post_rows} values for {len(ns)} "
                         f"weights: expected one row of x (or one per weight) and one post scale (or one per "
                         f"weight)")
    group = k // scale[0].shape[1]
    cfg = config or default_config(sum(ns), k, group)
    zeros = (None,) * len(packed) if zero is None else zero
    for i, (p, s, z) in enumerate(zip(packed, scale, zeros)):
        if (s.shape != (p.shape[0], k // group) or (z is None) != (zeros[0] is None)
                or (z is not None and z.shape != s.shape) or (i < len(ns) - 1 and p.shape[0] % cfg.block_n)):
            raise ValueError(f"w4a16_gemv_group: weight {i}: packed {p.shape}, scale {s.shape}, zero "
                             f"{None if z is None else z.shape} do not fit x {x.shape} with group {group} and "
                             f"block_n {cfg.block_n} (every weight's scale (N, K/{group}), zeros on all or none, "
                             f"each N but the last a multiple of block_n)")
    asym = zero is not None
    has_post = post_scale is not None
    kernel = functools.partial(w4a16_gemv_kernel, cfg=cfg, ns=ns, k=k, group=group, asym=asym, has_post=has_post,
                               native_fma=not interpret)
    per_weight = [a for p, s, z in zip(packed, scale, zeros) for a in (as_words(p), s, *([z] if asym else []))]
    args = [x, jnp.array([EXP_2048, EXP_128], jnp.int32)] + per_weight
    if has_post:
        args.append(jnp.reshape(post_scale, (post_rows,)).astype(jnp.float32))
    return call_word_gemv(kernel, args, out_dtype or x.dtype, sum(ns), cfg, interpret, "w4a16_gemv")


def call_word_gemv(kernel, args, out_dtype, n: int, cfg: GemvConfig, interpret: bool, name: str) -> jax.Array:
    """Launches a word GEMV kernel (grid: output channel blocks x split_k) and, with split-K, sums its f32
    partials in one XLA fusion; y [1, N] in out_dtype."""
    split = cfg.split_k
    out_shape = jax.ShapeDtypeStruct((1, n) if split == 1 else (split, n), out_dtype if split == 1 else jnp.float32)
    y = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(cm.cdiv(n, cfg.block_n), split),
        compiler_params=cm.triton_params(cfg.num_warps, cfg.num_stages),
        interpret=interpret,
        name=name,
    )(*args)
    if split > 1:
        y = jnp.sum(y, axis=0, keepdims=True).astype(out_dtype)
    return y
