"""MXFP4 (OCP microscaling FP4): E2M1 elements in blocks of 32 along K, one E8M0 power-of-two scale per block.

Spec section 2.5 (ModelOpt's rule, reproduced here) and 5.2 (GPT-OSS stores the same element layout).
"""

import functools

import jax
import jax.numpy as jnp
from flax import struct

from jaxq.formats import _checks
from jaxq.formats._packed import Packed4
from jaxq.formats._blocking import from_blocks, to_blocks
from jaxq.formats.elements import (E2M1_MAX, E8M0_BIAS, decode_e2m1, decode_e8m0, encode_e2m1, encode_e8m0,
                                   exact_divide, exp2_int, pack_nibbles)

BLOCK = 32


@struct.dataclass
class MXFP4Tensor(Packed4):
    """MXFP4 array: W[..., n, k] = e2m1(code[..., n, k]) * 2**(scale[..., n, k // 32] - 127).

    packed: uint8 [..., N, K/2], byte j = code[2j] | code[2j+1] << 4 (low nibble = even k).
    scale:  uint8 [..., N, K/32], E8M0 (bias 127; 255 = NaN), ModelOpt `weight_scale`, GPT-OSS `*_scales`.
    """

    packed: jax.Array
    scale: jax.Array

    @functools.partial(jax.jit, static_argnames="dtype")
    def dequantize(self, dtype=jnp.float32):
        """e2m1 * 2**(scale - 127), exact in float32 (a power-of-two product)."""
        values = to_blocks(decode_e2m1(self.codes()), BLOCK) * decode_e8m0(self.scale)[..., None]
        return from_blocks(values).astype(dtype)


def quantize_mxfp4(w) -> MXFP4Tensor:
    """Quantize w [..., N, K] (K % 32 == 0) with ModelOpt's MXFP4 rule, in float32:

      e = clip(ceil(log2(amax_block / 6)), -127, 127), scale = e + 127
      code = e2m1(w / 2**e), exact midpoints rounded toward the smaller magnitude

    The ceil keeps |w / 2**e| <= 6, so nothing saturates. ceil(log2) is computed exactly from the float
    bits (ModelOpt uses torch.log2, which agrees except within float32 rounding just above a power of
    two). An all-zero block gets scale byte 0 (2**-127) and zero codes. ModelOpt writes an exact 0 as
    code 8 (-0); this writes code 0 (+0): the same value.
    """
    fn = "quantize_mxfp4"
    w = jnp.asarray(w)
    _checks.check_quantizer_input(fn, "w", w, 1, BLOCK, "MXFP4 block size")
    return _quantize_mxfp4(w)


@jax.jit
def _quantize_mxfp4(w):
    wb = to_blocks(w.astype(jnp.float32), BLOCK)
    scale = encode_e8m0(exact_divide(jnp.max(jnp.abs(wb), axis=-1), E2M1_MAX))
    # w / 2**e as w * 2**-e: exact for these powers of two; -e >= -126 since a finite amax / 6 < 2**126
    inv = exp2_int(E8M0_BIAS - scale.astype(jnp.int32))
    codes = encode_e2m1(wb * inv[..., None], ties="down")
    return MXFP4Tensor(packed=pack_nibbles(from_blocks(codes)), scale=scale)
