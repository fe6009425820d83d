"""Element codecs: FP4 E2M1 codes, saturating FP8 E4M3, E8M0 exponent bytes, 4-bit packing into bytes,
and the correctly rounded division that bit-exact quantization needs.

All functions are pure jnp, shape-agnostic and jit-safe. Exponent arithmetic is done on float32 bit
patterns, so every power of two is exact on every backend (no exp2/log2 approximations).
"""

import functools

import jax
import jax.numpy as jnp

E2M1_MAX = 6.0
E4M3_MAX = 448.0
E8M0_BIAS = 127

#: Value of each 4-bit E2M1 code; code = sign * 8 + index into the magnitudes (0, .5, 1, 1.5, 2, 3, 4, 6).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

# Midpoints between consecutive magnitudes: a magnitude's index is the number of midpoints below it.
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
# Midpoints whose upper neighbour (1.0, 2.0, 4.0) has the even mantissa, where half-to-even rounds up.
_E2M1_TIES_UP = (0.75, 1.75, 3.5)

_F32_EXP_SHIFT = 23
_F32_SUBNORMAL_2M127 = 0x00400000  # float32 bits of 2**-127 (a subnormal: E8M0 byte 0)


def exact_divide(a, b):
    """a / b in float32, correctly rounded (IEEE round to nearest even), the same on every backend.

    Producers divide (w / scale, amax / 448, ...) and their ties matter: GPTQ's and compressed-tensors'
    extreme elements sit exactly on x.5 by construction. XLA does not always divide exactly: on CPU a
    division by a broadcast (a scalar constant included) becomes a multiplication by the reciprocal, and
    on GPU a float32 division is off by 1-2 ulp for about a quarter of all inputs. On CPU the divisor is
    therefore hidden from that rewrite (its exact division is then used); elsewhere the significands are
    divided as integers (long_divide).
    """
    a, b = jnp.broadcast_arrays(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    return jax.lax.platform_dependent(a, b, cpu=_cpu_divide, default=long_divide)


def _cpu_divide(a, b):
    # b + 0 * a and the barrier keep the divisor from being a (foldable) broadcast.
    a, b = jax.lax.optimization_barrier((a, b))
    return a / (b + a * 0)


def long_divide(a, b):
    """Correctly rounded float32 a / b from integer operations only (restoring long division of the
    significands, 26 quotient bits plus a sticky bit, one rounding). a and b have the same shape.

    Like XLA's CPU arithmetic, subnormal inputs count as zero and subnormal results flush to zero;
    division by zero and non-finite operands give the hardware's inf/NaN.
    """
    ua, ub = (jax.lax.bitcast_convert_type(v, jnp.uint32) for v in (a, b))
    ea, eb = (ua >> _F32_EXP_SHIFT) & 0xFF, (ub >> _F32_EXP_SHIFT) & 0xFF
    ma, mb = (ua & 0x7FFFFF) | 0x800000, (ub & 0x7FFFFF) | 0x800000
    shift = (ma < mb).astype(jnp.uint32)  # make ma >= mb, so the quotient's leading bit is 2**0
    r, q = (ma << shift) - mb, jnp.ones_like(ma)

    def step(_, rq):  # q = floor(ma * 2**25 / mb) after 25 steps; r < mb < 2**24, so 2r fits
        r, q = rq
        r = r << 1
        bit = (r >= mb).astype(jnp.uint32)
        return r - bit * mb, (q << 1) | bit

    r, q = jax.lax.fori_loop(0, 25, step, (r, q))
    m = q >> 2  # 24 significant bits; then guard bit, round bit and sticky remainder
    m = m + (((q >> 1) & 1) & ((q & 1) | (r != 0).astype(jnp.uint32) | (m & 1)))
    carry = m >> 24  # rounding up 2**24 - 1 carries into the exponent
    e = ea.astype(jnp.int32) - eb.astype(jnp.int32) - shift.astype(jnp.int32) + carry.astype(jnp.int32) + 127
    sign = (ua ^ ub) & jnp.uint32(0x80000000)
    mag = (jnp.clip(e, 0, 255).astype(jnp.uint32) << _F32_EXP_SHIFT) | ((m >> carry) & 0x7FFFFF)
    mag = jnp.where(e >= 255, jnp.uint32(0x7F800000), jnp.where((e <= 0) | (ea == 0), jnp.uint32(0), mag))
    quotient = jax.lax.bitcast_convert_type(sign | mag, jnp.float32)
    special = (eb == 0) | (ea == 255) | (eb == 255)
    return jnp.where(special, a / jnp.where(eb == 0, 0.0, b), quotient)


def round_to(x, dtype):
    """x rounded to dtype (nearest even), with the rounding kept through later converts.

    XLA allows itself excess precision: it drops a convert pair such as f32 -> e4m3 -> f32 or
    f32 -> bf16 -> f32 (seen on GPU), which would skip the rounding a producer applied. An optimization
    barrier after the cast keeps the rounded value.
    """
    return jax.lax.optimization_barrier(x.astype(dtype))


def encode_e2m1(x, *, ties: str = "even"):
    """Round x (any float dtype) to the nearest E2M1 value and return its 4-bit code as uint8.

    code = 8 * (x < 0) + i, where i indexes (0, .5, 1, 1.5, 2, 3, 4, 6); |x| > 5 saturates to 6.
    ties="even": exact midpoints round half to even (0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2,
      3.5->4, 5->4): ModelOpt NVFP4 `_cast_fp4`, compressed-tensors, and hardware conversion.
    ties="down": exact midpoints round toward the smaller magnitude (0.75->0.5, 2.5->2, 5->4): ModelOpt
      MXFP4 (its index counts the midpoints strictly below |x|).
    Negative values that round to zero keep the sign bit (code 8 = -0), as ModelOpt NVFP4 writes them;
    a zero of either sign encodes as code 0. NaN encodes as 0 (callers validate inputs first).
    """
    if ties not in ("even", "down"):
        raise ValueError(f"encode_e2m1: ties={ties!r}, expected 'even' or 'down'")
    return _encode_e2m1(x, ties)


@functools.partial(jax.jit, static_argnames="ties")
def _encode_e2m1(x, ties):
    a = jnp.abs(x.astype(jnp.float32))
    idx = sum((a > m).astype(jnp.uint8) for m in _E2M1_MIDPOINTS)
    if ties == "even":
        idx = idx + sum((a == m).astype(jnp.uint8) for m in _E2M1_TIES_UP)
    return idx + jnp.where(x < 0, 8, 0).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames="dtype")
def decode_e2m1(codes, dtype=jnp.float32):
    """4-bit E2M1 codes (uint8, 0..15) -> values E2M1_VALUES[code] in dtype (exact in every float dtype)."""
    return jnp.asarray(E2M1_VALUES, dtype)[codes.astype(jnp.int32) & 0xF]


@jax.jit
def to_e4m3(x):
    """Saturating cast to float8_e4m3fn: clip to [-448, 448], then round to nearest even.

    A plain astype is not saturating (overflow gives NaN); producers and TRT-LLM kernels saturate.
    The result survives a later cast back to float32 (see round_to).
    """
    return round_to(jnp.clip(x.astype(jnp.float32), -E4M3_MAX, E4M3_MAX), jnp.float8_e4m3fn)


@jax.jit
def exp2_int(e):
    """Exact 2.0**e as float32 for integer e in [-126, 127] (built from the exponent bits)."""
    bits = (e.astype(jnp.int32) + E8M0_BIAS) << _F32_EXP_SHIFT
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


@jax.jit
def encode_e8m0(x):
    """Smallest power of two >= x, as an E8M0 byte u (value 2**(u - 127)), for x >= 0.

    u = clip(ceil(log2 x), -127, 127) + 127, computed exactly from the float32 bits (ModelOpt/
    compressed-tensors MXFP4 and DeepSeek "ue8m0" scales use this ceil rule). x = 0 (or anything
    <= 2**-127) gives u = 0; x > 2**127 saturates to u = 254; NaN/Inf give u = 255 (E8M0 NaN).
    """
    bits = jax.lax.bitcast_convert_type(jnp.abs(x.astype(jnp.float32)), jnp.uint32)
    biased = (bits >> _F32_EXP_SHIFT).astype(jnp.int32)
    mantissa = bits & 0x7FFFFF
    # Normal numbers: ceil(log2 x) = unbiased exponent, + 1 unless x is an exact power of two.
    u = biased + (mantissa != 0).astype(jnp.int32)
    # Subnormals (biased == 0): only those above 2**-127 round up to 2**-126 (u = 1).
    u = jnp.where(biased == 0, (mantissa > _F32_SUBNORMAL_2M127).astype(jnp.int32), u)
    u = jnp.clip(u, 0, 254)
    return jnp.where(biased == 255, 255, u).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames="dtype")
def decode_e8m0(u, dtype=jnp.float32):
    """E8M0 byte u -> 2**(u - 127) exactly (u = 0 -> 2**-127, a float32 subnormal); u = 255 -> NaN."""
    u32 = u.astype(jnp.uint32)
    bits = jnp.where(u32 == 0, jnp.uint32(_F32_SUBNORMAL_2M127), u32 << _F32_EXP_SHIFT)
    value = jnp.where(u32 == 255, jnp.nan, jax.lax.bitcast_convert_type(bits, jnp.float32))
    return value.astype(dtype)


@functools.partial(jax.jit, static_argnames="axis")
def pack_nibbles(codes, axis: int = -1):
    """Pack 4-bit codes (uint8, 0..15) pairwise along `axis` (even length) into bytes.

    byte[j] = codes[2j] | codes[2j + 1] << 4: the low nibble holds the even index.
    """
    c = jnp.moveaxis(codes.astype(jnp.uint8), axis, -1)
    packed = (c[..., 0::2] & 0xF) | (c[..., 1::2] << 4)
    return jnp.moveaxis(packed, -1, axis)


@functools.partial(jax.jit, static_argnames="axis")
def unpack_nibbles(packed, axis: int = -1):
    """Inverse of pack_nibbles: uint8 bytes -> codes (uint8, 0..15), twice as long along `axis`."""
    p = jnp.moveaxis(packed.astype(jnp.uint8), axis, -1)
    codes = jnp.stack([p & 0xF, p >> 4], axis=-1).reshape(*p.shape[:-1], 2 * p.shape[-1])
    return jnp.moveaxis(codes, -1, axis)
