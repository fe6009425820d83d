"""Compiled serving over a fixed number of batch slots: one KV cache [num_slots, max_len], a prompt is
prefilled into any free slot while the other slots keep decoding, and every decode step advances all slots.

This works because the cache keeps one length per row: `insert` resets a slot's length to 0 and writes the new
prompt there; positions past a row's length are masked by causality, so stale keys of a previous request never
leak. Shapes are fixed (slots, max_len, prompt bucket), so after warm-up nothing recompiles.

A serving loop (greedy; `requests` is a list of token-id lists):

    from jaxq import serving
    slots = serving.Slots(model, num_slots=4, max_len=512)
    while requests or slots.active():
        for slot in slots.free():                       # refill free slots while others are mid-sequence
            if requests:
                done = slots.insert(slot, requests.pop(0), max_new_tokens=64)
                if done is not None:                    # the request ended at its first token
                    print(slot, done)
        for slot, ids in slots.step().items():          # one decode step for every slot
            print(slot, ids)                            # finished requests: slot -> generated ids

`Slots` is the thin host-side bookkeeping; the compiled pieces are `prefill_slot` and generate's `decode_step`.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxq.generate import Sampling, bucket, check_lengths, decode_step, new_cache, pad_prompts, prefill
from jaxq.loaded_model import LoadedModel


@functools.partial(jax.jit, static_argnames=("module", "sampling"), donate_argnames=("cache",))
def prefill_slot(module, params, cache, slot, tokens, length, key, sampling: Sampling = Sampling()):
    """Prefill one prompt into row `slot` of a shared cache, whatever that row held before.

    tokens [1, T] int32 right-padded to its bucket, length [1] int32 the real prompt length, slot an int32
    scalar (traced: one compile serves every slot). Returns (first new token [1] int32, cache with row `slot`
    rewritten and lengths[slot] = length). Other rows are untouched. The cache is donated.
    """
    take = lambda x: lax.dynamic_slice_in_dim(x, slot, 1, axis=0)
    row = cache.replace(k=tuple(map(take, cache.k)), v=tuple(map(take, cache.v)),
                        lengths=jnp.zeros((1,), jnp.int32))  # length 0: the prompt starts at position 0
    first, row = prefill(module, params, tokens, length, row, key, sampling)
    put = lambda big, small: lax.dynamic_update_slice_in_dim(big, small, slot, axis=0)
    cache = cache.replace(k=tuple(map(put, cache.k, row.k)), v=tuple(map(put, cache.v, row.v)),
                          lengths=cache.lengths.at[slot].set(row.lengths[0]))
    return first, cache


class Slots:
    """Host bookkeeping for `num_slots` concurrent requests over one cache of `max_len` positions per slot.

    insert(slot, prompt_ids, max_new_tokens) prefills a request; step() runs one decode step for all slots and
    returns {slot: generated ids} for requests that finished (eos or max_new_tokens), freeing their slots.
    """

    def __init__(self, model: LoadedModel, num_slots: int, max_len: int, kv_cache_dtype: str = "bf16",
                 sampling: Sampling = Sampling(), seed: int = 0):
        self.model, self.max_len, self.sampling = model, max_len, sampling
        self.cache = new_cache(model, num_slots, max_len, kv_cache_dtype)
        self.tokens = jnp.zeros((num_slots,), jnp.int32)  # each slot's latest token, the next decode input
        self.key = jax.random.key(seed)
        self._step = 0
        self._out: dict[int, list[int]] = {}
        self._budget: dict[int, int] = {}
        self._eos = set(model.eos_token_ids)

    def free(self) -> list[int]:
        return [s for s in range(len(self.cache.lengths)) if s not in self._out]

    def active(self) -> list[int]:
        return sorted(self._out)

    def insert(self, slot: int, prompt: Sequence[int], max_new_tokens: int) -> list[int] | None:
        """Start a request in a free slot: prefill it and record its first token. Returns the generated ids if
        the request already ended (eos first, or max_new_tokens == 1; the slot is free again), else None.
        ValueError when the prompt plus max_new_tokens does not fit the slot's max_len or the model."""
        if slot in self._out:
            raise ValueError(f"slot {slot} is busy; use one of {self.free()}")
        check_lengths([len(prompt)], max_new_tokens, self.max_len, self.model.max_positions)
        tokens, length = pad_prompts([prompt], bucket(len(prompt)), self.model.pad_token_id)
        key = jax.random.fold_in(self.key, self._step * len(self.cache.lengths) + slot)
        first, self.cache = prefill_slot(self.model.module, self.model.run_params, self.cache, jnp.int32(slot),
                                         jnp.asarray(tokens), jnp.asarray(length), key, self.sampling)
        self.tokens = self.tokens.at[slot].set(first[0])
        self._out[slot], self._budget[slot] = [int(first[0])], max_new_tokens
        return self._finish_if_done(slot).get(slot)

    def step(self) -> dict[int, list[int]]:
        """One decode step for every slot (idle ones compute and are ignored); returns finished requests."""
        if not self._out:
            return {}
        self._step += 1
        self.tokens, self.cache = decode_step(self.model.module, self.model.run_params, self.tokens, self.cache,
                                              self.key, jnp.int32(self._step), self.sampling)
        new = np.asarray(self.tokens)
        finished = {}
        for slot in self.active():
            self._out[slot].append(int(new[slot]))
            finished.update(self._finish_if_done(slot))
        return finished

    def _finish_if_done(self, slot: int) -> dict[int, list[int]]:
        out = self._out[slot]
        if out[-1] in self._eos or len(out) >= self._budget[slot]:
            del self._budget[slot]
            return {slot: self._out.pop(slot)}
        return {}
