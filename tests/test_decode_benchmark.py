"""benchmarks/decode.py's "in one jit loop" timing runs the same work as the Python loop of decode_step
calls it is set beside: the same tokens and the same cache after the same steps, sampled or greedy."""
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.generate import Sampling, decode_step, new_cache, prefill
from jaxq.loaded_model import random_model

_BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
_SPEC = importlib.util.spec_from_file_location("decode_benchmark", _BENCH / "decode.py")
decode_benchmark = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(decode_benchmark)

TINY = dict(architectures=["LlamaForCausalLM"], vocab_size=97, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=0.8, top_k=5)])
def test_the_jit_loop_equals_the_python_loop_of_decode_steps(sampling):
    model = random_model(TINY, "float32", seed=3)
    key = jax.random.key(7)
    prompts = jnp.asarray(np.random.default_rng(0).integers(2, 97, (2, 16)), jnp.int32)

    def prefilled():
        cache = new_cache(model, 2, 64, "bf16")
        return prefill(model.module, model.run_params, prompts, jnp.full((2,), 16, jnp.int32), cache, key,
                       sampling)

    tokens, cache = prefilled()
    stepped = []
    for i in range(5):
        tokens, cache = decode_step(model.module, model.run_params, tokens, cache, key, jnp.int32(i), sampling)
        stepped.append(tokens)
    looped_tokens, looped_cache = decode_benchmark._decode_loop(model.module, model.run_params, *prefilled(),
                                                                key, 5, sampling)
    np.testing.assert_array_equal(looped_tokens, tokens)
    for a, b in zip(jax.tree.leaves(looped_cache), jax.tree.leaves(cache)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert len({tuple(np.asarray(t)) for t in stepped}) > 1           # the steps did not all repeat one token
