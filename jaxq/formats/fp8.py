"""FP8 E4M3 arrays with float32 scales: per tensor, per channel/token, 1 x b groups, b x b blocks.

Spec sections 2.1 (per tensor), 2.2 (rowwise), 2.3 (DeepSeek-style blocks and activation groups).
"""

import functools

import jax
import jax.numpy as jnp
from flax import struct

from jaxq.formats import _checks
from jaxq.formats._blocking import ceil_div, expand_trailing, matrix_axes, pad_to_multiple
from jaxq.formats.elements import E4M3_MAX, decode_e8m0, encode_e8m0, exact_divide, to_e4m3

GRANULARITIES = ("tensor", "channel", "token", "group", "block")

# DeepSeek act_quant / TRT-LLM fp8_quantize_1x128 floor for an activation group's amax (spec 2.3).
GROUP_AMAX_FLOOR = 1e-4
# ModelOpt's fake quant treats an amax at or below 2**-24 as 1.0 (an unused quantizer).
_TINY_AMAX = 2.0**-24


@struct.dataclass
class FP8Tensor:
    """E4M3 data with float32 dequantization scales: original ~= dequantize() = f32(data) * scale.

    `data` is float8_e4m3fn of the original shape [..., N, K] (weights, HF orientation) or [..., T, K]
    (activations). `scale` (float32, "scale" = dequant multiplier = amax / 448) by granularity:
      tensor:  [...]                       one per trailing 2-D matrix ([] for a 2-D array; [E] for
                                           stacked MoE weights [E, N, K])
      channel: [..., N]                    weights, one per output row
      token:   [..., T]                    activations, one per row of x
      group:   [..., T, ceil(K/b)]         activations, 1 x b groups along K
      block:   [..., ceil(N/b), ceil(K/b)] weights, b x b blocks; edge blocks may be partial
    so W[n, k] = f32(data[n, k]) * scale[n // b, k // b] for blocks, and likewise for the others.
    """

    data: jax.Array
    scale: jax.Array
    granularity: str = struct.field(pytree_node=False)
    block_size: int = struct.field(pytree_node=False, default=128)

    @property
    def shape(self):
        return self.data.shape

    @functools.partial(jax.jit, static_argnames="dtype")
    def dequantize(self, dtype=jnp.float32):
        """f32(data) * scale broadcast to data's shape, cast to dtype."""
        x = self.data.astype(jnp.float32)
        return (x * _broadcast_scale(self.scale, x.shape, self.granularity, self.block_size)).astype(dtype)


def _broadcast_scale(scale, shape, granularity, b):
    if granularity == "tensor":
        return expand_trailing(scale, len(shape))
    if granularity in ("channel", "token"):
        return scale[..., None]
    if granularity == "block":
        scale = jnp.repeat(scale, b, axis=-2)[..., : shape[-2], :]
    return jnp.repeat(scale, b, axis=-1)[..., : shape[-1]]


def quantize_fp8(x, granularity: str, *, block_size: int = 128, scale=None, pow2_scale: bool = False) -> FP8Tensor:
    """Quantize x [..., N, K] (or [..., T, K]) to E4M3: q = sat_e4m3(x / scale), in float32.

    Dynamic scales are scale = amax / 448 over each region of `granularity` (see FP8Tensor); an all-zero
    region gets scale 1.0 (ModelOpt exports a zero amax as the max bound), so nothing is ever 0/0. For
    "group" (activations) amax is floored at 1e-4 as DeepSeek and TRT-LLM do. "block" and "group" take
    partial edge blocks: the array is zero-padded to a multiple of block_size, scaled, and cropped back.
    scale: a given (static, calibrated) per-tensor scale, e.g. a checkpoint's input_scale; only with
      granularity "tensor". Must broadcast to x.shape[:-2].
    pow2_scale: round each dynamic scale up to a power of two (DeepSeek V3.1 `scale_fmt: "ue8m0"`).
    """
    fn = "quantize_fp8"
    x = jnp.asarray(x)
    _checks.check_choice(fn, "granularity", granularity, GRANULARITIES)
    _checks.check_quantizer_input(fn, "x", x, 2 if granularity in ("channel", "token", "block") else 1)
    if scale is not None:
        if granularity != "tensor":
            raise ValueError(f"quantize_fp8: a given scale needs granularity 'tensor', got {granularity!r}")
        scale = jnp.asarray(scale, jnp.float32)
        _checks.check_positive(fn, "scale", scale)
        scale = jnp.broadcast_to(scale, x.shape[:-2])
    return _quantize_fp8(x, scale, granularity=granularity, block_size=block_size, pow2_scale=pow2_scale)


@functools.partial(jax.jit, static_argnames=("granularity", "block_size", "pow2_scale"))
def _quantize_fp8(x, scale, *, granularity, block_size, pow2_scale):
    xf = x.astype(jnp.float32)
    if scale is None:
        scale = _dynamic_scale(xf, granularity, block_size)
        if pow2_scale:
            scale = decode_e8m0(encode_e8m0(scale))
    return FP8Tensor(
        data=to_e4m3(exact_divide(xf, _broadcast_scale(scale, x.shape, granularity, block_size))),
        scale=scale,
        granularity=granularity,
        block_size=block_size,
    )


def _dynamic_scale(xf, granularity, b):
    a = jnp.abs(xf)
    if granularity == "tensor":
        amax = jnp.max(a, axis=matrix_axes(a))
    elif granularity in ("channel", "token"):
        amax = jnp.max(a, axis=-1)
    elif granularity == "group":
        ap = pad_to_multiple(a, -1, b)
        amax = jnp.max(ap.reshape(*a.shape[:-1], -1, b), axis=-1)
        return exact_divide(jnp.maximum(amax, GROUP_AMAX_FLOOR), E4M3_MAX)
    else:  # block
        ap = pad_to_multiple(pad_to_multiple(a, -1, b), -2, b)
        nb_n, nb_k = ceil_div(a.shape[-2], b), ceil_div(a.shape[-1], b)
        amax = jnp.max(ap.reshape(*a.shape[:-2], nb_n, b, nb_k, b), axis=(-3, -1))
    return jnp.where(amax == 0, 1.0, exact_divide(amax, E4M3_MAX))


def fake_quant_fp8_static(x, scale, dtype=None):
    """ModelOpt's static per-tensor FP8 fake quant, bit for bit (what its exported checkpoints assume).

    With `scale` the exported dequant scale (input_scale, k_scale/v_scale, or W4A8's weight_scale_2),
    all in float32 and in this order: amax = scale * 448 (an amax <= 2**-24 becomes 1.0),
    s = 448 / amax, q = e4m3(clamp(x * s, -448, 448)), x_hat = f32(q) * (1 / s).
    Computing x / scale instead rounds differently and is not exact. Returns x_hat in dtype
    (default x.dtype).
    """
    x = jnp.asarray(x)
    _checks.check_floating("fake_quant_fp8_static", "x", x)
    return _fake_quant_fp8_static(x, jnp.asarray(scale, jnp.float32), dtype=dtype or x.dtype)


def quantize_fp8_static_modelopt(x, scale) -> FP8Tensor:
    """The codes of fake_quant_fp8_static: FP8Tensor(data=q, scale=1 / s, "tensor") for x [..., K] and a
    scalar `scale`, with q and s exactly as there, so dequantize() equals fake_quant_fp8_static(x, scale)
    in float32 bit for bit. For FP8 GEMM kernels that must start from the reference's own codes
    (quantize_fp8(x, "tensor", scale=scale) divides by scale instead, which differs at E4M3 ties)."""
    x = jnp.asarray(x)
    _checks.check_floating("quantize_fp8_static_modelopt", "x", x)
    scale = jnp.asarray(scale, jnp.float32)
    _checks.check_shape("quantize_fp8_static_modelopt", "scale", scale, (), "one per-tensor scale")
    return _quantize_fp8_static_modelopt(x, scale)


@jax.jit
def _quantize_fp8_static_modelopt(x, scale):
    q, inv_s = _static_codes(x, scale)
    return FP8Tensor(data=q, scale=inv_s, granularity="tensor")


def _static_codes(x, scale):
    """(q, 1 / s) of fake_quant_fp8_static, float32 throughout."""
    amax = scale * E4M3_MAX
    amax = jnp.where(amax <= _TINY_AMAX, 1.0, amax)
    s = exact_divide(E4M3_MAX, amax)
    return to_e4m3(x.astype(jnp.float32) * s), exact_divide(1.0, s)


@functools.partial(jax.jit, static_argnames="dtype")
def _fake_quant_fp8_static(x, scale, *, dtype):
    q, inv_s = _static_codes(x, scale)
    return (q.astype(jnp.float32) * inv_s).astype(dtype)
