"""compressed-tensors (llm-compressor) layouts (spec 5.6): pack-quantized INT4 and NVFP4.

pack-quantized stores eight codes per int32 in sequence (element j at bits 4j) with an offset of +8, so
the stored nibble of a signed q is exactly jaxq's unsigned code u = q + 8, and the stored nibble of a
signed zero point zp is the unsigned zero z = zp + 8. NVFP4 stores the reciprocal global scale.
"""

import jax.numpy as jnp

from jaxq.formats import _checks
from jaxq.formats._blocking import ceil_div, pad_to_multiple
from jaxq.formats.elements import E2M1_MAX, E4M3_MAX, exact_divide, pack_nibbles
from jaxq.formats.int4 import Int4Tensor, check_g_idx
from jaxq.formats.layouts._words import pack_int32_nibbles, unpack_int32_nibbles, zero_codes
from jaxq.formats.nvfp4 import BLOCK as NVFP4_BLOCK
from jaxq.formats.nvfp4 import NVFP4Tensor


def from_compressed_tensors_int4(weight_packed, weight_scale, weight_shape=None, weight_zero_point=None,
                                 weight_g_idx=None) -> Int4Tensor:
    """pack-quantized INT4: `weight_packed` I32 [N, ceil(K/8)] (along K, stored q + 8), `weight_scale`
    [N, K/G] (bf16), `weight_shape` [2] = (N, K) (concrete; default K = 8 * words), optional
    `weight_zero_point` I32 [ceil(N/8), K/G] (along N, stored zp + 8: row 8r + j in nibble j of [r, g]),
    optional `weight_g_idx` [K]. W = (q - zp) * s = (u - z) * s.
    """
    fn = "from_compressed_tensors_int4"
    _checks.check_dtype(fn, "weight_packed", weight_packed, jnp.int32)
    _checks.check_rank(fn, "weight_packed", weight_packed, 2)
    _checks.check_floating(fn, "weight_scale", weight_scale)
    _checks.check_rank(fn, "weight_scale", weight_scale, 2)
    n, k = weight_packed.shape[-2], 8 * weight_packed.shape[-1]
    if weight_shape is not None:
        n_given, k = (int(v) for v in jnp.asarray(weight_shape)[-2:])
        _checks.check_shape(fn, "weight_packed", weight_packed, (*weight_packed.shape[:-2], n_given, ceil_div(k, 8)),
                            f"[N, ceil(K/8)] for weight_shape ({n_given}, {k})")
    n_groups = weight_scale.shape[-1]
    _checks.check_shape(fn, "weight_scale", weight_scale, (*weight_packed.shape[:-1], n_groups), f"[N, K/G] with N={n}")
    _checks.check_multiple(fn, "weight_shape", "K", k, 2, "two INT4 codes per byte in memory")
    _checks.check_multiple(fn, "weight_shape", "K", k, n_groups, f"{n_groups} groups in weight_scale")
    u = unpack_int32_nibbles(weight_packed, axis=-1)[..., :k]
    zero = None
    if weight_zero_point is not None:
        _checks.check_dtype(fn, "weight_zero_point", weight_zero_point, jnp.int32)
        _checks.check_shape(fn, "weight_zero_point", weight_zero_point,
                            (*weight_scale.shape[:-2], ceil_div(n, 8), n_groups), "[ceil(N/8), K/G], packed along N")
        zero = unpack_int32_nibbles(weight_zero_point, axis=-2)[..., :n, :]
    g_idx = None if weight_g_idx is None else check_g_idx(fn, "weight_g_idx", weight_g_idx, k, n_groups)
    return Int4Tensor(packed=pack_nibbles(u), scale=weight_scale, group_size=k // n_groups, zero=zero, g_idx=g_idx)


def to_compressed_tensors_int4(t: Int4Tensor) -> dict:
    """Inverse of from_compressed_tensors_int4: {"weight_packed", "weight_scale", "weight_shape" (int32;
    llm-compressor writes I64), and "weight_zero_point" / "weight_g_idx" when t has them}. Partial words
    (K % 8, N % 8) are zero-padded as compressed-tensors pads them.
    """
    fn = "to_compressed_tensors_int4"
    out = {
        "weight_packed": pack_int32_nibbles(pad_to_multiple(t.codes(), -1, 8), axis=-1),
        "weight_scale": t.scale,
        "weight_shape": jnp.asarray(t.shape[-2:], jnp.int32),
    }
    if t.zero is not None:
        out["weight_zero_point"] = pack_int32_nibbles(pad_to_multiple(zero_codes(fn, t), -2, 8), axis=-2)
    if t.g_idx is not None:
        out["weight_g_idx"] = t.g_idx.astype(jnp.int32)
    return out


def compressed_tensors_global_scale(amax):
    """llm-compressor's NVFP4 global scale 448 * 6 / amax, bit for bit: torch evaluates the Python-scalar
    numerator as a reciprocal times 2688, not as a division."""
    return (E4M3_MAX * E2M1_MAX) * exact_divide(1.0, jnp.asarray(amax, jnp.float32))


def from_compressed_tensors_nvfp4(weight_packed, weight_scale, weight_global_scale) -> NVFP4Tensor:
    """nvfp4-pack-quantized: `weight_packed` U8 [N, K/2] (low nibble = even k), `weight_scale` F8_E4M3
    [N, K/16], `weight_global_scale` F32 [1] = 448 * 6 / amax, the reciprocal of ModelOpt's
    weight_scale_2: W = e2m1 * f32(weight_scale) / weight_global_scale. Stored here as the multiplier
    1 / weight_global_scale, so dequantize() may differ from that division in the last bit.
    """
    fn = "from_compressed_tensors_nvfp4"
    _checks.check_packed_fp4(fn, "weight_packed", weight_packed, "weight_scale", weight_scale,
                             jnp.float8_e4m3fn, NVFP4_BLOCK)
    global_scale = _checks.per_matrix_scale(fn, "weight_global_scale", weight_global_scale, weight_packed)
    _checks.check_positive(fn, "weight_global_scale", global_scale)
    return NVFP4Tensor(packed=weight_packed, block_scale=weight_scale, global_scale=exact_divide(1.0, global_scale))


def to_compressed_tensors_nvfp4(t: NVFP4Tensor) -> dict:
    """{"weight_packed", "weight_scale", "weight_global_scale" = 1 / global_scale, [1] for a 2-D t}."""
    gs = exact_divide(1.0, t.global_scale)
    return {"weight_packed": t.packed, "weight_scale": t.block_scale,
            "weight_global_scale": gs.reshape(1) if gs.ndim == 0 else gs}
