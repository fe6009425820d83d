"""ModelOpt unified HF export (spec 2.4-2.7): INT4 packed along N, NVFP4 and MXFP4 as stored in memory.

Each `from_modelopt_*` takes the sibling tensors of one linear by their checkpoint names and returns the
canonical quantized array; each `to_modelopt_*` returns {checkpoint name: array}.
"""

import jax.numpy as jnp

from jaxq.formats import _checks
from jaxq.formats.elements import pack_nibbles, unpack_nibbles
from jaxq.formats.int4 import SYMMETRIC_ZERO, Int4Tensor
from jaxq.formats.mxfp4 import BLOCK as MXFP4_BLOCK
from jaxq.formats.mxfp4 import MXFP4Tensor
from jaxq.formats.nvfp4 import BLOCK as NVFP4_BLOCK
from jaxq.formats.nvfp4 import NVFP4Tensor


def from_modelopt_int4(weight, weight_scale) -> Int4Tensor:
    """W4A16_AWQ / W4A8_AWQ weight: `weight` U8 [..., N/2, K], byte [i, k] = q[2i, k] & 0xF |
    (q[2i+1, k] & 0xF) << 4 (packed along N, low nibble = even row, two's-complement q in [-8, 7]);
    `weight_scale` [..., N, K/G]. W = q * weight_scale[n, k // G]. Canonical u = q + 8 = nibble ^ 8.
    """
    fn = "from_modelopt_int4"
    _checks.check_dtype(fn, "weight", weight, jnp.uint8)
    _checks.check_rank(fn, "weight", weight, 2)
    _checks.check_floating(fn, "weight_scale", weight_scale)
    _checks.check_rank(fn, "weight_scale", weight_scale, 2)
    n, k, n_groups = 2 * weight.shape[-2], weight.shape[-1], weight_scale.shape[-1]
    _checks.check_shape(fn, "weight_scale", weight_scale, (*weight.shape[:-2], n, n_groups),
                        f"[..., N, K/G] with N = 2 * weight.shape[-2] = {n}")
    _checks.check_multiple(fn, "weight", "K", k, n_groups, f"{n_groups} groups in weight_scale")
    _checks.check_multiple(fn, "weight", "K", k, 2, "two INT4 codes per byte in memory")
    u = unpack_nibbles(weight, axis=-2) ^ SYMMETRIC_ZERO
    return Int4Tensor(packed=pack_nibbles(u), scale=weight_scale, group_size=k // n_groups)


def to_modelopt_int4(t: Int4Tensor) -> dict:
    """Inverse of from_modelopt_int4: {"weight": U8 [..., N/2, K], "weight_scale": [..., N, K/G]}.

    ModelOpt INT4 is symmetric without act-order: t must have no zero point and no g_idx.
    """
    fn = "to_modelopt_int4"
    if t.zero is not None or t.g_idx is not None:
        raise ValueError(f"{fn}: t has {'a zero point' if t.zero is not None else 'a g_idx'}; ModelOpt INT4 is "
                         "symmetric without act-order (quantize with scheme='modelopt', or sort_by_g_idx first)")
    _checks.check_multiple(fn, "t", "N", t.shape[-2], 2, "ModelOpt packs two output rows per byte")
    return {"weight": pack_nibbles(t.codes() ^ SYMMETRIC_ZERO, axis=-2), "weight_scale": t.scale}


def from_modelopt_nvfp4(weight, weight_scale, weight_scale_2) -> NVFP4Tensor:
    """NVFP4: `weight` U8 [..., N, K/2] (low nibble = even k), `weight_scale` F8_E4M3 [..., N, K/16],
    `weight_scale_2` F32 [] (or one per leading expert index; bf16 in some checkpoints, upcast)."""
    fn = "from_modelopt_nvfp4"
    _checks.check_packed_fp4(fn, "weight", weight, "weight_scale", weight_scale, jnp.float8_e4m3fn, NVFP4_BLOCK)
    return NVFP4Tensor(packed=weight, block_scale=weight_scale,
                       global_scale=_checks.per_matrix_scale(fn, "weight_scale_2", weight_scale_2, weight))


def to_modelopt_nvfp4(t: NVFP4Tensor) -> dict:
    return {"weight": t.packed, "weight_scale": t.block_scale, "weight_scale_2": t.global_scale}


def from_modelopt_mxfp4(weight, weight_scale) -> MXFP4Tensor:
    """MXFP4: `weight` U8 [..., N, K/2] (low nibble = even k), `weight_scale` U8 E8M0 [..., N, K/32]."""
    fn = "from_modelopt_mxfp4"
    _checks.check_packed_fp4(fn, "weight", weight, "weight_scale", weight_scale, jnp.uint8, MXFP4_BLOCK)
    return MXFP4Tensor(packed=weight, scale=weight_scale)


def to_modelopt_mxfp4(t: MXFP4Tensor) -> dict:
    return {"weight": t.packed, "weight_scale": t.scale}
