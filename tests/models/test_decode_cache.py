"""The KV-cache path (chunked prefill of right-padded prompts, then one-token decode) reproduces the
no-cache full-sequence logits; FP8 caches run and take half the bytes of bf16 ones."""
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from .hf_reference import right_padded_batch
from models.gemma3 import Gemma3Config
from models.hf_interop import expected_shapes
from models.llama import LlamaConfig
from models.registry import get_model_family

_SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
MODELS = {
    # sliding windows (3) shorter than the sequences (10) so the cache path must apply them too
    "MistralForCausalLM": LlamaConfig(**_SIZES, model_type="mistral", sliding_window=3),
    "Qwen3ForCausalLM": LlamaConfig(**_SIZES, model_type="qwen3", tie_word_embeddings=True),
    "Gemma3ForCausalLM": Gemma3Config(**_SIZES, head_dim=8, sliding_window=3, final_logit_softcapping=5.0,
                                      layer_types=("sliding_attention", "full_attention")),
}
LENGTHS = (10, 8)  # real sequence length per row
CHUNKS = ((4, 3), (2, 4))  # two 4-wide prefill chunks: real tokens per row (the rest are right pads)


@functools.cache  # one model per architecture for the whole module
def _random_model(arch):
    """Random params from the module's eval_shape, drawn with NumPy (no JAX init to compile)."""
    config = MODELS[arch]
    family = get_model_family([arch])
    module = family.module_class(config)
    rng = np.random.RandomState(0)
    shapes = expected_shapes(module)
    params = flax.traverse_util.unflatten_dict(
        {path: jnp.asarray(0.3 * rng.randn(*shape), jnp.float32) for path, shape in shapes.items()}
    )
    return family, config, module, params


def _full_forward(module, params, tokens, mask):
    return jax.jit(module.apply)({"params": params}, jnp.asarray(tokens), attention_mask=jnp.asarray(mask))


def _cached_logits(family, config, module, params, tokens, cache_dtype):
    """Logits of every real token, computed through the cache: chunked prefill, then one token at a time."""
    step = jax.jit(lambda p, t, c, n: module.apply({"params": p}, t, cache=c, num_new=n), donate_argnums=2)
    cache = family.init_kv_cache(config, len(LENGTHS), 16, cache_dtype)
    out = np.zeros(tokens.shape + (config.vocab_size,), np.float32)
    done = np.zeros(len(LENGTHS), int)
    for chunk in CHUNKS:
        t = 4
        idx = done[:, None] + np.arange(t)[None, :]
        chunk_tokens = np.where(np.arange(t)[None, :] < np.array(chunk)[:, None], tokens[np.arange(2)[:, None], idx], 0)
        logits, cache = step(params, jnp.asarray(chunk_tokens, jnp.int32), cache, jnp.asarray(chunk, jnp.int32))
        for b, n in enumerate(chunk):
            out[b, done[b]:done[b] + n] = np.asarray(logits)[b, :n]
        done += chunk
    while (done < np.array(LENGTHS)).any():
        active = done < np.array(LENGTHS)  # a finished row feeds a dummy token and does not advance
        pos = np.minimum(done, np.array(LENGTHS) - 1)
        logits, cache = step(params, jnp.asarray(tokens[np.arange(2), pos][:, None]), cache,
                             jnp.asarray(active, jnp.int32))
        for b in range(2):
            if done[b] < LENGTHS[b]:
                out[b, done[b]] = np.asarray(logits)[b, 0]
        done += active
    return out, cache


# Cache semantics per family with an exact (f32) cache; storage dtypes are family-independent (LayerKV), so
# bf16 and FP8 run on Gemma 3 only, the family with both window kinds (keeps the suite fast: each is a compile).
@pytest.mark.parametrize(
    "arch, cache_dtype, tol",
    [(arch, jnp.float32, 1e-5) for arch in sorted(MODELS)] + [("Gemma3ForCausalLM", jnp.bfloat16, 3e-2)],
)
def test_cache_path_matches_full_forward(arch, cache_dtype, tol):
    """f32 cache: the same maths, so ~1e-6. bf16 cache: only k/v are rounded to bf16 (2^-9 relative)."""
    family, config, module, params = _random_model(arch)
    tokens, mask = right_padded_batch(config.vocab_size, LENGTHS, seed=1)
    ref, _ = _full_forward(module, params, tokens, mask)
    got, cache = _cached_logits(family, config, module, params, tokens, cache_dtype)
    valid = mask.astype(bool)
    err = np.abs(got - np.asarray(ref))[valid].max()
    assert err < tol, f"max abs diff {err}"
    assert cache.k[0].dtype == cache_dtype


def test_fp8_cache_runs_and_halves_memory():
    family, config, module, params = _random_model("Gemma3ForCausalLM")
    tokens, mask = right_padded_batch(config.vocab_size, LENGTHS, seed=1)
    ref, _ = _full_forward(module, params, tokens, mask)
    got, cache = _cached_logits(family, config, module, params, tokens, jnp.float8_e4m3fn)
    bf16 = family.init_kv_cache(config, len(LENGTHS), 16, jnp.bfloat16)
    assert cache.k[0].dtype == jnp.float8_e4m3fn and 2 * cache.nbytes() == bf16.nbytes()
    np.testing.assert_array_equal(cache.lengths, LENGTHS)
    valid = mask.astype(bool)
    # unit scales (amax 448) quantize k/v of magnitude ~1 with E4M3's 3-bit mantissa: a loose but finite bound
    assert np.isfinite(got).all() and np.abs(got - np.asarray(ref))[valid].max() < 0.5


def test_logits_index_selects_rows():
    family, config, module, params = _random_model("Gemma3ForCausalLM")
    tokens, mask = right_padded_batch(config.vocab_size, LENGTHS, seed=2)
    full, _ = _full_forward(module, params, tokens, mask)
    last = jnp.asarray(LENGTHS, jnp.int32) - 1
    picked, _ = jax.jit(module.apply)({"params": params}, jnp.asarray(tokens), attention_mask=jnp.asarray(mask),
                                      logits_index=last)
    assert picked.shape == (2, 1, config.vocab_size)
    np.testing.assert_allclose(picked[:, 0], full[jnp.arange(2), last], atol=1e-6)


def test_attention_mask_with_cache_is_refused():
    family, config, module, params = _random_model("MistralForCausalLM")
    cache = family.init_kv_cache(config, 1, 8, jnp.float32)
    with pytest.raises(ValueError, match="attention_mask"):
        module.apply({"params": params}, jnp.ones((1, 2), jnp.int32), cache=cache, attention_mask=jnp.ones((1, 2)))
