"""Detection from the JSON configs alone: each format maps to its Scheme and jaxq recipe, exclusion entries
match as their producers mean them (fused names, prefixes, regexes, substrings), and every unsupported
combination raises an error that names the file or field and the value."""

import json

import pytest

from jaxq.io.quantized.autoawq import AutoAWQScheme
from jaxq.io.quantized.compressed_tensors import CompressedTensorsScheme
from jaxq.io.quantized.deepseek_fp8 import FP8Scheme
from jaxq.io.quantized.detect import detect
from jaxq.io.quantized.gpt_oss import GptOssScheme
from jaxq.io.quantized.gptq import GPTQScheme
from jaxq.io.quantized.modelopt import ModelOptScheme
from jaxq.io.quantized.scheme import module_matches

Q = "model.layers.0.self_attn.q_proj"
ALL = frozenset({"weight", "weight_scale", "qweight", "weight_scale_inv"})


def _detect(tmp_path, quantization_config=None, **files):
    config = {} if quantization_config is None else {"quantization_config": quantization_config}
    (tmp_path / "config.json").write_text(json.dumps(config))
    for name, content in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
    return detect(tmp_path, config)


def _dir(tmp_path, name):
    (tmp_path / name).mkdir()
    return tmp_path / name


def _modelopt(**quantization):
    return {"producer": {"name": "modelopt", "version": "0.47.0"}, "quantization": quantization}


def _ct(weights, input_activations=None, fmt="pack-quantized", **top):
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": {"g": {"targets": ["Linear"], "weights": weights,
                                    "input_activations": input_activations}}, **top}


INT4 = {"type": "int", "num_bits": 4, "strategy": "group", "group_size": 128, "symmetric": True}


def test_unquantized(tmp_path):
    assert _detect(tmp_path) is None


@pytest.mark.parametrize("algo, group_size, recipe, activation", [
    ("FP8", None, "fp8", "fp8_static"),
    ("FP8_PER_CHANNEL_PER_TOKEN", None, "fp8_rowwise", "fp8_token"),
    ("fp8_pb_wo", None, "fp8_block", "none"),
    ("NVFP4", 16, "nvfp4", "nvfp4"),
    ("NVFP4_AWQ", 16, "nvfp4", "nvfp4"),
    ("W4A16_NVFP4", None, "nvfp4", "none"),
    ("mxfp4", None, "mxfp4", "none"),
    ("W4A8_MXFP4_FP8", 32, "mxfp4", "fp8_static"),
    ("W4A16_AWQ", 64, "w4a16_awq", "none"),
    ("W4A8_AWQ", 128, "w4a8_awq", "fp8_static"),
])
def test_modelopt_algos(tmp_path, algo, group_size, recipe, activation):
    scheme = _detect(tmp_path, hf_quant_config=_modelopt(quant_algo=algo, group_size=group_size,
                                                          kv_cache_quant_algo="FP8", exclude_modules=["lm_head"]))
    assert isinstance(scheme, ModelOptScheme) and scheme.kv_cache
    r = scheme.recipe_for(Q, ALL)
    assert (r.name, r.activation) == (recipe, activation)
    if recipe.startswith("w4"):
        assert r.group_size == group_size
    assert scheme.recipe_for("lm_head", ALL) is None


def test_modelopt_flat_config_json(tmp_path):
    scheme = _detect(tmp_path, {"quant_method": "modelopt", "quant_algo": "NVFP4", "ignore": ["lm_head"],
                                "kv_cache_scheme": {"dynamic": False, "num_bits": 8, "type": "float"}})
    assert scheme.recipe_for(Q, ALL).name == "nvfp4" and scheme.kv_cache and scheme.exclusions == ("lm_head",)


@pytest.mark.parametrize("quantization, words", [
    (dict(quant_algo="W8A8_SQ_PER_CHANNEL"), ["quant_algo", "W8A8_SQ_PER_CHANNEL"]),
    (dict(quant_algo="W4A8_NVFP4_FP8", group_size=32), ["quant_algo", "W4A8_NVFP4_FP8"]),
    (dict(quant_algo="NVFP4", group_size=32), ["group_size 32", "blocks of 16"]),
    (dict(quant_algo="W4A16_AWQ", group_size=256), ["group_size 256"]),
    (dict(quant_algo="FP8", kv_cache_quant_algo="NVFP4"), ["kv_cache_quant_algo", "NVFP4"]),
    (dict(quant_algo="FP8", exclude_modules="lm_head"), ["exclude_modules", "'lm_head'"]),
    (dict(quant_algo="MIXED_PRECISION"), ["MIXED_PRECISION", "quantized_layers"]),
])
def test_modelopt_unsupported(tmp_path, quantization, words):
    with pytest.raises(ValueError) as info:
        _detect(tmp_path, hf_quant_config=_modelopt(**quantization))
    assert all(w in str(info.value) for w in words), info.value


def test_modelopt_configs_must_agree(tmp_path):
    with pytest.raises(ValueError, match=r"quant_algo 'FP8'.*disagrees with hf_quant_config.json.*'NVFP4'"):
        _detect(tmp_path, {"quant_method": "modelopt", "quant_algo": "FP8"},
                hf_quant_config=_modelopt(quant_algo="NVFP4", group_size=16))
    with pytest.raises(ValueError, match=r"producer.name is 'other'"):
        _detect(tmp_path, hf_quant_config={"producer": {"name": "other"}, "quantization": {}})


@pytest.mark.parametrize("weights, acts, fmt, recipe, fields", [
    (INT4, None, "pack-quantized", "w4a16_gptq", {"symmetric": True, "act_order": False}),
    ({**INT4, "symmetric": False}, None, "pack-quantized", "w4a16_awq", {"symmetric": False}),
    ({**INT4, "actorder": "group"}, None, "pack-quantized", "w4a16_gptq", {"act_order": True}),
    ({**INT4, "strategy": "channel", "group_size": None}, None, "pack-quantized", "w4a16_gptq", {"group_size": -1}),
    ({"type": "float", "num_bits": 8, "strategy": "channel"}, {"type": "float", "num_bits": 8, "strategy": "token",
                                                               "dynamic": True},
     "float-quantized", "fp8_rowwise", {"activation": "fp8_token"}),
    ({"type": "float", "num_bits": 8, "strategy": "block", "block_structure": [128, 128]},
     {"type": "float", "num_bits": 8, "strategy": "group", "group_size": 128, "dynamic": True},
     "float-quantized", "fp8_block", {"activation": "fp8_group", "group_size": 128}),
    ({"type": "float", "num_bits": 8, "strategy": "tensor"}, None, "float-quantized", "fp8", {"activation": "none"}),
    ({"type": "float", "num_bits": 4, "strategy": "tensor_group", "group_size": 16}, None, "nvfp4-pack-quantized",
     "nvfp4", {"activation": "none"}),
    ({"type": "float", "num_bits": 4, "strategy": "tensor_group", "group_size": 16},
     {"type": "float", "num_bits": 4, "strategy": "tensor_group", "group_size": 16, "dynamic": "local"},
     "nvfp4-pack-quantized", "nvfp4", {"activation": "nvfp4"}),
])
def test_compressed_tensors_recipes(tmp_path, weights, acts, fmt, recipe, fields):
    scheme = _detect(tmp_path, _ct(weights, acts, fmt, ignore=["lm_head", "re:.*mlp\\.gate$"]))
    assert isinstance(scheme, CompressedTensorsScheme)
    r = scheme.recipe_for(Q, ALL)
    assert r.name == recipe and all(getattr(r, k) == v for k, v in fields.items()), r
    assert scheme.recipe_for("lm_head", ALL) is None and scheme.recipe_for("model.layers.3.mlp.gate", ALL) is None


def test_compressed_tensors_targets_by_name_regex_and_class(tmp_path):
    fp8 = {"type": "float", "num_bits": 8, "strategy": "channel"}
    config = _ct(INT4)
    config["config_groups"] = {
        "int4": {"targets": ["Linear"], "weights": INT4, "format": "pack-quantized"},
        "fp8_mlp": {"targets": ["re:.*mlp\\..*"], "weights": fp8, "format": "float-quantized"},
        "fp8_q0": {"targets": [Q], "weights": fp8, "format": "float-quantized"},
    }
    scheme = _detect(tmp_path, config)
    assert scheme.recipe_for(Q, ALL).name == "fp8_rowwise"  # the exact name wins
    assert scheme.recipe_for("model.layers.1.mlp.up_proj", ALL).name == "fp8_rowwise"  # then the regex
    assert scheme.recipe_for("model.layers.1.self_attn.k_proj", ALL).name == "w4a16_gptq"  # then "Linear"


@pytest.mark.parametrize("config, words", [
    (_ct(INT4, fmt="int-quantized"), ["format", "'int-quantized'"]),
    (_ct(INT4, {"type": "int", "num_bits": 8, "strategy": "token", "dynamic": True}), ["input_activations"]),
    (_ct({**INT4, "num_bits": 8}), ["num_bits 8"]),
    (_ct(INT4, quantization_status="frozen"), ["quantization_status", "'frozen'"]),
    (_ct(INT4, sparsity_config={"format": "sparse-24"}), ["sparsity_config"]),
    (_ct(INT4, kv_cache_scheme={"type": "int", "num_bits": 8}), ["kv_cache_scheme"]),
    (_ct({"type": "float", "num_bits": 8, "strategy": "block", "block_structure": [128, 64]}, fmt="float-quantized"),
     ["block_structure", "[128, 64]"]),
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, ["version", "'gemv'"]),
    ({"quant_method": "awq", "bits": 4, "zero_point": False}, ["zero_point", "False"]),
    ({"quant_method": "gptq", "bits": 8}, ["bits", "8"]),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, ["checkpoint_format", "'marlin'"]),
    ({"quant_method": "gptq", "bits": 4, "group_size": 32, "dynamic": {"-:.*": {}}}, ["dynamic"]),
    ({"quant_method": "fp8", "activation_scheme": "dynamic"}, ["activation_scheme", "weight_block_size"]),
    ({"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "static"}, ["activation_scheme"]),
    ({"quant_method": "fp8", "weight_block_size": [128, 128], "fmt": "e5m2"}, ["fmt", "'e5m2'"]),
    ({"quant_method": "bitsandbytes"}, ["quant_method", "'bitsandbytes'"]),
])
def test_unsupported_third_party_configs(tmp_path, config, words):
    with pytest.raises(ValueError) as info:
        _detect(tmp_path, config)
    assert all(w in str(info.value) for w in words), info.value


def test_third_party_schemes(tmp_path):
    awq = _detect(_dir(tmp_path, "a"),
                  {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "GEMM",
                   "modules_to_not_convert": ["visual"]})
    assert isinstance(awq, AutoAWQScheme) and awq.recipe_for(Q, ALL).group_size == 64
    assert awq.recipe_for(Q, frozenset({"weight"})) is None  # a linear without qweight stays as it is
    assert awq.recipe_for("model.visual.blocks.0.attn.qkv", ALL) is None  # AutoAWQ: substring match
    gptq = _detect(_dir(tmp_path, "g"),
                   {"quant_method": "gptq", "bits": 4, "group_size": -1, "desc_act": True, "sym": False,
                    "checkpoint_format": "gptq_v2"})
    r = gptq.recipe_for(Q, ALL)
    assert isinstance(gptq, GPTQScheme) and gptq.version == 2 and (r.group_size, r.symmetric, r.act_order) == (
        -1, False, True)
    fp8 = _detect(_dir(tmp_path, "f"),
                  {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                   "weight_block_size": [128, 128]})
    assert isinstance(fp8, FP8Scheme) and fp8.recipe_for(Q, ALL).name == "fp8_block"
    assert fp8.recipe_for(Q, frozenset({"weight"})) is None  # keyed off weight_scale_inv, as DeepSeek's code is
    oss = _detect(_dir(tmp_path, "o"),
                  {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "lm_head"]})
    assert isinstance(oss, GptOssScheme) and oss.recipe_for(Q, ALL) is None
    assert oss.excluded_by(Q) == "model.layers.*.self_attn"


def test_autogptq_quantize_config_json(tmp_path):
    scheme = _detect(tmp_path, quantize_config={"bits": 4, "group_size": 128, "desc_act": False, "sym": True})
    assert isinstance(scheme, GPTQScheme) and "quantize_config.json" in scheme.description


@pytest.mark.parametrize("module, pattern, matches", [
    (Q, "model.layers.0.self_attn.qkv_proj", True),  # fused name of a split projection
    ("model.layers.2.mlp.up_proj", "*.gate_up_proj", True),
    ("model.layers.2.mlp.down_proj", "*.gate_up_proj", False),
    (Q, "model.layers.*.self_attn", True),  # a pattern covers submodules
    (Q, "model.layers.0*", True),
    ("lm_head", "lm_head", True),
    ("model.layers.1.self_attn.q_proj", "model.layers.0.self_attn", False),
    ("model.layers.10.self_attn.q_proj", "model.layers.1.self_attn", False),
])
def test_exclusion_matching(module, pattern, matches):
    assert module_matches(module, pattern) == matches
