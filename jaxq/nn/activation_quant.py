"""Run-time activation quantizers of the recipes (Recipe.activation), as the producers' fake quant.

Each returns x_hat in float32, the value the producer's fake-quantized model feeds its matmul:

  none        x_hat = x
  fp8_static  ModelOpt static per-tensor FP8 (jaxq.formats.fake_quant_fp8_static): amax = input_scale * 448,
              s = 448 / amax, x_hat = f32(e4m3(clamp(x * s, +-448))) * (1 / s)
  fp8_token   llm-compressor FP8_DYNAMIC per token (compressed-tensors order): per row of the last axis
              scale = max(max|x_t| / 448, eps_f32), x_hat = f32(e4m3(clamp(x / scale, +-448))) * scale
  fp8_group   DeepSeek / TRT-LLM 1 x 128 groups along K (jaxq.formats.quantize_fp8 "group"):
              s = max(amax_g, 1e-4) / 448, x_hat = f32(e4m3(x / s)) * s; a partial last group is allowed
  nvfp4       ModelOpt dynamic NVFP4 over 16-blocks with global scale input_scale
              (jaxq.formats.fake_quant_nvfp4); K must be a multiple of 16
"""

import functools

import jax
import jax.numpy as jnp

from jaxq.formats import (E4M3_MAX, FP8Tensor, exact_divide, fake_quant_fp8_static, fake_quant_nvfp4, quantize_fp8,
                          to_e4m3)

STATIC_MODES = ("fp8_static", "nvfp4")  # the modes that read a calibrated input_scale
_F32_EPS = float(jnp.finfo(jnp.float32).eps)  # compressed-tensors' floor of a per-token scale


def fake_quant_activation(x: jax.Array, mode: str, input_scale: jax.Array | None = None) -> jax.Array:
    """x [..., K] -> x_hat [..., K] float32 per `mode` (module docstring). Static modes need input_scale."""
    xf = x.astype(jnp.float32)
    if mode == "none":
        return xf
    if mode in STATIC_MODES and input_scale is None:
        raise ValueError(f"activation mode {mode!r} needs a calibrated input_scale, got None")
    if mode == "fp8_static":
        return fake_quant_fp8_static(xf, input_scale)
    if mode == "nvfp4":
        return fake_quant_nvfp4(xf, input_scale)
    if mode in ("fp8_token", "fp8_group"):
        return quantize_activation_fp8(xf, mode).dequantize(jnp.float32)
    raise ValueError(f"unknown activation mode {mode!r}; expected one of none, fp8_static, fp8_token, "
                     "fp8_group, nvfp4")


def quantize_activation_fp8(x: jax.Array, mode: str, input_scale: jax.Array | None = None) -> FP8Tensor:
    """E4M3 codes and float32 scales of x [..., K] for FP8 GEMM kernels: fp8_token and fp8_group exactly as
    fake_quant_activation (x_hat = dequantize()); fp8_static as the TRT-LLM/vLLM run time,
    e4m3(x / input_scale) per tensor (ModelOpt's fake quant rounds x * (448 / amax) instead)."""
    if mode == "fp8_static":
        return quantize_fp8(x, "tensor", scale=input_scale)
    if mode == "fp8_token":
        return _quantize_token(x)
    if mode == "fp8_group":
        return quantize_fp8(x, "group", block_size=128)
    raise ValueError(f"activation mode {mode!r} has no FP8 codes; expected fp8_static, fp8_token or fp8_group")


@jax.jit
def _quantize_token(x) -> FP8Tensor:
    # Not quantize_fp8(x, "token"): that maps an all-zero row to scale 1.0, compressed-tensors floors at eps.
    xf = x.astype(jnp.float32)
    scale = jnp.maximum(exact_divide(jnp.max(jnp.abs(xf), axis=-1), E4M3_MAX), _F32_EPS)
    return FP8Tensor(data=to_e4m3(exact_divide(xf, scale[..., None])), scale=scale, granularity="token")


@functools.partial(jax.jit, static_argnames="dtype")
def apply_pre_quant_scale(x: jax.Array, pre_quant_scale: jax.Array | None, dtype=jnp.float32) -> jax.Array:
    """AWQ smoothing x * pre_quant_scale [K], computed in float32 and returned in dtype (x unchanged when
    pre_quant_scale is None)."""
    if pre_quant_scale is None:
        return x.astype(dtype)
    return (x.astype(jnp.float32) * pre_quant_scale.astype(jnp.float32)).astype(dtype)
