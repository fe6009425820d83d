"""NVFP4: E2M1 elements in blocks of 16 along K, an E4M3 scale per block and a float32 global scale.

Spec section 2.4 (ModelOpt NVFP4, the producer rule reproduced here bit for bit) and the fixtures README
(ModelOpt's dynamic activation fake quant).
"""

import functools

import jax
import jax.numpy as jnp
from flax import struct

from jaxq.formats import _checks
from jaxq.formats._packed import Packed4
from jaxq.formats._blocking import expand_trailing, from_blocks, matrix_axes, to_blocks
from jaxq.formats.elements import (E2M1_MAX, E4M3_MAX, decode_e2m1, encode_e2m1, exact_divide, pack_nibbles,
                                   to_e4m3)

BLOCK = 16
_GLOBAL_MAX = E2M1_MAX * E4M3_MAX  # 2688: largest |value| a block scale * element can reach per global unit


@struct.dataclass
class NVFP4Tensor(Packed4):
    """NVFP4 array: W[..., n, k] = e2m1(code[..., n, k]) * f32(block_scale[..., n, k // 16]) * global_scale[...].

    packed:       uint8 [..., N, K/2], byte j = code[2j] | code[2j+1] << 4 (low nibble = even k);
                  code = sign * 8 + index into (0, .5, 1, 1.5, 2, 3, 4, 6).
    block_scale:  float8_e4m3fn [..., N, K/16] (ModelOpt `weight_scale`).
    global_scale: float32, one per trailing [N, K] matrix: [] for 2-D, [E] for MoE [E, N, K]
                  (ModelOpt `weight_scale_2` = global amax / (6 * 448)).
    The same layout holds activations [..., T, K].
    """

    packed: jax.Array
    block_scale: jax.Array
    global_scale: jax.Array

    @functools.partial(jax.jit, static_argnames="dtype")
    def dequantize(self, dtype=jnp.float32):
        """(e2m1 * f32(block_scale)) * global_scale: the first product is exact, so one rounding in all."""
        values = to_blocks(decode_e2m1(self.codes()), BLOCK) * self.block_scale.astype(jnp.float32)[..., None]
        gs = expand_trailing(self.global_scale.astype(jnp.float32), values.ndim)
        return from_blocks(values * gs).astype(dtype)


def global_scale_from_amax(global_amax):
    """weight_scale_2 = amax / (6 * 448); a zero amax gives 1.0 (ModelOpt exports a zero amax as the max bound)."""
    amax = jnp.asarray(global_amax, jnp.float32)
    return jnp.where(amax == 0, 1.0, exact_divide(amax, _GLOBAL_MAX))


def quantize_nvfp4(w, global_amax=None) -> NVFP4Tensor:
    """Quantize w [..., N, K] (K % 16 == 0) with ModelOpt's NVFP4 rule, in float32:

      weight_scale_2 = A / (6 * 448), A = global_amax or max|w| per trailing [N, K] matrix
      sb  = amax_block / (6 * weight_scale_2), sb == 0 -> 1.0
      block_scale = e4m3(sb)   (round to nearest even, saturating)
      code = e2m1_rne_sat(w / (f32(block_scale) * weight_scale_2))   (uses the rounded block scale)

    global_amax: pass the max over a fused group (q/k/v, gate/up) so its members share weight_scale_2, as
      ModelOpt's exporter does; a scalar or one value per leading (expert) index.
    A block whose e4m3 scale underflows to 0 (amax below ~1e-6 of the global amax) encodes as zeros
    instead of ModelOpt's division by zero; it dequantizes to 0 either way.
    """
    fn = "quantize_nvfp4"
    w = jnp.asarray(w)
    _checks.check_quantizer_input(fn, "w", w, 1, BLOCK, "NVFP4 block size")
    if global_amax is not None:
        global_amax = jnp.broadcast_to(jnp.asarray(global_amax, jnp.float32), w.shape[:-2])
        _checks.check_finite(fn, "global_amax", global_amax)
    return _quantize_nvfp4(w, global_amax)


@jax.jit
def _quantize_nvfp4(w, global_amax):
    wb = to_blocks(w.astype(jnp.float32), BLOCK)
    if global_amax is None:
        global_amax = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=matrix_axes(w))
    ws2 = global_scale_from_amax(global_amax)
    ws2_b = expand_trailing(ws2, wb.ndim - 1)
    sb = exact_divide(jnp.max(jnp.abs(wb), axis=-1), E2M1_MAX * ws2_b)
    block_scale = to_e4m3(jnp.where(sb == 0, 1.0, sb))
    divisor = (block_scale.astype(jnp.float32) * ws2_b)[..., None]
    x = jnp.where(divisor == 0, 0.0, exact_divide(wb, jnp.where(divisor == 0, 1.0, divisor)))
    return NVFP4Tensor(packed=pack_nibbles(from_blocks(encode_e2m1(x))), block_scale=block_scale, global_scale=ws2)


def fake_quant_nvfp4(x, input_scale, dtype=None):
    """ModelOpt's dynamic NVFP4 activation fake quant (its Triton fp4_fake_quant_block), bit for bit.

    In float32, per block of 16 along the last axis, with gs = (input_scale * 2688) / 2688
    (the global amax rebuilt from the checkpoint, then ModelOpt's division; gs <= 0 -> 1e-12):
      sc = f32(e4m3(min(amax_block / (6 * gs), 448))) * gs, sc < 1e-5 -> 1.0
      x_hat = e2m1_rne_sat(x / sc) * sc
    Returns x_hat in dtype (default x.dtype). x's last axis must be a multiple of 16.
    """
    fn = "fake_quant_nvfp4"
    x = jnp.asarray(x)
    _checks.check_floating(fn, "x", x)
    _checks.check_multiple(fn, "x", "K", x.shape[-1], BLOCK, "NVFP4 block size")
    return _fake_quant_nvfp4(x, jnp.asarray(input_scale, jnp.float32), dtype=dtype or x.dtype)


@functools.partial(jax.jit, static_argnames="dtype")
def _fake_quant_nvfp4(x, input_scale, *, dtype):
    gs = exact_divide(input_scale * _GLOBAL_MAX, _GLOBAL_MAX)
    gs = jnp.where(gs > 0, gs, 1e-12)
    xb = to_blocks(x.astype(jnp.float32), BLOCK)
    bmax = jnp.max(jnp.abs(xb), axis=-1, keepdims=True)
    sc = to_e4m3(jnp.minimum(exact_divide(bmax, E2M1_MAX * gs), E4M3_MAX)).astype(jnp.float32) * gs
    sc = jnp.where(sc >= 1e-5, sc, 1.0)
    x_hat = decode_e2m1(encode_e2m1(exact_divide(xb, sc))) * sc
    return from_blocks(x_hat).astype(dtype)
