"""The embedded Gemma 3 270M (GGUF Q4_K_M joined from four wheels) in jaxq against transformers' GGUF loader:
real Q4_K / Q5_0 / Q6_K / Q8_0 tensors, the 1 + w norm offset, sliding-window layers and the 262k vocabulary."""
import gc
import importlib.util
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxq
from jaxq.io.gguf_checkpoint import _reader, gguf_eos_token_ids, load_gguf_tokenizer
from jaxq.io.model_cache import embedded_model_path

_SPEC = importlib.util.spec_from_file_location(
    "smollm2_reference", pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "smollm2_reference.py")
ref = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ref)

# Two xdist workers share the CPU; more torch threads than one each oversubscribe it.
torch.set_num_threads(1)


@pytest.mark.slow
def test_gemma3_logits_and_greedy_match_transformers():
    path = embedded_model_path("gemma3-270m")
    tokenizer = load_gguf_tokenizer(path)
    # 600 tokens: past the 512-token sliding window, so local and global layers differ. Only the last position's
    # logits are compared (the 262k-wide head over every position would be 600x the work for no extra coverage).
    ids = tokenizer(ref.wikitext("test")[:3000]).input_ids[:600]
    prompt = tokenizer("The capital of France is").input_ids
    assert len(ids) == 600

    # transformers first, then freed: the two float32 copies of a 270M model with a 262k vocabulary never coexist.
    hf = ref.hf_gguf_model(path)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids]), logits_to_keep=1).logits[0, 0].numpy()
    their_greedy = ref.hf_greedy(hf, prompt, 16, gguf_eos_token_ids(_reader(path)))
    del hf
    gc.collect()

    model = jaxq.load(path, dtype="float32")
    assert model.config.layer_types[:6] == ("sliding_attention",) * 5 + ("full_attention",)
    ours, _ = model.module.apply({"params": model.params}, jnp.asarray([ids]), logits_index=jnp.array([599]))
    ours = np.asarray(ours)[0, 0]
    err = np.abs(ours - theirs).max()
    assert err < 1e-3 * np.abs(theirs).max(), f"max abs logit diff {err}"  # measured 4e-5 of 18.9; 10.2 without the window
    assert ours.argmax() == theirs.argmax()
    assert jaxq.generate(model, prompt, max_new_tokens=16, kv_cache_dtype="fp32") == their_greedy
