"""Perplexity over fixed, non-overlapping token windows (the number quantization recipes are judged by).

Definition (the same in benchmarks/smollm2_reference.py's transformers reference): tokenize the text without
special tokens, cut it from the start into non-overlapping windows of `window` tokens (a shorter tail is
dropped), let each window predict its own next tokens (window - 1 predictions, no context carried over), and
report exp(mean negative log-likelihood over all predictions).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.generate import new_cache
from jaxq.loaded_model import LoadedModel


def text_token_ids(model: LoadedModel, text_or_ids: str | Sequence[int]) -> np.ndarray:
    """Token ids [N] int32: a str is tokenized with the model's tokenizer, without special tokens."""
    if not isinstance(text_or_ids, str):
        return np.asarray(text_or_ids, np.int32).reshape(-1)
    if model.tokenizer is None:
        raise ValueError(f"{model.source} has no tokenizer; pass token ids instead of text")
    return np.asarray(model.tokenizer(text_or_ids, add_special_tokens=False).input_ids, np.int32)


def token_windows(ids: np.ndarray, window: int, max_windows: int | None = None) -> np.ndarray:
    """[num_windows, window] int32: consecutive non-overlapping windows from the start of ids (tail dropped).
    ValueError when ids hold less than one window."""
    count = len(ids) // window
    if max_windows is not None:
        count = min(count, max_windows)
    if count < 1:
        raise ValueError(f"need at least one window of {window} tokens, got {len(ids)} tokens; give more text "
                         "or a smaller window")
    return np.asarray(ids[: count * window], np.int32).reshape(count, window)


@functools.partial(jax.jit, static_argnames=("module",))
def _window_nll_sum(module, params, tokens, cache):
    """Sum over the windows tokens [B, W] of -log p(tokens[:, t+1] | tokens[:, :t+1]), float32. With an
    (empty) cache, attention reads the keys and values back from it, so FP8 KV rounding is included."""
    logits, _ = module.apply({"params": params}, tokens, cache=cache)  # [B, W, V] float32
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.sum(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def perplexity(model: LoadedModel, text: str | Sequence[int], window: int = 512,
               max_windows: int | None = None, kv_cache_dtype: str | None = None) -> float:
    """exp(mean NLL) of the model over `text` (a str or token ids), windows as in the module docstring.

    kv_cache_dtype: None runs a plain forward; "bf16" / "fp32" / "fp8" runs each window through a KV cache of
    that dtype (FP8 with the model's kv_scales), to measure what KV-cache quantization costs.
    Windows run one at a time (one compile per window length); the logits of a window never leave the device.
    """
    windows = token_windows(text_token_ids(model, text), window, max_windows)
    # One empty cache serves every window: the jitted forward returns a new cache and leaves this one as is.
    cache = None if kv_cache_dtype is None else new_cache(model, 1, window, kv_cache_dtype)
    sums = [_window_nll_sum(model.module, model.run_params, jnp.asarray(row[None]), cache) for row in windows]
    return math.exp(float(sum(sums)) / (windows.shape[0] * (window - 1)))
