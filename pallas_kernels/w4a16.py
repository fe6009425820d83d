"""W4A16: bf16 activations x packed INT4 weights with per-group scales (symmetric or with zeros, optional
act-order), on the shared packed-4 skeleton (packed4.py).

Weight layout (canonical, as jaxq.formats produces it):
  packed  uint8 [N, K/2], unsigned codes u in [0, 15], low nibble = even k
  scale   [N, K/G] bf16 / f16 / f32, G in {32, 64, 128} (any power of two >= 32)
  zero    None (symmetric: implicit zero 8) or [N, K/G] (any numeric dtype, may be fractional)
  W[n, k] = (u[n, k] - zero[n, k // G]) * scale[n, k // G]
Act-order (GPTQ desc_act): `prepare_act_order` permutes the weight columns once at load time so every
group is contiguous, and returns `perm`; each call then gathers x[:, perm] once (not the weights).

Numerics (kernel and reference): the weights are exact, products are exact in f32, accumulation is f32,
the result is rounded once to x.dtype. The kernel feeds 128 + u to the MMA and subtracts
(128 + zero) * sum_k x per group afterwards (see packed4.py); the cancellation costs about 1e-6
relative, far below the bf16 output rounding. Tolerance stated by the tests: |y - ref| <= 1e-2 * |ref|
+ 1e-2 * rms(ref).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _common as cm
from pallas_kernels import packed4 as p4
from pallas_kernels.packed4 import Packed4Config


def _format(k: int, scale, zero) -> p4.Packed4Format:
    return p4.Packed4Format(kind="int4", group=k // scale.shape[1], asym=zero is not None)


def w4a16_default_config(m: int, n: int, k: int, group: int, asym: bool = False) -> Packed4Config:
    """The tuned table in dispatch.py refines this; this is the shape-only heuristic."""
    return p4.default_config(p4.Packed4Format("int4", group, asym=asym), m, n, k)


def can_use_w4a16_matmul(x, packed, scale, zero=None, config: Packed4Config | None = None) -> bool:
    """True when the kernel supports these shapes/dtypes (and the config, if given); else the wrapper
    runs the reference."""
    if x.ndim != 2 or packed.ndim != 2 or scale.ndim != 2 or x.dtype != jnp.bfloat16:
        return False
    m, k = x.shape
    n = packed.shape[0]
    if packed.dtype != jnp.uint8 or packed.shape[1] * 2 != k or scale.shape[0] != n or k % scale.shape[1]:
        return False
    if zero is not None and zero.shape != scale.shape:
        return False
    fmt = _format(k, scale, zero)
    if not p4.shape_is_supported(fmt, m, n, k) or fmt.group < 32:
        return False
    return config is None or p4.config_is_valid(fmt, config)


def w4a16_dequantize(packed, scale, zero=None, g_idx=None) -> jax.Array:
    """W [N, K] f32 = (u - zero[group]) * scale[group]; group = k // G, or g_idx[k] under act-order.
    Without g_idx the scales broadcast over [N, K/G, G] (no gather: one streaming XLA fusion)."""
    u = cm.unpack_nibbles(packed).astype(jnp.float32)                          # [N, K]
    n, k = u.shape
    if g_idx is not None:
        s = jnp.take(scale.astype(jnp.float32), g_idx, axis=1)                 # [N, K]
        z = 8.0 if zero is None else jnp.take(zero.astype(jnp.float32), g_idx, axis=1)
        return (u - z) * s
    ng = scale.shape[1]
    z = 8.0 if zero is None else zero.astype(jnp.float32)[:, :, None]
    w = (u.reshape(n, ng, k // ng) - z) * scale.astype(jnp.float32)[:, :, None]  # [N, K/G, G]
    return w.reshape(n, k)


def w4a16_matmul_reference(x, packed, scale, zero=None, g_idx=None) -> jax.Array:
    """Pure jnp: y = x @ W^T in f32 (exact weights, HIGHEST precision), rounded to x.dtype.
    g_idx [K] int32 (act-order) maps each k to its group; None means k // G."""
    w = w4a16_dequantize(packed, scale, zero, g_idx)
    y = jnp.dot(x.astype(jnp.float32), w.T, precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def w4a16_matmul(x, packed, scale, zero=None, perm=None, *, config: Packed4Config | None = None,
                 interpret: bool = False) -> jax.Array:
    """y [M, N] = x [M, K] @ W^T in x.dtype (bf16), W as in the module docstring.

    perm: [K] int32 from `prepare_act_order` (then packed/scale/zero are the permuted ones); x is
    gathered once as x[:, perm]. config: static tuning knobs, None = default heuristic. Shapes the kernel
    does not support run `w4a16_matmul_reference` instead of failing."""
    if perm is not None:
        x = jnp.take(x, perm, axis=1)
    m, k = x.shape
    fmt = _format(k, scale, zero) if scale.ndim == 2 and k % scale.shape[1] == 0 else None
    if config is None and fmt is not None:
        config = p4.default_config(fmt, m, packed.shape[0], k)
    if not can_use_w4a16_matmul(x, packed, scale, zero, config):
        return w4a16_matmul_reference(x, packed, scale, zero)
    return p4.packed4_matmul(x, packed, scale, zero, fmt=fmt, config=config, out_dtype=x.dtype,
                             interpret=interpret)


def prepare_act_order(packed, scale, zero, g_idx):
    """Load-time conversion for act-order (GPTQ desc_act) checkpoints.

    Returns (packed', scale, zero, perm): the weight columns permuted by perm = stable argsort(g_idx), so
    column j of packed' belongs to group j // G (scales and zeros are indexed by group and stay as they
    are). Then w4a16_matmul(x, packed', scale, zero, perm) == w4a16_matmul_reference(x, packed, scale,
    zero, g_idx). Raises ValueError when the groups are not all of size G (not a GPTQ g_idx)."""
    g_idx = np.asarray(g_idx)
    k = g_idx.shape[0]
    group = k // scale.shape[1]
    perm = np.argsort(g_idx, kind="stable").astype(np.int32)
    if not np.array_equal(g_idx[perm], np.arange(k) // group):
        raise ValueError(
            f"g_idx does not put exactly {group} columns in each of {scale.shape[1]} groups; "
            "cannot make groups contiguous (check the checkpoint's group_size and g_idx)")
    codes = cm.unpack_nibbles(jnp.asarray(packed))
    return cm.pack_nibbles(codes[:, perm]), scale, zero, jnp.asarray(perm)
