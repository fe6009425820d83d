"""Autoregressive generation on token ids: `sample`, jitted `prefill` and `decode_step` over a donated
static-shape KV cache, and the host loop `generate_ids` (jaxq.generate, in api.py, adds text in and out).

Shapes are kept few so compiles are few: prompts are right-padded to a power-of-two bucket (at least 16),
each row's real length travels as `num_new`, and the cache length is the bucket plus max_new_tokens rounded
up to a multiple of 128 (capped at the model's positions). One (batch, bucket, cache length, sampling)
combination compiles prefill once and decode_step once, whatever the number of steps.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.loaded_model import LoadedModel

log = logging.getLogger(__name__)

_MIN_BUCKET = 16
_CACHE_ROUND = 128
KV_CACHE_DTYPES = {"bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16, "fp32": jnp.float32,
                   "float32": jnp.float32, "fp8": jnp.float8_e4m3fn}


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Static sampling settings. temperature 0 is greedy (argmax); top_k 0 and top_p 1.0 disable those
    filters. Hashable, so a jitted function compiles once per distinct setting."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"invalid sampling settings {self}: need temperature >= 0, top_k >= 0, "
                             f"0 < top_p <= 1")


def sample(logits: jax.Array, key: jax.Array, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0) -> jax.Array:
    """Next tokens [B] int32 from logits [B, V] (float32).

    temperature == 0: argmax (key unused). Otherwise, as transformers orders its warpers: divide by
    temperature, keep the top_k largest logits (0: all), keep the smallest set of largest logits whose
    probability mass reaches top_p (1.0: all; the most likely token always stays), then draw from the
    renormalised distribution with `key`. Ties at a cut-off value are kept.
    """
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    masked = jnp.finfo(jnp.float32).min
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth, masked, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
        probs = jax.nn.softmax(ordered, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        num_kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # >= 1: mass_before[0] = 0
        cutoff = jnp.take_along_axis(ordered, num_kept - 1, axis=-1)  # [B, 1]
        logits = jnp.where(logits < cutoff, masked, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _sample(logits, key, step, sampling: Sampling):
    return sample(logits, jax.random.fold_in(key, step), sampling.temperature, sampling.top_k, sampling.top_p)


@functools.partial(jax.jit, static_argnames=("module", "sampling"), donate_argnames=("cache",))
def prefill(module, params, tokens, num_new, cache, key, sampling: Sampling = Sampling()):
    """Write right-padded prompts into the cache and sample each row's first new token.

    tokens [B, T] int32 (T = the bucket), num_new [B] int32 real prompt lengths (1..T), cache: a KVCache whose
    rows start at their `lengths` (0 for a fresh cache). Returns (next tokens [B] int32, cache with
    lengths += num_new). The cache is donated: do not use the argument afterwards.
    """
    logits, cache = module.apply({"params": params}, tokens, cache=cache, num_new=num_new,
                                 logits_index=num_new - 1)  # [B, 1, V]
    return _sample(logits[:, 0], key, 0, sampling), cache


@functools.partial(jax.jit, static_argnames=("module", "sampling"), donate_argnames=("cache",))
def decode_step(module, params, tokens, cache, key, step, sampling: Sampling = Sampling()):
    """One token per row: tokens [B] int32 -> (next tokens [B] int32, cache with lengths += 1).

    step (int32 scalar, traced) seeds the draw: fold_in(key, step), so a run is reproducible per seed.
    The cache is donated.
    """
    logits, cache = module.apply({"params": params}, tokens[:, None], cache=cache)  # [B, 1, V]
    return _sample(logits[:, 0], key, step, sampling), cache


def bucket(length: int) -> int:
    """The padded prompt length: the next power of two, at least 16."""
    return max(_MIN_BUCKET, 1 << (max(length, 1) - 1).bit_length())


def cache_length(prompt_bucket: int, max_new_tokens: int, max_positions: int) -> int:
    """Cache slots for a bucket plus max_new_tokens, rounded up to 128 and capped at the model's positions
    (padding past a row's length may then fall off the end: the cache drops those writes)."""
    need = prompt_bucket + max_new_tokens
    return min(-(-need // _CACHE_ROUND) * _CACHE_ROUND, max_positions)


def resolve_kv_dtype(name: str):
    """"bf16" | "fp32" | "fp8" (E4M3) -> the dtype the cache stores."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype {name!r} is not supported; choose one of {sorted(KV_CACHE_DTYPES)}")
    return KV_CACHE_DTYPES[name]


def new_cache(model: LoadedModel, batch: int, max_len: int, kv_dtype: str = "bf16"):
    """An empty KV cache for `model`: [batch, max_len] per layer, with FP8 scales when kv_dtype is "fp8"
    (the model's `kv_scales`, else 1.0 with a warning: unscaled E4M3 saturates at 448 and loses small values)."""
    dtype = resolve_kv_dtype(kv_dtype)
    k_scale = v_scale = None
    if dtype == jnp.float8_e4m3fn:
        if model.kv_scales is None:
            log.warning("FP8 KV cache for %s without k/v scales: using 1.0. Calibrate them with "
                        "jaxq.calibrate_kv_scales(model, text) for accuracy.", model.source)
        else:  # copies: KVCache.create keeps the arrays it gets, and prefill/decode donate the cache
            k_scale, v_scale = (jnp.array(s, copy=True) for s in model.kv_scales)
    return model.family.init_kv_cache(model.config, batch, max_len, dtype, k_scale, v_scale)


def check_lengths(prompt_lengths: Sequence[int], max_new_tokens: int, max_len: int, max_positions: int) -> None:
    """ValueError naming the lengths when a prompt is empty or prompt + max_new_tokens does not fit the
    model's positions or the cache."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for i, n in enumerate(prompt_lengths):
        if n < 1:
            raise ValueError(f"prompt {i} is empty; give at least one token")
        for limit, what in ((max_positions, "the model's max_position_embeddings"), (max_len, "the KV cache length")):
            if n + max_new_tokens > limit:
                raise ValueError(
                    f"prompt {i} has {n} tokens; with max_new_tokens={max_new_tokens} it needs {n + max_new_tokens} "
                    f"positions but {what} is {limit}. Shorten the prompt or lower max_new_tokens."
                )


def pad_prompts(prompts: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [B, length] int32 right-padded with pad_id, lengths [B] int32)."""
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    return tokens, np.array([len(p) for p in prompts], np.int32)


def generate_ids(
    model: LoadedModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    sampling: Sampling = Sampling(),
    seed: int = 0,
    kv_cache_dtype: str = "bf16",
    stream: Callable[[int, np.ndarray], Any] | None = None,
) -> list[list[int]]:
    """Generate up to max_new_tokens for each prompt (lists of token ids, any lengths) in one batch.

    A row stops after emitting one of model.eos_token_ids (which is included in its output); the batch stops
    when every row has. Rows that stopped keep computing (the batch shape is fixed) but their tokens are
    dropped. stream(step, tokens) is called after every step with tokens [B] int32 (-1 for rows that had
    already stopped). Returns the new tokens per row.
    """
    lengths = [len(p) for p in prompts]
    prompt_bucket = bucket(max(lengths, default=1))
    max_len = cache_length(prompt_bucket, max_new_tokens, model.max_positions)
    check_lengths(lengths, max_new_tokens, max_len, model.max_positions)
    tokens, num_new = pad_prompts(prompts, prompt_bucket, model.pad_token_id)
    cache = new_cache(model, len(prompts), max_len, kv_cache_dtype)
    key = jax.random.key(seed)

    eos = np.array(model.eos_token_ids, np.int32)
    out: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)

    def consume(step: int, device_tokens: jax.Array) -> None:
        new = np.asarray(device_tokens)
        for row in np.flatnonzero(~done):
            out[row].append(int(new[row]))
        if stream is not None:
            stream(step, np.where(done, -1, new).astype(np.int32))
        done[np.isin(new, eos)] = True

    next_tokens, cache = prefill(model.module, model.run_params, jnp.asarray(tokens), jnp.asarray(num_new), cache,
                                 key, sampling)
    for step in range(1, max_new_tokens):
        # Dispatch step `step` before reading step-1's tokens on the host, so the device never waits for
        # Python; the price is at most one wasted step after the last row stops.
        following, cache = decode_step(model.module, model.run_params, next_tokens, cache, key, jnp.int32(step),
                                       sampling)
        consume(step - 1, next_tokens)
        next_tokens = following
        if done.all():
            break
    else:
        consume(max_new_tokens - 1, next_tokens)
    return out

