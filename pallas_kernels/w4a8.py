"""W4A8: FP8 E4M3 activations (static per-tensor scale) x INT4 weights on the FP8 tensor cores, on the
shared packed-4 skeleton (packed4.py).

Layout (the INT4 canonical one, symmetric): packed uint8 [N, K/2] with codes u = q + 8 (q in [-8, 7]),
low nibble = even k; weight_scale [N, K/G] (G = 64 or 128); input_scale f32 scalar.

Numerics (chosen here; kernel and reference):
  x_q = e4m3_sat(x / input_scale)                                  (f32 division, RNE, clip +-448)
  y[m, n] = input_scale * sum_g weight_scale[n, g] * sum_{k in g} x_q[m, k] * q[n, k]
with each inner group sum an fp8 x fp8 MMA accumulated in f32, rescaled per group in the accumulator,
and one rounding to x.dtype. q is exact in E4M3, so the weights lose nothing.
This differs from TensorRT-LLM's W4A8_AWQ (spec 2.7), which feeds the MMA e4m3(q * weight_scale /
weight_scale_2) and multiplies by input_scale * weight_scale_2: that rounds every weight to 3 mantissa
bits (up to 6% per weight). Rescaling per group instead keeps the INT4 weights exact, so
`weight_scale_2` is not needed by this GEMM (a loader may ignore it). Both ways compute the same
model up to that weight rounding. Tolerance stated by the tests: |y - ref| <= 1e-2 * |ref| +
1e-2 * rms(ref) (x_q is bit-identical; only the f32 summation order differs).
"""
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _common as cm
from pallas_kernels import packed4 as p4
from pallas_kernels.packed4 import Packed4Config


def _format(k: int, weight_scale) -> p4.Packed4Format:
    return p4.Packed4Format(kind="int4", group=k // weight_scale.shape[1], act="fp8", has_global=True)


def w4a8_default_config(m: int, n: int, k: int, group: int) -> Packed4Config:
    return p4.default_config(p4.Packed4Format("int4", group, act="fp8", has_global=True), m, n, k)


def can_use_w4a8_matmul(x, packed, weight_scale, config: Packed4Config | None = None) -> bool:
    """True when the kernel supports these shapes/dtypes (and config); else the wrapper runs the reference."""
    if x.ndim != 2 or packed.ndim != 2 or weight_scale.ndim != 2 or packed.dtype != jnp.uint8:
        return False
    m, k = x.shape
    n = packed.shape[0]
    if packed.shape[1] * 2 != k or weight_scale.shape[0] != n or k % weight_scale.shape[1]:
        return False
    fmt = _format(k, weight_scale)
    if not p4.shape_is_supported(fmt, m, n, k) or fmt.group < 64:      # fp8 MMA depth >= 32 per nibble
        return False
    return config is None or p4.config_is_valid(fmt, config)


def w4a8_matmul_reference(x, packed, weight_scale, input_scale) -> jax.Array:
    """Pure jnp, the numerics of the module docstring."""
    xq = cm.quantize_fp8_static(x, input_scale).astype(jnp.float32)               # [M, K]
    q = cm.unpack_nibbles(packed).astype(jnp.float32) - 8.0                       # [N, K]
    m, k = x.shape
    n, ng = weight_scale.shape
    part = jnp.einsum("mgk,ngk->mng", xq.reshape(m, ng, k // ng), q.reshape(n, ng, k // ng),
                      precision=jax.lax.Precision.HIGHEST)                       # [M, N, groups]
    y = jnp.sum(part * weight_scale.astype(jnp.float32)[None], axis=-1)
    return (y * jnp.asarray(input_scale, jnp.float32)).astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def w4a8_matmul(x, packed, weight_scale, input_scale, *, config: Packed4Config | None = None,
                interpret: bool = False) -> jax.Array:
    """y [M, N] = x [M, K] @ W^T in x.dtype, W4A8 numerics of the module docstring. x is quantized to
    E4M3 once per call (one XLA fusion that a preceding norm can absorb), then the kernel runs on fp8."""
    m, k = x.shape
    ok_shapes = weight_scale.ndim == 2 and k % weight_scale.shape[1] == 0
    if config is None and ok_shapes:
        config = p4.default_config(_format(k, weight_scale), m, packed.shape[0], k)
    if not can_use_w4a8_matmul(x, packed, weight_scale, config):
        return w4a8_matmul_reference(x, packed, weight_scale, input_scale)
    xq = cm.quantize_fp8_static(x, input_scale)
    return p4.packed4_matmul(xq, packed, weight_scale, None, input_scale, fmt=_format(k, weight_scale),
                             config=config, out_dtype=x.dtype, interpret=interpret)
