"""Generation on tiny random models: sampling rules, compile counts, batching, stopping, serving slots."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq import serving
from jaxq.generate import (Sampling, bucket, cache_length, decode_step, generate_ids, new_cache, prefill,
                           sample)
from jaxq.loaded_model import random_model

TINY = dict(architectures=["LlamaForCausalLM"], vocab_size=97, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

_COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: _COMPILES.append(event) if event == "/jax/core/compile/backend_compile_duration"
    else None)


@pytest.fixture(scope="module")
def tiny():
    return random_model(TINY, "float32", seed=1)  # no eos: rows run to max_new_tokens unless a test sets one


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, TINY["vocab_size"], n).tolist() for n in lengths]


# ---- sample -------------------------------------------------------------------------------------------------

def test_greedy_is_argmax_and_ignores_key():
    logits = jax.random.normal(jax.random.key(0), (4, 50))
    a = sample(logits, jax.random.key(1))
    b = sample(logits, jax.random.key(2))
    np.testing.assert_array_equal(a, np.argmax(logits, -1))
    np.testing.assert_array_equal(a, b)


def test_sampling_is_seeded():
    logits = jnp.zeros((64, 1000))  # uniform: any key dependence shows
    a = sample(logits, jax.random.key(3), temperature=1.0)
    assert a.dtype == jnp.int32
    np.testing.assert_array_equal(a, sample(logits, jax.random.key(3), temperature=1.0))
    assert not np.array_equal(a, sample(logits, jax.random.key(4), temperature=1.0))


def _draws(logits_row, n=4000, **kw):
    logits = jnp.broadcast_to(jnp.asarray(logits_row, jnp.float32), (n, len(logits_row)))
    return np.asarray(sample(logits, jax.random.key(0), **kw))


def test_top_k_keeps_exactly_the_k_largest():
    row = np.log(np.array([0.05, 0.3, 0.1, 0.4, 0.15]))
    seen = set(_draws(row, temperature=1.0, top_k=3).tolist())
    assert seen == {1, 3, 4}  # all three survivors are drawn, nothing else


def test_top_p_keeps_the_smallest_set_reaching_p():
    row = np.log(np.array([0.15, 0.5, 0.05, 0.3]))
    draws = _draws(row, temperature=1.0, top_p=0.75)  # 0.5 < 0.75 <= 0.5 + 0.3: keep {1, 3}
    assert set(draws.tolist()) == {1, 3}
    assert abs(np.mean(draws == 1) - 0.5 / 0.8) < 0.03  # renormalised over the kept set
    assert set(_draws(row, temperature=1.0, top_p=0.4).tolist()) == {1}  # the top token always stays


def test_temperature_sharpens():
    row = np.log(np.array([0.6, 0.4]))
    hot, cold = _draws(row, temperature=2.0), _draws(row, temperature=0.25)
    assert np.mean(cold == 0) > np.mean(hot == 0) + 0.2


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_settings(bad):
    with pytest.raises(ValueError, match="sampling"):
        Sampling(**bad)


# ---- shapes and compiles ------------------------------------------------------------------------------------

def test_buckets_and_cache_lengths():
    assert [bucket(n) for n in (1, 16, 17, 100, 128, 129)] == [16, 16, 32, 128, 128, 256]
    assert cache_length(16, 20, 8192) == 128 and cache_length(128, 129, 8192) == 384
    assert cache_length(512, 64, 300) == 300  # capped at the model's positions


def test_decode_compiles_once_per_shape(tiny):
    prompts = _prompts([5, 9, 3])  # batch 3: a shape no other test uses
    before = (decode_step._cache_size(), prefill._cache_size())
    generate_ids(tiny, prompts, max_new_tokens=21)  # prefill + 20 decode steps
    assert (decode_step._cache_size(), prefill._cache_size()) == (before[0] + 1, before[1] + 1)
    # Same bucket (16) and cache length (128), other prompts and step count: nothing compiles at all.
    start = len(_COMPILES)
    generate_ids(tiny, _prompts([7, 2, 12], seed=1), max_new_tokens=30)
    assert _COMPILES[start:] == []


# ---- batching and stopping ----------------------------------------------------------------------------------

def test_batched_prompts_of_different_lengths_match_each_alone(tiny):
    prompts = _prompts([3, 17, 9, 30])  # buckets 16 and 32 alone, 32 together
    together = generate_ids(tiny, prompts, max_new_tokens=12)
    alone = [generate_ids(tiny, [p], max_new_tokens=12)[0] for p in prompts]
    assert together == alone
    assert all(len(t) == 12 for t in together)


def test_rows_stop_on_their_own_eos_and_stream_reports_them(tiny):
    prompts = _prompts([4, 11, 6], seed=2)
    free = generate_ids(tiny, prompts, max_new_tokens=10)
    eos = free[0][2]  # row 0's third token becomes the stop token
    model = tiny.replace(eos_token_ids=(eos,))
    streamed = []
    out = generate_ids(model, prompts, max_new_tokens=10, stream=lambda step, toks: streamed.append(toks.copy()))
    expected = [row[: row.index(eos) + 1] if eos in row else row for row in free]
    assert out == expected and out[0] == free[0][:3]
    per_row = [[int(t) for t in col if t >= 0] for col in np.stack(streamed).T]
    assert per_row == expected
    assert [s for s, _ in enumerate(streamed)] == list(range(len(streamed)))


def test_seeded_sampling_reproducible(tiny):
    prompts = _prompts([5, 8], seed=3)
    hot = Sampling(temperature=1.5, top_k=20, top_p=0.95)
    a = generate_ids(tiny, prompts, 16, hot, seed=7)
    assert a == generate_ids(tiny, prompts, 16, hot, seed=7)
    assert a != generate_ids(tiny, prompts, 16, hot, seed=8)


# ---- KV cache dtypes ----------------------------------------------------------------------------------------

def test_fp8_cache_is_half_of_bf16_and_warns_without_scales(tiny, caplog):
    with caplog.at_level(logging.WARNING, logger="jaxq.generate"):
        fp8 = new_cache(tiny, 2, 128, "fp8")
    assert "without k/v scales" in caplog.text
    assert fp8.nbytes() * 2 == new_cache(tiny, 2, 128, "bf16").nbytes()
    out = generate_ids(tiny, _prompts([6, 3]), 8, kv_cache_dtype="fp8")
    assert [len(o) for o in out] == [8, 8]


def test_fp8_cache_uses_the_model_scales(tiny):
    scales = (jnp.full((2,), 0.01, jnp.float32), jnp.full((2,), 0.02, jnp.float32))
    cache = new_cache(tiny.replace(kv_scales=scales), 1, 128, "fp8")
    np.testing.assert_array_equal(cache.k_scale, scales[0])
    np.testing.assert_array_equal(cache.v_scale, scales[1])


# ---- bad input ----------------------------------------------------------------------------------------------

def test_prompt_longer_than_model_positions(tiny):
    with pytest.raises(ValueError, match=r"prompt 1 has 250 tokens.*needs 260 positions.*max_position_embeddings is 256"):
        generate_ids(tiny, _prompts([4, 250]), max_new_tokens=10)
    with pytest.raises(ValueError, match="300 tokens"):
        generate_ids(tiny, _prompts([300]), max_new_tokens=1)


def test_bad_generation_arguments(tiny):
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generate_ids(tiny, [[]], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_ids(tiny, _prompts([3]), 0)
    with pytest.raises(ValueError, match="kv_cache_dtype 'int4'"):
        generate_ids(tiny, _prompts([3]), 4, kv_cache_dtype="int4")


# ---- serving slots ------------------------------------------------------------------------------------------

def test_slots_refilled_mid_flight_match_generate(tiny):
    requests = _prompts([3, 20, 7, 1, 40, 9, 12], seed=4)
    budgets = [5, 12, 8, 3, 10, 6, 9]
    expected = [generate_ids(tiny, [r], b)[0] for r, b in zip(requests, budgets)]
    slots = serving.Slots(tiny, num_slots=3, max_len=128)
    queue, owner, got = list(range(len(requests))), {}, {}
    while queue or slots.active():
        for slot in slots.free():
            if queue:
                i = queue.pop(0)
                owner[slot] = i
                done = slots.insert(slot, requests[i], budgets[i])
                if done is not None:
                    got[i] = done
        for slot, ids in slots.step().items():
            got[owner[slot]] = ids
    assert [got[i] for i in range(len(requests))] == expected


def test_slot_errors(tiny):
    slots = serving.Slots(tiny, num_slots=2, max_len=64)
    with pytest.raises(ValueError, match=r"needs 70 positions but the KV cache length is 64"):
        slots.insert(0, _prompts([60])[0], max_new_tokens=10)
    slots.insert(0, _prompts([5])[0], max_new_tokens=10)
    with pytest.raises(ValueError, match="slot 0 is busy"):
        slots.insert(0, _prompts([5])[0], max_new_tokens=10)
