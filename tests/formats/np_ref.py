"""Independent NumPy (+ ml_dtypes) references for the element codecs and shared test utilities.

Nothing here imports jaxq: these are the oracles the jnp implementations are compared against, and
they use different algorithms where possible (ml_dtypes casts, argmin to the nearest level, frexp).
"""

import ml_dtypes
import numpy as np

E2M1_LEVELS = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)
E2M1_TABLE = np.concatenate([E2M1_LEVELS, -E2M1_LEVELS])


def e2m1_even(x):
    """Round-half-even, saturating E2M1 codes via ml_dtypes' float4_e2m1fn (bit pattern = our code)."""
    x = np.asarray(x, np.float32)
    return np.where(x == 0, 0, np.clip(x, -6, 6).astype(ml_dtypes.float4_e2m1fn).view(np.uint8)).astype(np.uint8)


def e2m1_down(x):
    """Nearest E2M1 level by |x - level|, exact ties to the smaller magnitude (argmin takes the first)."""
    x = np.asarray(x, np.float32)
    idx = np.argmin(np.abs(np.abs(x)[..., None] - E2M1_LEVELS), axis=-1)
    return (idx + 8 * (x < 0)).astype(np.uint8)


def e4m3(x):
    """Saturating E4M3 cast."""
    return np.clip(np.asarray(x, np.float32), -448, 448).astype(ml_dtypes.float8_e4m3fn)


def e8m0_ceil(x):
    """E8M0 byte of the smallest power of two >= x (x >= 0), from frexp: x = m * 2**e, m in [0.5, 1)."""
    m, e = np.frexp(np.asarray(x, np.float32))
    ceil_log2 = np.where(m == 0.5, e - 1, e)
    ceil_log2 = np.where(x == 0, -127, ceil_log2)
    return (np.clip(ceil_log2, -127, 127) + 127).astype(np.uint8)


def pack_nibbles(codes):
    """Pairs along the last axis: low nibble = even index."""
    codes = np.asarray(codes, np.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed):
    packed = np.asarray(packed, np.uint8)
    out = np.empty(packed.shape[:-1] + (2 * packed.shape[-1],), np.uint8)
    out[..., 0::2], out[..., 1::2] = packed & 0xF, packed >> 4
    return out


def f32(x):
    return np.asarray(x, np.float32)


def bits(x):
    """Raw bytes of an 8-bit float array (compare codes, not values: NaN != NaN)."""
    return np.asarray(x).view(np.uint8)


def sqnr_db(x, x_hat):
    x, x_hat = np.asarray(x, np.float64), np.asarray(x_hat, np.float64)
    return 10 * np.log10(np.sum(x**2) / np.sum((x - x_hat) ** 2))
