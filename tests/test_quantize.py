"""jaxq.quantize on a tiny random Llama: every recipe, shared fused-group scales, calibrated input and KV
scales by hand, sizes, and the errors that name a layer."""
import logging

import flax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq.formats import E4M3_MAX, quantize_fp8, quantize_int4, quantize_nvfp4
from jaxq.loaded_model import random_model
from jaxq.nn.quantized_weight import QuantizedWeight
from jaxq.nn.rms_norm import RMSNorm
from jaxq.quantize import quantize
from jaxq.recipes import QuantConfig, get_recipe

TINY = dict(architectures=["LlamaForCausalLM"], vocab_size=128, hidden_size=128, intermediate_size=256,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            tie_word_embeddings=False)
CALIB = np.random.RandomState(0).randint(0, 128, 4 * 64).astype(np.int32)
KW = dict(calib_data=CALIB, calib_size=4, calib_seq=64, progress=False)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")

# name -> (recipe, relative logits error bound vs the unquantized model, quantized/bf16 linear bytes bound)
RECIPES = {
    "fp8": (get_recipe("fp8"), 0.12, 0.51),
    "fp8_rowwise": (get_recipe("fp8_rowwise"), 0.12, 0.52),
    "fp8_block": (get_recipe("fp8_block"), 0.12, 0.51),
    "nvfp4": (get_recipe("nvfp4"), 0.45, 0.29),
    "nvfp4_weight_only": (get_recipe("nvfp4", activation="none"), 0.4, 0.29),
    "mxfp4": (get_recipe("mxfp4"), 0.4, 0.27),
    "w4a16_awq": (get_recipe("w4a16_awq", algorithm="max"), 0.4, 0.27),
    "w4a8_awq": (get_recipe("w4a8_awq", algorithm="max"), 0.45, 0.27),
    "w4a16_gptq_asym": (get_recipe("w4a16_gptq", algorithm="max", symmetric=False), 0.4, 0.29),
    "w4a8_gptq": (get_recipe("w4a8_gptq", algorithm="max"), 0.45, 0.27),
}


@pytest.fixture(scope="module")
def tiny():
    return random_model(TINY, "bfloat16", seed=3)


@pytest.fixture(scope="module")
def tiny_logits(tiny):
    return jaxq.logits(tiny, CALIB[:48])


def weight(model, name):
    return flax.traverse_util.flatten_dict(model.params)[tuple(name.replace("layers.", "layers_").split(".")) +
                                                          ("weight",)]


def rel_err(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_quantizes_close_to_the_model_and_smaller(tiny, tiny_logits, name):
    recipe, bound, size = RECIPES[name]
    q, report = quantize(tiny, recipe, return_report=True, **KW)
    got = jaxq.logits(q, CALIB[:48])
    assert bool(jnp.all(jnp.isfinite(got))) and rel_err(got, tiny_logits) < bound
    for i in range(2):
        for lin in LINEARS:
            qw = weight(q, f"model.layers.{i}.{lin}")
            assert isinstance(qw, QuantizedWeight) and qw.recipe == recipe
    assert not isinstance(weight(q, "lm_head"), QuantizedWeight)  # a default exclusion
    assert report.layers == {recipe.name: 14} and report.excluded == ["lm_head"]
    linear = sum(weight(tiny, f"model.layers.{i}.{lin}").nbytes for i in range(2) for lin in LINEARS)
    assert report.quantized_linear_bytes < size * linear
    assert report.bytes_after == report.bytes_before - linear + report.quantized_linear_bytes
    assert q.quantization.recipe_for("model.layers.0.mlp.up_proj") == recipe


def test_weights_and_static_scales_follow_the_formulas(tiny):
    """q/k/v share the input scale (the input_layernorm output's amax / 448, computed here by hand)."""
    q = quantize(tiny, "fp8", **KW)
    w = weight(tiny, "model.layers.0.self_attn.k_proj")
    qk = weight(q, "model.layers.0.self_attn.k_proj")
    np.testing.assert_array_equal(np.asarray(qk.weight.data), np.asarray(quantize_fp8(w, "tensor").data))
    emb = jnp.take(tiny.params["model"]["embed_tokens"]["weight"], jnp.asarray(CALIB), axis=0)
    norm = RMSNorm(tiny.config.rms_norm_eps).apply(
        {"params": tiny.params["model"]["layers_0"]["input_layernorm"]}, emb)
    expected = jnp.max(jnp.abs(norm.astype(jnp.float32))) / E4M3_MAX
    for lin in ("q_proj", "k_proj", "v_proj"):
        assert float(weight(q, f"model.layers.0.self_attn.{lin}").input_scale) == pytest.approx(float(expected),
                                                                                              rel=1e-6)


def test_fused_groups_share_nvfp4_and_w4a8_global_scales(tiny):
    q = quantize(tiny, "nvfp4", **KW)
    names = [f"model.layers.1.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    amax = max(float(jnp.max(jnp.abs(weight(tiny, n).astype(jnp.float32)))) for n in names)
    for n in names:
        qw = weight(q, n)
        assert float(qw.weight.global_scale) == pytest.approx(amax / 2688, rel=1e-6)
        np.testing.assert_array_equal(np.asarray(qw.weight.packed),
                                      np.asarray(quantize_nvfp4(weight(tiny, n), amax).packed))
    assert float(weight(q, "model.layers.1.self_attn.o_proj").weight.global_scale) != pytest.approx(amax / 2688)

    q = quantize(tiny, get_recipe("w4a8_awq", algorithm="max"), **KW)
    names = ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    amax = max(float(jnp.max(jnp.abs(quantize_int4(weight(tiny, n), 128).dequantize()))) for n in names)
    for n in names:
        assert float(weight(q, n).weight_scale_2) == pytest.approx(amax / 448, rel=1e-6)


def test_kv_cache_fp8_uses_the_kv_calibration(tiny):
    q = quantize(tiny, "fp8_rowwise", kv_cache="fp8", **KW)
    expected = jaxq.calibrate_kv_scales(tiny, CALIB, 64, 4).kv_scales
    for got, want in zip(q.kv_scales, expected):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert q.quantization.kv_cache == "fp8"
    assert np.isfinite(jaxq.perplexity(q, CALIB, 64, kv_cache_dtype="fp8"))
    assert len(jaxq.generate(q, [1, 2, 3], max_new_tokens=3, kv_cache_dtype="fp8")) == 3


def test_bad_layer_shapes_name_the_layer_unless_excluded():
    odd = random_model(dict(TINY, intermediate_size=200), "bfloat16")  # down_proj K = 200: 200 % 16 = 8
    with pytest.raises(ValueError, match=r"layer model\.layers\.0\.mlp\.down_proj: recipe 'nvfp4' \(NVFP4\) "
                                         r"needs in_features K divisible by 16.*got K=200"):
        quantize(odd, get_recipe("nvfp4", activation="none"), progress=False)
    q = quantize(odd, get_recipe("nvfp4", activation="none"), exclude=[r"down_proj$"], progress=False)
    assert not isinstance(weight(q, "model.layers.1.mlp.down_proj"), QuantizedWeight)
    assert isinstance(weight(q, "model.layers.1.mlp.up_proj"), QuantizedWeight)

    smol = random_model(dict(TINY, hidden_size=192, num_attention_heads=3, num_key_value_heads=1), "bfloat16")
    with pytest.raises(ValueError, match=r"(?s)layer model\.layers\.0\.self_attn\.q_proj: .*groups of 128.*"
                                         r"got K=192.*pass group_size=64"):
        quantize(smol, get_recipe("w4a16_awq", algorithm="max"), progress=False)
    q = quantize(smol, get_recipe("w4a16_awq", algorithm="max"), group_size=64, progress=False)
    assert weight(q, "model.layers.0.self_attn.q_proj").weight.group_size == 64


def test_rules_exclusions_and_bad_arguments(tiny, caplog):
    config = QuantConfig(rules=((r"mlp\.", get_recipe("fp8_block")), (r"no_such_module", get_recipe("fp8")),
                                (r"self_attn\.o_proj", None), (r".*", get_recipe("fp8_rowwise"))))
    with caplog.at_level(logging.WARNING, logger="jaxq.quantize.pipeline"):
        q = quantize(tiny, config, progress=False)
    assert "no_such_module" in caplog.text and "embed_tokens" not in caplog.text
    assert weight(q, "model.layers.0.mlp.down_proj").recipe.name == "fp8_block"
    assert weight(q, "model.layers.0.self_attn.q_proj").recipe.name == "fp8_rowwise"
    assert not isinstance(weight(q, "model.layers.0.self_attn.o_proj"), QuantizedWeight)

    with pytest.raises(ValueError, match="static activation scales need calibration data"):
        quantize(tiny, "fp8", progress=False)
    with pytest.raises(ValueError, match="FP8 KV-cache scales need calibration data"):
        quantize(tiny, "fp8_rowwise", kv_cache="fp8", progress=False)
    with pytest.raises(ValueError, match="AWQ/GPTQ need calibration data"):
        quantize(tiny, "w4a16_awq", progress=False)
    with pytest.raises(ValueError, match="group_size=64 applies to INT4 recipes only"):
        quantize(tiny, "fp8_rowwise", group_size=64, progress=False)
    with pytest.raises(ValueError, match="layer model.layers.0.self_attn.q_proj is already quantized"):
        quantize(q, "fp8_rowwise", progress=False)
    with pytest.raises(TypeError, match="needs a LoadedModel"):
        quantize(tiny.params, "fp8_rowwise")
