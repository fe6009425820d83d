"""FP4 weight-only GEMMs (NVFP4, MXFP4) x bf16 activations on the shared packed-4 skeleton (packed4.py).
Hopper has no FP4 tensor cores: E2M1 is decoded in registers to bf16 and multiplied on the bf16 MMA.

Weight layouts (canonical):
  NVFP4: packed uint8 [N, K/2] (low nibble = even k; code = sign*8 + idx into {0,.5,1,1.5,2,3,4,6}),
         block_scale float8_e4m3fn [N, K/16], global_scale f32 scalar;
         W = e2m1(code) * f32(block_scale[n, k // 16]) * global_scale
  MXFP4: packed uint8 [N, K/2], scale uint8 E8M0 [N, K/32]; W = e2m1(code) * 2^(scale[n, k // 32] - 127)
         The kernel builds 2^(u - 127) from exponent bits, valid for u <= 248 (scales up to 2^121; real
         weights sit far below); E8M0 NaN (255) is not special-cased.

Numerics (kernel and reference): e2m1 x block scale is exact in bf16 (<= 6 significant bits), products
with bf16 x are exact in f32, accumulation f32, NVFP4's global scale multiplies the f32 result once,
one rounding to bf16 at the end. Tolerance stated by the tests: |y - ref| <= 1e-2 * |ref| + 1e-2 * rms(ref).
"""
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _common as cm
from pallas_kernels import packed4 as p4
from pallas_kernels.packed4 import Packed4Config

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
NVFP4 = p4.Packed4Format(kind="nvfp4", group=16, has_global=True)
MXFP4 = p4.Packed4Format(kind="mxfp4", group=32)


def e2m1_decode(codes) -> jax.Array:
    """uint8 codes [0, 15] -> f32 values (table lookup; the reference path)."""
    return jnp.asarray(E2M1_VALUES, jnp.float32)[codes.astype(jnp.int32)]


def nvfp4_dequantize(packed, block_scale, global_scale) -> jax.Array:
    """W [N, K] f32."""
    v = e2m1_decode(cm.unpack_nibbles(packed))
    s = jnp.repeat(block_scale.astype(jnp.float32), 16, axis=1)
    return v * s * jnp.asarray(global_scale, jnp.float32)


def e8m0_to_f32(scale) -> jax.Array:
    """E8M0 scale bytes u -> 2^(u - 127) in f32."""
    return jnp.ldexp(jnp.float32(1.0), scale.astype(jnp.int32) - 127)


def mxfp4_dequantize(packed, scale) -> jax.Array:
    """W [N, K] f32."""
    v = e2m1_decode(cm.unpack_nibbles(packed))
    return v * jnp.repeat(e8m0_to_f32(scale), 32, axis=1)


def nvfp4_matmul_reference(x, packed, block_scale, global_scale) -> jax.Array:
    """Pure jnp: (x @ (e2m1 * block_scale)^T in f32) * global_scale, rounded to x.dtype."""
    w = nvfp4_dequantize(packed, block_scale, 1.0)
    y = jnp.dot(x.astype(jnp.float32), w.T, precision=jax.lax.Precision.HIGHEST)
    return (y * jnp.asarray(global_scale, jnp.float32)).astype(x.dtype)


def mxfp4_matmul_reference(x, packed, scale) -> jax.Array:
    """Pure jnp: x @ W^T in f32, rounded to x.dtype."""
    w = mxfp4_dequantize(packed, scale)
    return jnp.dot(x.astype(jnp.float32), w.T, precision=jax.lax.Precision.HIGHEST).astype(x.dtype)


def fp4_default_config(fmt: p4.Packed4Format, m: int, n: int, k: int) -> Packed4Config:
    return p4.default_config(fmt, m, n, k)


def can_use_fp4_matmul(fmt: p4.Packed4Format, x, packed, scale, config: Packed4Config | None = None) -> bool:
    """True when the kernel supports these shapes/dtypes (and config); else the wrapper runs the reference.
    x: bf16, or E4M3 codes for fmt.act == 'fp8' (w4a8_fp4.py); only its shape and dtype are read."""
    want_x = jnp.float8_e4m3fn if fmt.act == "fp8" else jnp.bfloat16
    if x.ndim != 2 or packed.ndim != 2 or x.dtype != want_x or packed.dtype != jnp.uint8:
        return False
    m, k = x.shape
    n = packed.shape[0]
    want_scale = jnp.float8_e4m3fn if fmt.kind == "nvfp4" else jnp.uint8
    if packed.shape[1] * 2 != k or scale.dtype != want_scale or scale.shape != (n, k // fmt.group):
        return False
    if not p4.shape_is_supported(fmt, m, n, k):
        return False
    return config is None or p4.config_is_valid(fmt, config)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def nvfp4_matmul(x, packed, block_scale, global_scale, *, config: Packed4Config | None = None,
                 interpret: bool = False) -> jax.Array:
    """y [M, N] = x [M, K] (bf16) @ W^T for NVFP4 weights (layout in the module docstring)."""
    m, k = x.shape
    config = config or fp4_default_config(NVFP4, m, packed.shape[0], k)
    if not can_use_fp4_matmul(NVFP4, x, packed, block_scale, config):
        return nvfp4_matmul_reference(x, packed, block_scale, global_scale)
    return p4.packed4_matmul(x, packed, block_scale, None, global_scale, fmt=NVFP4, config=config,
                             out_dtype=x.dtype, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def mxfp4_matmul(x, packed, scale, *, config: Packed4Config | None = None,
                 interpret: bool = False) -> jax.Array:
    """y [M, N] = x [M, K] (bf16) @ W^T for MXFP4 weights (layout in the module docstring)."""
    m, k = x.shape
    config = config or fp4_default_config(MXFP4, m, packed.shape[0], k)
    if not can_use_fp4_matmul(MXFP4, x, packed, scale, config):
        return mxfp4_matmul_reference(x, packed, scale)
    return p4.packed4_matmul(x, packed, scale, fmt=MXFP4, config=config, out_dtype=x.dtype,
                             interpret=interpret)
