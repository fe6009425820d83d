"""Grouped-query self-attention with RoPE, optional q/k RMSNorm, logit softcapping and a KV cache.

Scores and softmax are float32. Masks are boolean [B, T, S] (True = may attend) built by `causal_mask`,
which covers right padding, the KV cache's per-row positions and sliding windows; the reference path
materialises full [B, H, T, S] scores.
"""
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxq.nn.kv_cache import LayerKV
from jaxq.nn.qdense import QDense, dense_group
from jaxq.nn.rms_norm import RMSNorm
from jaxq.nn.rope import apply_rope


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap) (Gemma's logit softcapping); identity when cap is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def causal_mask(
    q_positions: jax.Array,
    kv_positions: jax.Array,
    kv_valid: jax.Array | None = None,
    sliding_window: int | None = None,
) -> jax.Array:
    """bool [B, T, S]: query at position p may see key at position j iff j <= p, the key is valid and,
    with a sliding window W, p - j < W (transformers' sliding_window_overlay).

    q_positions [B, T]; kv_positions [B, S]; kv_valid [B, S] (attention_mask, 1 = real token) or None.
    """
    q, kv = q_positions[:, :, None], kv_positions[:, None, :]
    mask = kv <= q
    if kv_valid is not None:
        mask = mask & kv_valid.astype(bool)[:, None, :]
    if sliding_window is not None:
        mask = mask & (q - kv < sliding_window)
    return mask


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float, logit_cap: float | None = None
) -> jax.Array:
    """softmax(softcap(q k^T * scale) masked) v, grouped-query, without repeating k/v.

    q [B, T, H, D]; k, v [B, H_kv, S, D] (heads before positions, the KV cache's layout) with H % H_kv == 0
    (query head h uses kv head h // (H / H_kv)); mask [B, T, S] bool. Returns [B, T, H, D] in q.dtype. A fully
    masked row yields a uniform average instead of NaN (masked scores are the float32 minimum, not -inf).
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(b, t, kv_heads, h // kv_heads, d)  # [B, T, H_kv, G, D]
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)  # [B, H_kv, G, T, S]
    scores = softcap(scores * scale, logit_cap)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    # [B, H_kv, G, T, D], the dot's own batch-major order (XLA CPU has no bf16 x bf16 -> f32 dot that also
    # permutes its output), then to [B, T, H, D]: a copy of T tokens' outputs, small beside the cache read
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, v, preferred_element_type=jnp.float32)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)


class Attention(nn.Module):
    """Self-attention block with HF param names q_proj, k_proj, v_proj, o_proj (and q_norm, k_norm).

    q_proj [H*D, hidden], k_proj/v_proj [H_kv*D, hidden], o_proj [hidden, H*D] (QDense, HF orientation); q, k
    and v run through dense_group (one launch where their quantized weights allow it).
    qkv_bias / out_bias: biases on q,k,v / on o (Qwen2 has qkv only; Llama's attention_bias sets both).
    qk_norm: RMSNorm over each head's D before RoPE (Qwen3, Gemma 3); norm_unit_offset picks Gemma's (1 + w).
    scale: score multiplier (head_dim**-0.5, or query_pre_attn_scalar**-0.5 for Gemma).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: bool = False
    norm_eps: float = 1e-6
    norm_unit_offset: bool = False
    logit_cap: float | None = None
    dtype: Any = None

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array,
        kv: LayerKV | None = None,
        positions: jax.Array | None = None,
    ) -> tuple[jax.Array, LayerKV | None]:
        """x [B, T, hidden]; cos, sin [B, T, D]; mask [B, T, S] with S = T (no cache) or S_max.

        With kv, the T new keys/values are written at positions [B, T] first and attention reads the whole
        cache (so FP8 caches are attended in their dequantized form, as ModelOpt does). Returns
        (out [B, T, hidden], the written LayerKV or None).
        """
        b, t, hidden = x.shape
        dense = partial(QDense, use_bias=self.qkv_bias, dtype=self.dtype)
        q, k, v = dense_group([dense(self.num_heads * self.head_dim, name="q_proj"),
                               dense(self.num_kv_heads * self.head_dim, name="k_proj"),
                               dense(self.num_kv_heads * self.head_dim, name="v_proj")], x)
        q = q.reshape(b, t, self.num_heads, self.head_dim)
        k, v = k.reshape(b, t, self.num_kv_heads, self.head_dim), v.reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            norm = partial(RMSNorm, eps=self.norm_eps, unit_offset=self.norm_unit_offset)
            q, k = norm(name="q_norm")(q), norm(name="k_norm")(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # [B, T, H, D], [B, T, H_kv, D]
        if kv is not None:
            kv = kv.write(k, v, positions)
            k, v = kv.read(q.dtype)  # [B, H_kv, S_max, D]
        else:
            k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, H_kv, T, D]
        out = dot_product_attention(q, k, v, mask, self.scale, self.logit_cap)  # [B, T, H, D]
        out = QDense(hidden, use_bias=self.out_bias, dtype=self.dtype, name="o_proj")(out.reshape(b, t, -1))
        return out, kv
