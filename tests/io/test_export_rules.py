"""jaxq.export's rules beyond the recipe matrix: tied embeddings, mixed recipes, sharding, the plain "hf" and
native formats, and the refusals that leave nothing on disk (bad scales, fused layers with different shared
scales, unquantized models)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq.io.export.writer import INDEX
from jaxq.io.safetensors_file import SafetensorsFile
from jaxq.loaded_model import random_model
from jaxq.recipes import QuantConfig, get_recipe

TINY = dict(architectures=["LlamaForCausalLM"], vocab_size=128, hidden_size=128, intermediate_size=256,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
TOKENS = np.random.RandomState(0).randint(0, 128, 4 * 32).astype(np.int32)
KW = dict(calib_data=TOKENS, calib_size=4, calib_seq=32, progress=False)
MIXED = QuantConfig(rules=(
    (r"mlp\.(gate|up)_proj", get_recipe("nvfp4")),
    (r"mlp\.down_proj", get_recipe("w4a16_awq", algorithm="max", group_size=64)),
    (r"layers\.1\.self_attn\.o_proj", None),
    (r".*", get_recipe("fp8")),
), kv_cache="fp8")


def same_logits(a, b):
    np.testing.assert_array_equal(np.asarray(jaxq.logits(a, TOKENS[:40])), np.asarray(jaxq.logits(b, TOKENS[:40])))


def names(directory):
    return {n for p in directory.glob("*.safetensors") for n in SafetensorsFile(p).keys()}


@pytest.fixture(scope="module")
def tiny():
    return random_model(TINY, "bfloat16", seed=1)


@pytest.fixture(scope="module")
def fp8(tiny):
    return jaxq.quantize(tiny, "fp8", kv_cache="fp8", **KW)


def test_tied_embeddings_write_no_lm_head(tmp_path):
    q = jaxq.quantize(random_model(dict(TINY, tie_word_embeddings=True), "bfloat16", seed=2), "nvfp4", **KW)
    for fmt in ("modelopt", "compressed-tensors"):
        out = jaxq.export(q, tmp_path / fmt, format=fmt, progress=False)
        assert not any(n.startswith("lm_head") for n in names(out))
        assert jaxq.check(out) == []
        same_logits(jaxq.load(out), q)
    exclude = json.loads((tmp_path / "modelopt" / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    assert exclude == ["lm_head", "model.embed_tokens"]


def test_mixed_recipes(tiny, tmp_path):
    q = jaxq.quantize(tiny, MIXED, **KW)
    out = jaxq.export(q, tmp_path / "mo", format="modelopt", progress=False)
    quantization = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert quantization["quant_algo"] == "MIXED_PRECISION" and quantization["kv_cache_quant_algo"] == "FP8"
    layers = quantization["quantized_layers"]
    assert layers["model.layers.0.mlp.down_proj"] == {"quant_algo": "W4A16_AWQ", "group_size": 64}
    assert layers["model.layers.0.mlp.up_proj"] == {"quant_algo": "NVFP4", "group_size": 16}
    assert "model.layers.1.self_attn.o_proj" not in layers and "lm_head" not in layers
    assert jaxq.check(out) == []
    loaded = jaxq.load(out)
    same_logits(loaded, q)
    for got, want in zip(loaded.kv_scales, q.kv_scales):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    ct = jaxq.quantize(tiny, QuantConfig(rules=MIXED.rules[:1] + MIXED.rules[2:]), **KW)
    out = jaxq.export(ct, tmp_path / "ct", format="compressed-tensors", progress=False)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "mixed-precision" and len(config["config_groups"]) == 2
    assert config["ignore"] == ["lm_head", "model.layers.1.self_attn.o_proj"]
    assert jaxq.check(out) == []
    same_logits(jaxq.load(out), ct)


def test_sharded_export(fp8, tmp_path):
    out = jaxq.export(fp8, tmp_path / "sharded", format="modelopt", max_shard_bytes=60_000, progress=False)
    index = json.loads((out / INDEX).read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(shards) and set(index["weight_map"]) == names(out)
    assert index["metadata"]["total_size"] == sum(
        f.stat().st_size - 8 - int.from_bytes(f.read_bytes()[:8], "little") for f in out.glob("*.safetensors"))
    assert jaxq.check(out) == []
    same_logits(jaxq.load(out), fp8)


@pytest.mark.parametrize("fmt", ["modelopt", "compressed-tensors"])
@pytest.mark.parametrize("bad", [float("nan"), 0.0])
def test_bad_scale_is_refused_before_writing(fp8, fmt, bad, tmp_path):
    layer = fp8.params["model"]["layers_1"]["mlp"]["down_proj"]
    broken = layer["weight"].replace(input_scale=jnp.asarray(bad, jnp.float32))
    params = jax.tree.map(lambda x: x, fp8.params)  # a copy of the dict tree (arrays shared)
    params["model"]["layers_1"]["mlp"]["down_proj"]["weight"] = broken
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.input_scale has 1 (NaN/Inf|zero)"):
        jaxq.export(fp8.replace(params=params), tmp_path / "out", format=fmt, progress=False)
    assert not (tmp_path / "out").exists()


def test_fused_layers_must_share_scales_for_tensorrt_llm(tiny, tmp_path):
    q = jaxq.quantize(tiny, "nvfp4", **KW)
    attn = q.params["model"]["layers_0"]["self_attn"]
    attn["k_proj"]["weight"] = attn["k_proj"]["weight"].replace(input_scale=attn["k_proj"]["weight"].input_scale * 2)
    with pytest.raises(ValueError, match=r"fused layers .*self_attn\.q_proj.*different input_scale.*TensorRT-LLM"):
        jaxq.export(q, tmp_path / "mo", format="modelopt", progress=False)
    jaxq.export(q, tmp_path / "ct", format="compressed-tensors", progress=False)  # vLLM takes the max itself


def test_zero_nvfp4_block_scale_is_written_as_one(tiny, tmp_path):
    """A block whose E4M3 scale underflows to 0 (all codes 0) is the same block with scale 1: every loader
    refuses zero scales, so the exporter writes 1."""
    q = jaxq.quantize(tiny, "nvfp4", **KW)
    mlp = q.params["model"]["layers_0"]["mlp"]
    w = mlp["up_proj"]["weight"].weight
    codes = w.codes().at[3, :16].set(0)
    from jaxq.formats import pack_nibbles

    mlp["up_proj"]["weight"] = mlp["up_proj"]["weight"].replace(weight=w.replace(
        packed=pack_nibbles(codes), block_scale=w.block_scale.at[3, 0].set(0)))
    for fmt in ("modelopt", "compressed-tensors"):
        out = jaxq.export(q, tmp_path / fmt, format=fmt, progress=False)
        assert jaxq.check(out) == []
        same_logits(jaxq.load(out), q)


def test_hf_and_native_formats(tiny, fp8, tmp_path):
    out = jaxq.export(tiny, tmp_path / "hf", format="hf", progress=False)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert jaxq.check(out) == []
    same_logits(jaxq.load(out), tiny)
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2,
                                                                       "pad_token_id": 2}
    with pytest.raises(ValueError, match="format 'hf' writes unquantized models.*14 quantized linears and FP8 KV"):
        jaxq.export(fp8, tmp_path / "hf2", format="hf", progress=False)
    with pytest.raises(ValueError, match="no quantized linear layers; quantize it first"):
        jaxq.export(tiny, tmp_path / "mo", format="modelopt", progress=False)
    native = jaxq.export(fp8, tmp_path / "native", format="jaxq")
    same_logits(jaxq.load(native), fp8)
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        jaxq.export(fp8, tmp_path / "hf", format="modelopt", progress=False)
    with pytest.raises(ValueError, match="unknown export format 'gguf'"):
        jaxq.export(fp8, tmp_path / "x", format="gguf")
