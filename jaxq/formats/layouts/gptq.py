"""AutoGPTQ / GPTQModel layout (spec 5.4): qweight packed along K, qzeros along N, v1 zero - 1 quirk."""

import jax.numpy as jnp

from jaxq.formats import _checks
from jaxq.formats.elements import pack_nibbles
from jaxq.formats.int4 import SYMMETRIC_ZERO, Int4Tensor, check_g_idx
from jaxq.formats.layouts._words import pack_int32_nibbles, unpack_int32_nibbles, zero_codes


def from_gptq(qweight, qzeros, scales, g_idx=None, *, version: int = 1, sym: bool = False) -> Int4Tensor:
    """`qweight` I32 [K/8, N] (word r, bits 4j = row 8r + j), `qzeros` I32 [G, N/8] (word c, bits 4j =
    column 8c + j), `scales` F16 [G, N], `g_idx` I32 [K]: W[n, k] = (q[k, n] - z[g, n]) * s[g, n] with
    g = g_idx[k] (or k // (K/G)), transposed to the canonical [N, K].

    version 1 (checkpoint_format "gptq") stores zero - 1, so z = nibble + 1 (1..16, as AutoGPTQ and vLLM
    read it); version 2 ("gptq_v2") stores z. sym=True requires every zero to be 8 (checked when
    concrete) and drops them (zero=None). A concrete g_idx equal to k // G (what GPTQ writes without
    act-order) is dropped; an act-order g_idx is kept.
    """
    fn = "from_gptq"
    _checks.check_choice(fn, "version", version, (1, 2))
    _checks.check_dtype(fn, "qweight", qweight, jnp.int32)
    _checks.check_dtype(fn, "qzeros", qzeros, jnp.int32)
    _checks.check_floating(fn, "scales", scales)
    _checks.check_rank(fn, "qweight", qweight, 2)
    _checks.check_rank(fn, "scales", scales, 2)
    k, n, n_groups = 8 * qweight.shape[-2], qweight.shape[-1], scales.shape[-2]
    batch = qweight.shape[:-2]
    _checks.check_shape(fn, "scales", scales, (*batch, n_groups, n), f"[G, N] with N = {n}")
    _checks.check_shape(fn, "qzeros", qzeros, (*batch, n_groups, n // 8), f"[G, N/8] with N = {n}")
    _checks.check_multiple(fn, "qweight", "K", k, n_groups, f"{n_groups} groups in scales")
    group_size = k // n_groups
    u = jnp.swapaxes(unpack_int32_nibbles(qweight, axis=-2), -1, -2)
    z = jnp.swapaxes(unpack_int32_nibbles(qzeros, axis=-1), -1, -2) + (1 if version == 1 else 0)
    if sym:
        _checks.check_range(fn, "zero points of qzeros (sym=True)", z, SYMMETRIC_ZERO, SYMMETRIC_ZERO)
        z = None
    if g_idx is not None:
        g_idx = check_g_idx(fn, "g_idx", g_idx, k, n_groups)
        if _checks.is_concrete(g_idx) and bool(jnp.all(g_idx == jnp.arange(k) // group_size)):
            g_idx = None
    return Int4Tensor(packed=pack_nibbles(u), scale=jnp.swapaxes(scales, -1, -2), group_size=group_size,
                      zero=z, g_idx=g_idx)


def to_gptq(t: Int4Tensor, *, version: int = 1) -> dict:
    """Inverse of from_gptq: {"qweight", "qzeros", "scales", "g_idx"}; a symmetric t is written with zero
    8 (v1: nibble 7). Version 1 cannot store a zero point of 0 (nibble -1 would corrupt the word).

    Scales keep t.scale's dtype: quantize with scale_dtype=float16 to write GPTQ's F16 exactly.
    """
    fn = "to_gptq"
    _checks.check_choice(fn, "version", version, (1, 2))
    k, n = t.shape[-1], t.shape[-2]
    _checks.check_multiple(fn, "t", "K", k, 8, "eight rows per int32 word")
    _checks.check_multiple(fn, "t", "N", n, 8, "eight zero points per int32 word")
    lo, hi = (1, 16) if version == 1 else (0, 15)
    zero = zero_codes(fn, t, lo, hi)
    stored_zero = zero - (1 if version == 1 else 0)
    g_idx = jnp.arange(k, dtype=jnp.int32) // t.group_size if t.g_idx is None else t.g_idx.astype(jnp.int32)
    return {
        "qweight": pack_int32_nibbles(jnp.swapaxes(t.codes(), -1, -2), axis=-2),
        "qzeros": pack_int32_nibbles(jnp.swapaxes(stored_zero, -1, -2), axis=-1),
        "scales": jnp.swapaxes(t.scale, -1, -2),
        "g_idx": g_idx,
    }
