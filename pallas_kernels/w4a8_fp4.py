"""W4A8 with FP4 weights: FP8 E4M3 activations (static per-tensor scale) x MXFP4 or NVFP4 weights on the
FP8 tensor cores, on the shared packed-4 skeleton (packed4.py, block-MMA mode).

Inputs:
  xq       float8_e4m3fn [M, K]: the activation codes, quantized by the caller with a static per-tensor
           scale; x_scale f32 []: their dequant multiplier (x ~ f32(xq) * x_scale). ModelOpt's codes (those
           of QDense's reference fake quant) come from jaxq.formats.quantize_fp8_static_modelopt;
           pallas_kernels.dispatch quantizes as e4m3(x / input_scale). QDense does not select this kernel
           yet: it is wired in once it has been compiled and timed on a GPU (benchmarks/gemm.py); until
           then QDense runs these recipes on the bf16 FP4 kernel (fp4.py) with fake-quantized x.
  MXFP4    packed uint8 [N, K/2] (low nibble = even k), scale uint8 E8M0 [N, K/32] (valid for u <= 248)
  NVFP4    packed uint8 [N, K/2], block_scale float8_e4m3fn [N, K/16], global_scale f32 []
  (weight layouts as in fp4.py, the canonical ones of jaxq.formats).

In jaxq, MXFP4 x FP8 is the recipe get_recipe("mxfp4", activation="fp8_static") (ModelOpt's
W4A8_MXFP4_FP8); NVFP4 x FP8 only the override get_recipe("nvfp4", activation="fp8_static"), which QDense
and jaxq.quantize handle but no checkpoint loader produces (the ModelOpt loader refuses W4A8_NVFP4_FP8).

Numerics (kernel and reference):
  y[m, n] = x_scale (* global_scale) * sum_b s[n, b] * sum_{k in b} xq[m, k] * e2m1[n, k]
E2M1 values are exact in E4M3, so the codes enter the FP8 MMA unscaled; every product xq * e2m1 is exact
(<= 6 significant bits); each block's products are summed by one MMA (NVFP4: 16-blocks below the 32-deep
FP8 MMA, summed exactly by zeroing the other block's lanes, see packed4.py), scaled by the block's scale in
the f32 accumulator, the per-tensor factor x_scale (NVFP4: x_scale * global_scale, one f32 product)
multiplies the sum once, and the result is rounded once to out_dtype. The reference computes the same
model as jaxq's QDense reference for mxfp4 / nvfp4 with activation "fp8_static": (f32(xq) * x_scale) @
dequantize(W)^T in f32 at full precision, W as jaxq.formats' dequantize ((e2m1 * block_scale) *
global_scale for NVFP4). The two differ only by f32 rounding (summation order, where the scales are
applied) and, on Hopper, by the FP8 MMA's narrower-than-f32 internal accumulation (about 14 bits, as
DeepSeek-V3 measured), which here spans one block of at most 32 products before the f32 rescale.
Tolerance stated by the tests: |y - ref| <= 1e-2 * |ref| + 1e-2 * rms(ref).
Shapes and configs the kernel cannot take (fp4.can_use_fp4_matmul with MXFP4_FP8 / NVFP4_FP8) run the
reference instead.
"""
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import fp4
from pallas_kernels import packed4 as p4
from pallas_kernels.packed4 import Packed4Config

MXFP4_FP8 = p4.Packed4Format(kind="mxfp4", group=32, act="fp8", has_global=True)
NVFP4_FP8 = p4.Packed4Format(kind="nvfp4", group=16, act="fp8", has_global=True)


def _x_hat(xq, x_scale):
    return xq.astype(jnp.float32) * jnp.asarray(x_scale, jnp.float32)


def mxfp4_fp8_matmul_reference(xq, x_scale, packed, scale, out_dtype=jnp.bfloat16) -> jax.Array:
    """Pure jnp: (f32(xq) * x_scale) @ W^T in f32, rounded to out_dtype."""
    w = fp4.mxfp4_dequantize(packed, scale)
    return jnp.dot(_x_hat(xq, x_scale), w.T, precision=jax.lax.Precision.HIGHEST).astype(out_dtype)


def nvfp4_fp8_matmul_reference(xq, x_scale, packed, block_scale, global_scale,
                               out_dtype=jnp.bfloat16) -> jax.Array:
    """Pure jnp: (f32(xq) * x_scale) @ ((e2m1 * block_scale) * global_scale)^T in f32, rounded to out_dtype."""
    w = fp4.nvfp4_dequantize(packed, block_scale, global_scale)
    return jnp.dot(_x_hat(xq, x_scale), w.T, precision=jax.lax.Precision.HIGHEST).astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("config", "out_dtype", "interpret"))
def mxfp4_fp8_matmul(xq, x_scale, packed, scale, *, config: Packed4Config | None = None,
                     out_dtype=jnp.bfloat16, interpret: bool = False) -> jax.Array:
    """y [M, N] = (xq * x_scale) @ W^T for E4M3 codes xq [M, K] and MXFP4 weights (module docstring)."""
    m, k = xq.shape
    config = config or p4.default_config(MXFP4_FP8, m, packed.shape[0], k)
    if not fp4.can_use_fp4_matmul(MXFP4_FP8, xq, packed, scale, config):
        return mxfp4_fp8_matmul_reference(xq, x_scale, packed, scale, out_dtype)
    return p4.packed4_matmul(xq, packed, scale, None, x_scale, fmt=MXFP4_FP8, config=config,
                             out_dtype=out_dtype, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("config", "out_dtype", "interpret"))
def nvfp4_fp8_matmul(xq, x_scale, packed, block_scale, global_scale, *, config: Packed4Config | None = None,
                     out_dtype=jnp.bfloat16, interpret: bool = False) -> jax.Array:
    """y [M, N] = (xq * x_scale) @ W^T for E4M3 codes xq [M, K] and NVFP4 weights (module docstring)."""
    m, k = xq.shape
    config = config or p4.default_config(NVFP4_FP8, m, packed.shape[0], k)
    if not fp4.can_use_fp4_matmul(NVFP4_FP8, xq, packed, block_scale, config):
        return nvfp4_fp8_matmul_reference(xq, x_scale, packed, block_scale, global_scale, out_dtype)
    factor = jnp.asarray(x_scale, jnp.float32) * jnp.asarray(global_scale, jnp.float32)
    return p4.packed4_matmul(xq, packed, block_scale, None, factor, fmt=NVFP4_FP8, config=config,
                             out_dtype=out_dtype, interpret=interpret)
