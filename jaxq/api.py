"""The user-facing calls: `generate` (text or token ids in, the same kind out), `logits`, and `LLM`, a model
bound to its generation settings. `jaxq.load` (jaxq/loaded_model.py) makes the model they take.

    model = jaxq.load("smollm2-135m")
    jaxq.generate(model, "Hello, my name is")                    # -> str
    jaxq.generate(model, ["a", "b"], temperature=0.7, top_p=0.9)  # -> list[str]
    jaxq.logits(model, [[1, 2, 3]])                               # -> float32 [1, 3, V]
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.eval import perplexity
# Names, not the module: after `import jaxq`, the attribute jaxq.generate is this file's generate function.
from jaxq.generate import Sampling, generate_ids, resolve_kv_dtype
from jaxq.kv_scales import calibrate_kv_scales
from jaxq.loaded_model import LoadedModel, load


def _encode(model: LoadedModel, text: str, chat: bool) -> list[int]:
    if model.tokenizer is None:
        raise ValueError(f"{model.source} has no tokenizer; pass token ids instead of text")
    if chat:  # the template adds the model's own special tokens
        text = model.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                   add_generation_prompt=True)
        return model.tokenizer(text, add_special_tokens=False).input_ids
    return model.tokenizer(text).input_ids


def generate(
    model: LoadedModel,
    prompt: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]] | np.ndarray,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    kv_cache_dtype: str = "bf16",
    stream: Callable[[int, np.ndarray], Any] | None = None,
    chat: bool = False,
) -> str | list[str] | list[int] | list[list[int]]:
    """Continue prompt(s) with the model (greedy when temperature is 0; seeded sampling otherwise).

    prompt: a str -> a str; a list of str -> a list of str (one batch); token ids [T] -> new ids [<=N];
    ids [B][T] (rows may differ in length) -> a list of new-id lists. Text is tokenized as the tokenizer does
    by default (BOS if the model wants one); chat=True wraps each prompt in the model's chat template as one
    user turn. Returned text excludes the prompt and special tokens; returned ids keep the eos that ended a row.
    kv_cache_dtype: "bf16", "fp32" or "fp8" (E4M3 with the model's kv_scales, see jaxq.calibrate_kv_scales).
    stream(step, tokens [B] int32): called once per generated position, -1 for rows that already stopped.
    """
    sampling = Sampling(temperature, top_k, top_p)
    if len(prompt) == 0:
        raise ValueError("prompt is empty: give a str, a list of str or token ids")
    # One prompt: a str, or ids whose first element is a number (not a str, not a row of ids).
    single = isinstance(prompt, str) or (not isinstance(prompt[0], str) and np.ndim(prompt[0]) == 0)
    prompts = [prompt] if single else list(prompt)
    texts = isinstance(prompts[0], str)
    ids = [_encode(model, p, chat) for p in prompts] if texts else [[int(t) for t in p] for p in prompts]
    new = generate_ids(model, ids, max_new_tokens, sampling, seed, kv_cache_dtype, stream)
    if texts:
        new = [model.tokenizer.decode(n, skip_special_tokens=True) for n in new]
    return new[0] if single else new


@functools.partial(jax.jit, static_argnames=("module",))
def _forward(module, params, tokens):
    logits, _ = module.apply({"params": params}, tokens)
    return logits


def logits(model: LoadedModel, token_ids: Sequence[int] | Sequence[Sequence[int]] | np.ndarray) -> jax.Array:
    """float32 logits [B, T, V] for token ids [B, T] (or [T], treated as B = 1): one full causal forward from
    position 0, no cache. Rows must have equal length."""
    tokens = np.asarray(token_ids, np.int32)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ValueError(f"token_ids must be [T] or [B, T] with T >= 1, got shape {tokens.shape}")
    if tokens.shape[1] > model.max_positions:
        raise ValueError(f"{tokens.shape[1]} tokens exceed the model's max_position_embeddings "
                         f"{model.max_positions}")
    return _forward(model.module, model.run_params, jnp.asarray(tokens))


class LLM:
    """A loaded model plus its KV-cache setting, for repeated generation.

        llm = jaxq.LLM("smollm2-135m", kv_cache_dtype="fp8")
        llm.calibrate_kv_scales(open("valid.txt").read())   # optional: else checkpoint scales or 1.0
        llm.generate(["prompt one", "prompt two"], max_new_tokens=64, temperature=0.7)
    """

    def __init__(self, path, kv_cache_dtype: str = "bf16", dtype: Any = "bfloat16"):
        resolve_kv_dtype(kv_cache_dtype)  # reject a bad name before loading
        self.model = path if isinstance(path, LoadedModel) else load(path, dtype)
        self.kv_cache_dtype = kv_cache_dtype

    def generate(self, prompts, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, stream=None, chat: bool = False):
        """jaxq.generate with this LLM's model and KV-cache dtype."""
        return generate(self.model, prompts, max_new_tokens, temperature, top_k, top_p, seed,
                        self.kv_cache_dtype, stream, chat)

    def calibrate_kv_scales(self, text_or_ids, window: int = 512, max_windows: int = 8) -> "LLM":
        """Record FP8 KV scales from text (see jaxq.calibrate_kv_scales); returns self."""
        self.model = calibrate_kv_scales(self.model, text_or_ids, window, max_windows)
        return self

    def logits(self, token_ids):
        return logits(self.model, token_ids)

    def perplexity(self, text, window: int = 512, max_windows: int | None = None) -> float:
        """jaxq.perplexity with this LLM's model, through its KV-cache dtype."""
        return perplexity(self.model, text, window, max_windows, self.kv_cache_dtype)
