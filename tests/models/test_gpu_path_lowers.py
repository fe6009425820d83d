"""A quantized model's forward as a Hopper GPU runs it, traced and lowered for CUDA on the CPU: the kernel
choices (kernel_dispatch with backend "gpu", pallas_kernels.dispatch with its Mosaic GPU plans) are made
for real, so a plan or trace that fails only on a GPU fails here. SmolLM2's shapes (K = 576, not a multiple
of 128; groups of 64) take the word GEMV and the packed-4 Triton kernel; Llama-like shapes with K and N
multiples of 128 and groups of 128 take the Mosaic GPU kernels from two tokens on. The numbers are checked
on a GPU (tests/nn/test_qdense_recipes.py, tests/nn/test_dense_group.py, benchmarks/gemm.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq.loaded_model import random_model
from pallas_kernels import _mgpu

SMOLLM2_SHAPES = dict(architectures=["LlamaForCausalLM"], vocab_size=512, hidden_size=576, intermediate_size=1536,
                      num_hidden_layers=1, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                      max_position_embeddings=512, tie_word_embeddings=True)
ALIGNED_SHAPES = dict(architectures=["LlamaForCausalLM"], vocab_size=512, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=128,
                      max_position_embeddings=512)


@pytest.fixture
def hopper(monkeypatch):
    monkeypatch.setattr(_mgpu, "is_hopper", lambda: True)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")


def _quantized(config: dict, recipe: str, **overrides):
    model = random_model(config, "bfloat16", seed=5)
    calib = dict(calib_data=np.random.default_rng(0).integers(0, config["vocab_size"], 64), calib_size=2,
                 calib_seq=32)
    return jaxq.quantize(model, jaxq.get_recipe(recipe, algorithm="max", **overrides), **calib)


def _lowered_text(model, tokens: int) -> str:
    def forward(params, ids):
        return model.module.apply({"params": params}, ids)

    ids = jax.ShapeDtypeStruct((1, tokens), jnp.int32)
    return jax.jit(forward).trace(model.run_params, ids).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("recipe,overrides", [("w4a16_awq", {}), ("w4a16_gptq", {"symmetric": False}),
                                              ("w4a8_awq", {})], ids=["w4a16", "w4a16_asym", "w4a8"])
@pytest.mark.parametrize("shapes,group,mosaic_from", [(SMOLLM2_SHAPES, 64, None), (ALIGNED_SHAPES, 128, 2)],
                         ids=["smollm2", "aligned"])
def test_the_int4_gpu_path_lowers_at_every_token_count(hopper, recipe, overrides, shapes, group, mosaic_from):
    """Word GEMV at one token, then the Mosaic GPU kernels (aligned shapes) or the packed-4 kernel."""
    model = _quantized(shapes, recipe, group_size=group, **overrides)
    for tokens in (1, 2, 40, 200):
        text = _lowered_text(model, tokens)
        mosaic = "stablehlo.custom_call @mosaic_gpu" in text
        assert "__gpu$xla.gpu.triton" in text or mosaic, (recipe, tokens)     # a Pallas kernel, not the reference
        assert mosaic == (mosaic_from is not None and tokens >= mosaic_from), (recipe, tokens)


@pytest.mark.parametrize("recipe", ["fp8", "fp8_rowwise", "fp8_block", "nvfp4", "mxfp4"])
@pytest.mark.parametrize("shapes", [SMOLLM2_SHAPES, ALIGNED_SHAPES], ids=["smollm2", "aligned"])
def test_the_fp8_and_fp4_gpu_paths_lower_for_cuda(hopper, recipe, shapes):
    """FP8 per tensor / rowwise: XLA's FP8 dot (cuBLASLt), no Pallas kernel. FP8 block: the Triton kernel,
    the Mosaic GPU kernel from the 256-token bucket where N fits its 256-channel tile (the aligned shapes at
    300 tokens). FP4: the word GEMV at one token, then the Mosaic GPU kernel (aligned shapes) or, off its
    grid, the packed-4 kernel below 257 tokens and dequantise-then-dot above."""
    model = _quantized(shapes, recipe)
    for tokens in (1, 40, 300):
        text = _lowered_text(model, tokens)
        triton, mosaic = "__gpu$xla.gpu.triton" in text, "stablehlo.custom_call @mosaic_gpu" in text
        fp8_dot = any("dot_general" in line and "f8E4M3FN" in line for line in text.splitlines())
        if recipe in ("fp8", "fp8_rowwise"):
            assert fp8_dot and not (triton or mosaic), (recipe, tokens)
        elif recipe == "fp8_block":
            assert mosaic == (shapes is ALIGNED_SHAPES and tokens == 300) and (triton or mosaic), tokens
        elif shapes is ALIGNED_SHAPES:
            assert mosaic == (tokens > 1) and triton == (tokens == 1), (recipe, tokens)
        else:
            assert triton == (tokens <= 256) and not mosaic, (recipe, tokens)
