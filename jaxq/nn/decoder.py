"""Plumbing every decoder-only causal LM shares: token positions, masks, cache bookkeeping, logit rows.

The models' call contract (models/llama.py, models/gemma3.py):
  logits, cache = module.apply({"params": params}, tokens, cache=None, num_new=None,
                               attention_mask=None, logits_index=None)
- no cache: causal forward over positions 0..T-1; attention_mask [B, T] (1 valid, 0 pad; right padding).
- cache: positions = cache.lengths[:, None] + arange(T); new k/v are written there, queries see keys at
  positions <= their own; the returned cache has lengths += num_new ([B] int32, default T). attention_mask
  is refused with a cache: right-padded rows need no mask, their pads land past the row's length and are
  overwritten by later tokens.
"""
import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxq.nn.attention import causal_mask, softcap
from jaxq.nn.kv_cache import KVCache, LayerKV
from jaxq.nn.qdense import QDense


@dataclasses.dataclass(frozen=True)
class Layerwise:
    """What running a causal LM one decoder layer at a time needs (jaxq.calib.sequential); each model class
    carries one as its `layerwise` attribute.

    backbone: the class of the "model" submodule, built as backbone(config, dtype), with methods
      embed(tokens [B, T]) -> h [B, T, hidden] and rope(positions [B, T], dtype) -> [(cos, sin)] per layer.
    layer: the decoder layer class, layer(config, dtype)(h, cos, sin, mask, kv, positions) -> (h, kv), params
      params["model"]["layers_<i>"].
    norm_inputs: (RMSNorm name in a layer, the linears that read its output), where AWQ folds its smoothing.
    norm_unit_offset: the norms scale by (1 + weight) (Gemma), not weight.
    row_inputs: (producer, consumer) linears where the producer's output row n is the consumer's input
      channel n whenever their sizes match (v_proj -> o_proj without GQA; up_proj -> down_proj through the
      gated product), so a per-channel scale of the consumer's input folds into the producer's rows.
    """

    backbone: type
    layer: type
    norm_inputs: tuple[tuple[str, tuple[str, ...]], ...]
    norm_unit_offset: bool = False
    row_inputs: tuple[tuple[str, str], ...] = (("self_attn.v_proj", "self_attn.o_proj"), ("mlp.up_proj", "mlp.down_proj"))


def attention_masks(
    tokens: jax.Array,
    cache: KVCache | None,
    attention_mask: jax.Array | None,
    sliding_windows: set[int | None],
) -> tuple[jax.Array, dict[int | None, jax.Array]]:
    """(positions [B, T] int32 of the new tokens, {sliding window or None: mask [B, T, S]}).

    S is T without a cache and S_max with one; one mask is built per distinct window, not per layer.
    """
    b, t = tokens.shape
    if cache is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        kv_positions = positions
    else:
        if attention_mask is not None:
            raise ValueError(
                "attention_mask is only for the no-cache forward; with a KV cache, right-padded rows need no "
                "mask (pass num_new = the real token counts instead)"
            )
        positions = cache.positions(t)
        kv_positions = jnp.broadcast_to(jnp.arange(cache.max_len, dtype=jnp.int32), (b, cache.max_len))
    masks = {w: causal_mask(positions, kv_positions, attention_mask, w) for w in sliding_windows}
    return positions, masks


def select_rows(h: jax.Array, logits_index: jax.Array | None) -> jax.Array:
    """h [B, T, H] -> h[b, logits_index[b]] as [B, 1, H] when logits_index ([B] int32) is given, else h."""
    if logits_index is None:
        return h
    return h[jnp.arange(h.shape[0]), logits_index][:, None, :]


def advance_cache(
    cache: KVCache | None, layers: list[LayerKV], num_new: jax.Array | None, num_tokens: int
) -> KVCache | None:
    """The cache after a forward that wrote `layers`; lengths grow by num_new (default: all T tokens)."""
    if cache is None:
        return None
    if num_new is None:
        num_new = jnp.full(cache.lengths.shape, num_tokens, jnp.int32)
    return cache.advance(layers, num_new)


def run_layers(
    layers: Sequence[nn.Module],
    h: jax.Array,
    rope: Sequence[tuple[jax.Array, jax.Array]],
    masks: Sequence[jax.Array],
    cache: KVCache | None,
    positions: jax.Array,
) -> tuple[jax.Array, list[LayerKV | None]]:
    """h through the decoder layers, unrolled (scanning stacked weights made XLA copy each layer's slice).

    Layer i gets rope[i] = (cos, sin), masks[i] and, with a cache, its LayerKV; returns h and what they wrote.
    """
    written = []
    for i, layer in enumerate(layers):
        kv = None if cache is None else cache.layer(i)
        h, kv = layer(h, *rope[i], masks[i], kv, positions)
        written.append(kv)
    return h, written


def causal_lm_forward(
    backbone: Callable, config: Any, dtype: Any, tokens: jax.Array, cache: KVCache | None, num_new: jax.Array | None,
    attention_mask: jax.Array | None, logits_index: jax.Array | None, final_logit_softcapping: float | None = None,
) -> tuple[jax.Array, KVCache | None]:
    """The models' __call__ (contract above): masks, backbone, row selection, LM head, cache bookkeeping.

    backbone(tokens, positions, {window: mask}, cache) -> (final-normed h [B, T, hidden], written LayerKVs), a
    bound submodule named "model" with an `embed_tokens` Embed. config needs layer_windows, vocab_size and
    tie_word_embeddings; without tying, the head is a QDense named "lm_head" in the calling module.
    """
    positions, masks = attention_masks(tokens, cache, attention_mask, set(config.layer_windows))
    h, written = backbone(tokens, positions, masks, cache)
    h = select_rows(h, logits_index)
    if config.tie_word_embeddings:
        logits = backbone.embed_tokens.attend(h)
    else:
        logits = QDense(config.vocab_size, dtype=dtype, name="lm_head")(h)
    logits = softcap(logits.astype(jnp.float32), final_logit_softcapping)
    return logits, advance_cache(cache, written, num_new, tokens.shape[1])
