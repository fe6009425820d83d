"""INT4 weights in groups along K: one canonical in-memory layout, quantizers for each producer's convention.

Spec sections 0.1, 2.6 (ModelOpt), 5.3 (AutoAWQ), 5.4 (GPTQ), 5.6 (compressed-tensors). The on-disk
packings of each producer convert to and from this layout in jaxq.formats.layouts.
"""

import functools

import jax
import jax.numpy as jnp
from flax import struct

from jaxq.formats import _checks
from jaxq.formats._packed import Packed4
from jaxq.formats.elements import exact_divide, pack_nibbles, round_to

SYMMETRIC_ZERO = 8
SCHEMES = ("modelopt", "compressed_tensors", "compressed_tensors_asym", "autoawq", "gptq", "gptq_asym")
SCALE_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_F32_EPS = float(jnp.finfo(jnp.float32).eps)


@struct.dataclass
class Int4Tensor(Packed4):
    """INT4 weight [..., N, K]: W[..., n, k] = (u[..., n, k] - z[..., n, g(k)]) * scale[..., n, g(k)].

    packed:     uint8 [..., N, K/2], unsigned codes u in [0, 15], byte j = u[2j] | u[2j+1] << 4
                (low nibble = even k).
    scale:      [..., N, K/G], float32 or the checkpoint's bf16/f16 (dequant multiplier).
    zero:       None for symmetric: the implicit zero 8, so W = (u - 8) * s, i.e. the signed
                two's-complement q = u - 8 in [-8, 7]; or [..., N, K/G] asymmetric zero points in the
                unsigned domain (uint8 from quantizers and checkpoints, or float).
    g_idx:      None (g(k) = k // G) or int32 [K], GPTQ act-order (g(k) = g_idx[k]).
    group_size: G, static; K for one group per output channel (GPTQ's group_size -1).
    """

    packed: jax.Array
    scale: jax.Array
    group_size: int = struct.field(pytree_node=False)
    zero: jax.Array | None = None
    g_idx: jax.Array | None = None

    @functools.partial(jax.jit, static_argnames="dtype")
    def dequantize(self, dtype=jnp.float32):
        """(u - z) * s in float32 (one rounding: u - z is an exact small integer), cast to dtype."""
        u = self.codes().astype(jnp.float32)
        s = self.scale.astype(jnp.float32)
        z = SYMMETRIC_ZERO if self.zero is None else self.zero.astype(jnp.float32)
        if self.g_idx is not None:
            z = z if self.zero is None else jnp.take(z, self.g_idx, axis=-1)
            return ((u - z) * jnp.take(s, self.g_idx, axis=-1)).astype(dtype)
        ug = u.reshape(*u.shape[:-1], -1, self.group_size)
        z = z if self.zero is None else z[..., None]
        return ((ug - z) * s[..., None]).reshape(u.shape).astype(dtype)


def quantize_int4(w, group_size: int = 128, *, scheme: str = "modelopt", g_idx=None,
                  scale_dtype=jnp.float32) -> Int4Tensor:
    """Round-to-nearest INT4 of w [..., N, K] per group of `group_size` along K (-1: one group per row).

    Per group, in float32 (round = half to even, as torch.round), with the scale first rounded to
    scale_dtype so that codes and zero points are computed against the scale that is stored:
      modelopt (spec 2.6):     s = amax / 7 (amax 0 -> 1.0); q = clip(round(w / s), -8, 7); no zero
      compressed_tensors (5.6): s = max(amax / 7.5, eps); q = round(clip(w / s, -8, 7)); no zero
      compressed_tensors_asym: lo = min(w, 0), hi = max(w, 0); s = max((hi - lo) / 15, eps);
                               zp = round(clip(-8 - lo / s, -8, 7)); q = round(clip(w / s + zp, -8, 7))
      autoawq (5.3):           s = max(hi - lo, 1e-5) / 15 over the group's own min/max;
                               z = clip(-round(lo / s), 0, 15); u = clip(round(w / s) + z, 0, 15)
      gptq / gptq_asym (5.4):  lo = min(w, 0), hi = max(w, 0); sym: hi = max(-lo, hi), lo = -hi if
                               lo < 0 (an all-non-negative group keeps lo = 0 and clips: GPTQ's quirk);
                               lo = hi = 0 -> [-1, 1]; s = (hi - lo) / 15; z = 8 (sym) or
                               round(-lo / s); u = clip(round(w / s) + z, 0, 15)
    Signed q maps to u = q + 8 (zero point 8 = None); compressed-tensors' signed zp to z = zp + 8.
    llm-compressor and AutoAWQ compute in the weight dtype (bf16/f16); on bf16 weights that can move a
    code by one step against this float32 arithmetic (fixtures README).
    g_idx: int32 [K] act-order groups (see g_idx_from_perm); group j holds the channels with
      g_idx == j, and every group must hold exactly group_size channels.
    """
    fn = "quantize_int4"
    w = jnp.asarray(w)
    _checks.check_choice(fn, "scheme", scheme, SCHEMES)
    _checks.check_choice(fn, "scale_dtype", jnp.dtype(scale_dtype), [jnp.dtype(d) for d in SCALE_DTYPES])
    _checks.check_quantizer_input(fn, "w", w, 1, 2, "two INT4 codes per byte")
    k = w.shape[-1]
    group_size = k if group_size == -1 else group_size
    if group_size <= 0:
        raise ValueError(f"quantize_int4: group_size={group_size}, expected a positive size or -1 (per channel)")
    _checks.check_multiple(fn, "w", "K", k, group_size, "group size")
    if g_idx is not None:
        g_idx = check_g_idx(fn, "g_idx", g_idx, k, k // group_size)
        _check_full_groups(fn, g_idx, group_size)
    return _quantize_int4(w, g_idx, group_size=group_size, scheme=scheme, scale_dtype=jnp.dtype(scale_dtype))


@functools.partial(jax.jit, static_argnames=("group_size", "scheme", "scale_dtype"))
def _quantize_int4(w, g_idx, *, group_size, scheme, scale_dtype):
    wf = w.astype(jnp.float32)
    if g_idx is not None:
        perm = perm_from_g_idx(g_idx)
        wf = jnp.take(wf, perm, axis=-1)
    wg = wf.reshape(*wf.shape[:-1], -1, group_size)
    scale, zero, codes = _SCHEME_RULES[scheme](wg, scale_dtype)
    codes = codes.reshape(wf.shape).astype(jnp.uint8)
    if g_idx is not None:
        codes = jnp.take(codes, jnp.argsort(perm), axis=-1)
    return Int4Tensor(packed=pack_nibbles(codes), scale=scale.astype(scale_dtype), group_size=group_size,
                      zero=None if zero is None else zero.astype(jnp.uint8), g_idx=g_idx)


def _stored(scale, scale_dtype):
    """The scale's value after it is written in scale_dtype (codes are computed against this value)."""
    return round_to(scale, scale_dtype).astype(jnp.float32)


def _ratio(wg, scale):
    """w / s per group, zero-safe: a scale that rounds to 0 in its dtype gives 0 instead of inf/NaN."""
    s = scale[..., None]
    return jnp.where(s == 0, 0.0, exact_divide(wg, jnp.where(s == 0, 1.0, s)))


def _modelopt(wg, scale_dtype):
    amax = jnp.max(jnp.abs(wg), axis=-1)
    s = _stored(jnp.where(amax == 0, 1.0, exact_divide(amax, 7.0)), scale_dtype)
    return s, None, jnp.clip(jnp.round(_ratio(wg, s)), -8, 7) + SYMMETRIC_ZERO


def _compressed_tensors(wg, scale_dtype):
    amax = jnp.max(jnp.abs(wg), axis=-1)
    s = _stored(jnp.maximum(exact_divide(amax, 7.5), _F32_EPS), scale_dtype)
    return s, None, jnp.round(jnp.clip(_ratio(wg, s), -8, 7)) + SYMMETRIC_ZERO


def _min_max_with_zero(wg):
    return jnp.minimum(jnp.min(wg, axis=-1), 0.0), jnp.maximum(jnp.max(wg, axis=-1), 0.0)


def _compressed_tensors_asym(wg, scale_dtype):
    lo, hi = _min_max_with_zero(wg)
    s = _stored(jnp.maximum(exact_divide(hi - lo, 15.0), _F32_EPS), scale_dtype)
    zp = jnp.round(jnp.clip(-8.0 - exact_divide(lo, s), -8, 7))
    q = jnp.round(jnp.clip(_ratio(wg, s) + zp[..., None], -8, 7))
    return s, zp + SYMMETRIC_ZERO, q + SYMMETRIC_ZERO


def _autoawq(wg, scale_dtype):
    lo, hi = jnp.min(wg, axis=-1), jnp.max(wg, axis=-1)
    s = _stored(exact_divide(jnp.maximum(hi - lo, 1e-5), 15.0), scale_dtype)
    z = jnp.clip(-jnp.round(exact_divide(lo, s)), 0, 15)
    return s, z, jnp.clip(jnp.round(_ratio(wg, s)) + z[..., None], 0, 15)


def _gptq(wg, scale_dtype, sym=True):
    lo, hi = _min_max_with_zero(wg)
    if sym:
        hi = jnp.maximum(-lo, hi)
        lo = jnp.where(lo < 0, -hi, lo)
    empty = (lo == 0) & (hi == 0)
    lo, hi = jnp.where(empty, -1.0, lo), jnp.where(empty, 1.0, hi)
    s = _stored(exact_divide(hi - lo, 15.0), scale_dtype)
    z = jnp.full_like(s, SYMMETRIC_ZERO) if sym else jnp.round(exact_divide(-lo, s))
    u = jnp.clip(jnp.round(_ratio(wg, s)) + z[..., None], 0, 15)
    return s, None if sym else z, u


_SCHEME_RULES = {
    "modelopt": _modelopt,
    "compressed_tensors": _compressed_tensors,
    "compressed_tensors_asym": _compressed_tensors_asym,
    "autoawq": _autoawq,
    "gptq": _gptq,
    "gptq_asym": functools.partial(_gptq, sym=False),
}


def g_idx_from_perm(perm, group_size: int):
    """GPTQ act-order group index: channels quantized in the order perm (perm[j] = the j-th channel).

    g_idx[perm[j]] = j // group_size, so each group holds group_size channels of similar importance.
    """
    perm = jnp.asarray(perm, jnp.int32)
    return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=jnp.int32) // group_size)


def perm_from_g_idx(g_idx):
    """Stable argsort of g_idx: reading K in this order makes every group contiguous (what kernels use)."""
    return jnp.argsort(jnp.asarray(g_idx), stable=True).astype(jnp.int32)


def sort_by_g_idx(t: Int4Tensor):
    """Reorder K so groups are contiguous: returns (t_sorted without g_idx, perm) such that
    x[..., perm] @ t_sorted.dequantize().T == x @ t.dequantize().T. Permute activations once per layer.
    """
    if t.g_idx is None:
        raise ValueError("sort_by_g_idx: t has no g_idx (groups are already contiguous)")
    _check_full_groups("sort_by_g_idx", t.g_idx, t.group_size)
    perm = perm_from_g_idx(t.g_idx)
    packed = pack_nibbles(jnp.take(t.codes(), perm, axis=-1))
    return t.replace(packed=packed, g_idx=None), perm


def check_g_idx(fn: str, name: str, g_idx, k: int, n_groups: int):
    """A group index per input channel: integers [K] in [0, n_groups) (values checked when concrete).
    Returns it as int32."""
    g_idx = jnp.asarray(g_idx)
    _checks.check_shape(fn, name, g_idx, (k,), "one group index per input channel")
    if not jnp.issubdtype(g_idx.dtype, jnp.integer):
        raise ValueError(f"{fn}: {name} has dtype {g_idx.dtype}, expected an integer dtype")
    _checks.check_range(fn, name, g_idx, 0, n_groups - 1)
    return g_idx.astype(jnp.int32)


def _check_full_groups(fn, g_idx, group_size):
    """Quantizing or sorting by g_idx needs exactly group_size channels in every group (checked when concrete)."""
    if _checks.is_concrete(g_idx):
        counts = jnp.bincount(g_idx, length=g_idx.shape[0] // group_size)
        bad = jnp.nonzero(counts != group_size)[0]
        if bad.size:
            j = int(bad[0])
            raise ValueError(f"{fn}: g_idx puts {int(counts[j])} channels in group {j}, expected {group_size} "
                             "(group_size)")
