"""Public API on a tiny random model: prompt kinds, logits, perplexity, KV calibration, LLM, load errors."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq.eval import token_windows
from jaxq.loaded_model import random_model

TINY = dict(architectures=["LlamaForCausalLM"], vocab_size=97, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rope_theta=10000.0, rms_norm_eps=1e-6)


@pytest.fixture(scope="module")
def tiny():
    return random_model(TINY, "float32", seed=2)


def test_generate_returns_the_kind_of_prompt_it_got(tiny):
    one = jaxq.generate(tiny, [5, 6, 7], max_new_tokens=4)
    assert isinstance(one, list) and len(one) == 4 and all(isinstance(t, int) for t in one)
    rows = jaxq.generate(tiny, [[5, 6, 7], [9]], max_new_tokens=4)
    assert rows[0] == one and len(rows[1]) == 4
    assert jaxq.generate(tiny, np.array([[5, 6, 7]]), max_new_tokens=4) == [one]


def test_text_needs_a_tokenizer(tiny):
    with pytest.raises(ValueError, match="has no tokenizer; pass token ids"):
        jaxq.generate(tiny, "hello")
    with pytest.raises(ValueError, match="prompt is empty"):
        jaxq.generate(tiny, [])


def test_logits_match_the_cached_decode(tiny):
    tokens = np.random.RandomState(0).randint(0, 97, (2, 10)).astype(np.int32)
    full = jaxq.logits(tiny, tokens)
    assert full.shape == (2, 10, 97) and full.dtype == jnp.float32
    np.testing.assert_array_equal(jaxq.logits(tiny, tokens[0]), full[:1])
    # Token by token through a float32 cache: the same numbers up to summation order.
    cache = tiny.family.init_kv_cache(tiny.config, 2, 16, jnp.float32)
    steps = []
    for t in range(10):
        step, cache = tiny.module.apply({"params": tiny.params}, jnp.asarray(tokens[:, t:t + 1]), cache=cache)
        steps.append(step[:, 0])
    np.testing.assert_allclose(np.stack(steps, 1), full, atol=2e-5)
    with pytest.raises(ValueError, match="exceed the model's max_position_embeddings 256"):
        jaxq.logits(tiny, np.zeros((1, 300), np.int32))


def test_perplexity_is_exp_mean_nll_over_windows(tiny):
    ids = np.random.RandomState(1).randint(0, 97, 70).astype(np.int32)
    windows = token_windows(ids, 16)
    assert windows.shape == (4, 16) and np.array_equal(windows.ravel(), ids[:64])  # the 6-token tail is dropped
    logp = jax.nn.log_softmax(jaxq.logits(tiny, windows), -1)
    nll = -np.take_along_axis(np.asarray(logp)[:, :-1], windows[:, 1:, None], -1)
    expected = math.exp(nll.mean())
    assert jaxq.perplexity(tiny, ids, window=16) == pytest.approx(expected, rel=1e-5)
    assert jaxq.perplexity(tiny, ids, window=16, max_windows=2) == pytest.approx(math.exp(nll[:2].mean()), rel=1e-5)
    assert jaxq.perplexity(tiny, ids, window=16, kv_cache_dtype="fp32") == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="need at least one window of 128 tokens, got 70"):
        jaxq.perplexity(tiny, ids, window=128)


def _rope(x, positions, theta=10000.0):
    # x [T, H, D], rotate-half RoPE as in HF Llama, in NumPy.
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float32) / d)
    angles = positions[:, None] * inv_freq[None]  # [T, D/2]
    cos, sin = np.cos(np.concatenate([angles] * 2, -1))[:, None], np.sin(np.concatenate([angles] * 2, -1))[:, None]
    rotated = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + rotated * sin


def test_kv_calibration_records_amax_over_448(tiny):
    ids = np.random.RandomState(3).randint(0, 97, 40).astype(np.int32)
    model = jaxq.calibrate_kv_scales(tiny, ids, window=20)
    k_scale, v_scale = (np.asarray(s) for s in model.kv_scales)
    assert k_scale.shape == v_scale.shape == (2,) and tiny.kv_scales is None
    # Layer 0 by hand: k = RoPE(k_proj(rmsnorm(embed))), v = v_proj(rmsnorm(embed)), over both windows.
    p = jax.tree.map(np.asarray, tiny.params)
    layer = p["model"]["layers_0"]
    x = p["model"]["embed_tokens"]["weight"][ids.reshape(2, 20)]
    x = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-6) * layer["input_layernorm"]["weight"]
    k = (x @ layer["self_attn"]["k_proj"]["weight"].T).reshape(2, 20, 2, 16)  # [B, T, H_kv, D]
    v = x @ layer["self_attn"]["v_proj"]["weight"].T
    k = np.stack([_rope(row, np.arange(20, dtype=np.float32)) for row in k])
    np.testing.assert_allclose(k_scale[0], np.abs(k).max() / 448, rtol=1e-4)
    np.testing.assert_allclose(v_scale[0], np.abs(v).max() / 448, rtol=1e-4)


def test_llm_binds_the_kv_cache_dtype(tiny):
    llm = jaxq.LLM(tiny, kv_cache_dtype="fp8")
    llm.calibrate_kv_scales(np.arange(64) % 97, window=32)
    assert llm.model.kv_scales is not None
    assert len(llm.generate([[1, 2, 3], [4, 5]], max_new_tokens=5)[1]) == 5
    fp8_ppl, exact = llm.perplexity(np.arange(64) % 97, window=32), jaxq.perplexity(tiny, np.arange(64) % 97, 32)
    assert fp8_ppl != exact and fp8_ppl == pytest.approx(exact, rel=0.05)
    with pytest.raises(ValueError, match="kv_cache_dtype 'int8' is not supported"):
        jaxq.LLM("does-not-matter", kv_cache_dtype="int8")  # refused before any loading


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not an embedded model name"):
        jaxq.load(tmp_path / "missing")
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="holds 2 GGUF files"):
        jaxq.load(tmp_path)
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a checkpoint jaxq can load"):
        jaxq.load(tmp_path / "w.bin")
