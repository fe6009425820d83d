"""AutoAWQ GEMM layout (spec 5.3): int32 words packed along N with AWQ's interleaved nibble order."""

import jax.numpy as jnp

from jaxq.formats import _checks
from jaxq.formats.elements import pack_nibbles
from jaxq.formats.int4 import Int4Tensor
from jaxq.formats.layouts._words import pack_int32_nibbles, unpack_int32_nibbles, zero_codes

#: Nibble slot i (bits 4i..4i+3) of a word covering columns 8c..8c+7 holds column 8c + AWQ_ORDER[i].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def from_autoawq(qweight, qzeros, scales) -> Int4Tensor:
    """`qweight` I32 [K, N/8], `qzeros` I32 [K/G, N/8] (unsigned codes and zero points, interleaved
    along N), `scales` F16 [K/G, N]: W[n, k] = (q[k, n] - z[k // G, n]) * s[k // G, n], transposed to
    the canonical [N, K]. Leading batch axes are kept.
    """
    fn = "from_autoawq"
    _checks.check_dtype(fn, "qweight", qweight, jnp.int32)
    _checks.check_dtype(fn, "qzeros", qzeros, jnp.int32)
    _checks.check_floating(fn, "scales", scales)
    _checks.check_rank(fn, "qweight", qweight, 2)
    _checks.check_rank(fn, "scales", scales, 2)
    k, n, n_groups = qweight.shape[-2], 8 * qweight.shape[-1], scales.shape[-2]
    _checks.check_shape(fn, "scales", scales, (*qweight.shape[:-2], n_groups, n), f"[K/G, N] with N = 8 * {n // 8}")
    _checks.check_shape(fn, "qzeros", qzeros, (*qweight.shape[:-2], n_groups, n // 8), "[K/G, N/8]")
    _checks.check_multiple(fn, "qweight", "K", k, n_groups, f"{n_groups} groups in scales")
    _checks.check_multiple(fn, "qweight", "K", k, 2, "two INT4 codes per byte in memory")
    u = unpack_int32_nibbles(qweight, axis=-1, order=AWQ_ORDER)
    z = unpack_int32_nibbles(qzeros, axis=-1, order=AWQ_ORDER)
    return Int4Tensor(packed=pack_nibbles(jnp.swapaxes(u, -1, -2)), scale=jnp.swapaxes(scales, -1, -2),
                      group_size=k // n_groups, zero=jnp.swapaxes(z, -1, -2))


def to_autoawq(t: Int4Tensor) -> dict:
    """Inverse of from_autoawq: {"qweight", "qzeros", "scales"}; a symmetric t is written with zero 8.

    Scales keep t.scale's dtype: quantize with scale_dtype=float16 to write AutoAWQ's F16 exactly.
    """
    fn = "to_autoawq"
    if t.g_idx is not None:
        raise ValueError(f"{fn}: t has a g_idx; AutoAWQ has no act-order (sort_by_g_idx first)")
    _checks.check_multiple(fn, "t", "N", t.shape[-2], 8, "eight columns per int32 word")
    zero = zero_codes(fn, t)
    return {
        "qweight": pack_int32_nibbles(jnp.swapaxes(t.codes(), -1, -2), axis=-1, order=AWQ_ORDER),
        "qzeros": pack_int32_nibbles(jnp.swapaxes(zero, -1, -2), axis=-1, order=AWQ_ORDER),
        "scales": jnp.swapaxes(t.scale, -1, -2),
    }

