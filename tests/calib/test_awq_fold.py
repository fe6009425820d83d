"""AWQ smoothing moves 1/s into the norms (Llama w, Gemma 1 + w), into v_proj / up_proj rows, or keeps it as
pre_quant_scale: every choice leaves the unquantized model's output unchanged; quantized, the ModelOpt
convention and the all-folded one agree."""
import flax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq.calib.awq import AWQConfig, smooth_layer
from jaxq.calib.sequential import InputStats
from jaxq.loaded_model import random_model
from jaxq.recipes import get_recipe
from models.hf_interop import hf_path

SIZES = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)
LLAMA = dict(SIZES, architectures=["LlamaForCausalLM"], num_key_value_heads=4)
GEMMA = dict(SIZES, architectures=["Gemma3ForCausalLM"], num_key_value_heads=2, head_dim=16, sliding_window=8,
             query_pre_attn_scalar=16)
RECIPE = get_recipe("w4a16_awq", group_size=32)
GROUPS = [(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), RECIPE), (("self_attn.o_proj",), RECIPE),
          (("mlp.gate_proj", "mlp.up_proj"), RECIPE), (("mlp.down_proj",), RECIPE)]
TOKENS = np.arange(2 * 24).reshape(2, 24) % 64


def synthetic_stats(k, seed):
    """Uneven per-channel statistics, so the searched scales are far from 1."""
    rng = np.random.default_rng(seed)
    mean = jnp.asarray(rng.uniform(0.05, 5.0, k).astype(np.float32))
    return InputStats(100, 3 * mean, mean, jnp.diag(mean**2) + 0.01 * mean[:, None] * mean[None, :])


def smoothed(model, fold, seed=0):
    """The model with every layer AWQ-smoothed (unquantized; statistics drawn from seed); kept pre_quant_scales
    are multiplied into the weight columns, which is what x * pre_quant_scale does at run time. Also returns the
    kept names."""
    spec = type(model.module).layerwise
    params = flax.core.copy(model.params, {})
    kept = set()
    for i in range(model.config.num_hidden_layers):
        flat = flax.traverse_util.flatten_dict(params["model"][f"layers_{i}"])
        weights = {n: flat[hf_path(n) + ("weight",)] for g, _ in GROUPS for n in g}
        norms = {n: flat[(n, "weight")] for n, _ in spec.norm_inputs}
        stats = {g[0]: synthetic_stats(weights[g[0]].shape[1], seed + i * 10 + j) for j, (g, _) in enumerate(GROUPS)}
        pqs, notes = smooth_layer(weights, norms, {}, GROUPS, stats, spec, AWQConfig(fold=fold), f"layers.{i}.")
        assert notes == []
        kept |= set(pqs)
        for name, w in weights.items():
            flat[hf_path(name) + ("weight",)] = w * pqs[name].astype(jnp.float32) if name in pqs else w
        flat.update({(n, "weight"): v for n, v in norms.items()})
        params["model"][f"layers_{i}"] = flax.traverse_util.unflatten_dict(flat)
    return model.replace(params=params), kept


@pytest.mark.parametrize("config, fold, expect_kept", [
    (LLAMA, "all", set()),                              # no GQA: o_proj folds into v_proj's rows
    (LLAMA, "none", {n for g, _ in GROUPS for n in g}),
    (GEMMA, "norms", {"self_attn.o_proj", "mlp.down_proj"}),
    (GEMMA, "all", {"self_attn.o_proj"}),               # GQA: v_proj has fewer rows than o_proj inputs
])
def test_folding_leaves_the_unquantized_model_unchanged(config, fold, expect_kept):
    model = random_model(config, "float32", seed=2)
    smooth, kept = smoothed(model, fold)
    assert kept == expect_kept
    before, after = jaxq.logits(model, TOKENS), jaxq.logits(smooth, TOKENS)
    np.testing.assert_allclose(np.asarray(after), np.asarray(before), rtol=2e-4, atol=2e-4)
    changed = smooth.params["model"]["layers_0"]["input_layernorm"]["weight"]
    assert not np.allclose(changed, model.params["model"]["layers_0"]["input_layernorm"]["weight"]) or fold == "none"


@pytest.mark.parametrize("config, unsmoothed", [
    (GEMMA, {"self_attn.o_proj"}),  # GQA: o_proj's smoothing folds nowhere, so it is not smoothed
    (LLAMA, set()),                 # no GQA: o_proj's folds into v_proj's rows
])
def test_foldable_smooths_only_the_groups_that_fold(config, unsmoothed):
    """fold="foldable" (what compressed-tensors needs): no pre_quant_scale, the same unquantized function, and
    a group whose smoothing cannot be folded keeps its weights as they were while the others change."""
    model = random_model(config, "float32", seed=7)
    smooth, kept = smoothed(model, "foldable", seed=1000)
    assert kept == set()
    tokens = np.random.default_rng(21).integers(0, 64, (3, 20))
    np.testing.assert_allclose(np.asarray(jaxq.logits(smooth, tokens)), np.asarray(jaxq.logits(model, tokens)),
                               rtol=2e-4, atol=2e-4)
    for i in range(model.config.num_hidden_layers):
        before = flax.traverse_util.flatten_dict(model.params["model"][f"layers_{i}"])
        after = flax.traverse_util.flatten_dict(smooth.params["model"][f"layers_{i}"])
        for names, _ in GROUPS:
            for name in names:
                same = np.array_equal(after[hf_path(name) + ("weight",)], before[hf_path(name) + ("weight",)])
                assert same == (name in unsmoothed), f"layer {i} {name}: unchanged={same}"
        v_proj = hf_path("self_attn.v_proj") + ("weight",)
        if not unsmoothed:  # o_proj's smoothing went into v_proj's rows, on top of q/k/v's columns
            assert not np.allclose(after[v_proj] / before[v_proj], (after[v_proj] / before[v_proj])[:1])


def test_modelopt_and_all_folded_conventions_give_the_same_quantized_model():
    model = random_model(LLAMA, "float32", seed=3)
    tokens = np.random.RandomState(0).randint(0, 64, (4, 32)).astype(np.int32)
    kw = dict(calib_data=tokens, calib_size=4, calib_seq=32, group_size=32, progress=False)
    norms = jaxq.quantize(model, RECIPE, awq=AWQConfig(fold="norms"), **kw)
    folded = jaxq.quantize(model, RECIPE, awq=AWQConfig(fold="all"), **kw)
    assert folded.params["model"]["layers_0"]["self_attn"]["o_proj"]["weight"].pre_quant_scale is None
    a, b = jaxq.logits(norms, TOKENS), jaxq.logits(folded, TOKENS)
    assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a)) < 1e-3
