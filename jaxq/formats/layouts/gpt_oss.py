"""GPT-OSS MXFP4 experts (spec 5.2): `*_blocks` U8 [E, R, K/32, 16] + `*_scales` U8 [E, R, K/32].

The blocks are MXFP4 in [out, in] orientation with K split into (K/32 blocks x 16 bytes), low nibble =
even k: merging the last two axes gives MXFP4Tensor.packed. In gate_up_proj the rows interleave gate and
up: row 2j = gate_j, row 2j + 1 = up_j.
"""

import jax
import jax.numpy as jnp

from jaxq.formats import _checks
from jaxq.formats.mxfp4 import BLOCK, MXFP4Tensor

_BYTES_PER_BLOCK = BLOCK // 2


def from_gpt_oss_mxfp4(blocks, scales) -> MXFP4Tensor:
    """`blocks` U8 [..., R, K/32, 16], `scales` U8 E8M0 [..., R, K/32] -> MXFP4Tensor [..., R, K]."""
    fn = "from_gpt_oss_mxfp4"
    _checks.check_dtype(fn, "blocks", blocks, jnp.uint8)
    _checks.check_rank(fn, "blocks", blocks, 3)
    _checks.check_shape(fn, "blocks", blocks, (*blocks.shape[:-1], _BYTES_PER_BLOCK), "16 bytes per block of 32")
    _checks.check_dtype(fn, "scales", scales, jnp.uint8)
    _checks.check_shape(fn, "scales", scales, blocks.shape[:-1], "one E8M0 scale per block")
    return MXFP4Tensor(packed=blocks.reshape(*blocks.shape[:-2], -1), scale=scales)


def to_gpt_oss_mxfp4(t: MXFP4Tensor) -> dict:
    """Inverse of from_gpt_oss_mxfp4: {"blocks": [..., R, K/32, 16], "scales": [..., R, K/32]}."""
    return {"blocks": t.packed.reshape(*t.scale.shape, _BYTES_PER_BLOCK), "scales": t.scale}


def deinterleave_gate_up(t: MXFP4Tensor):
    """gate_up_proj [..., 2I, H] -> (gate [..., I, H], up [..., I, H]): rows 0::2 and 1::2."""
    _checks.check_multiple("deinterleave_gate_up", "t", "rows", t.shape[-2], 2, "gate and up rows interleaved")
    return (jax.tree_util.tree_map(lambda a: a[..., 0::2, :], t),
            jax.tree_util.tree_map(lambda a: a[..., 1::2, :], t))


def interleave_gate_up(gate: MXFP4Tensor, up: MXFP4Tensor) -> MXFP4Tensor:
    """Inverse of deinterleave_gate_up: row 2j = gate_j, row 2j + 1 = up_j."""
    def merge(g, u):
        return jnp.stack([g, u], axis=-2).reshape(*g.shape[:-2], 2 * g.shape[-2], g.shape[-1])
    return jax.tree_util.tree_map(merge, gate, up)
