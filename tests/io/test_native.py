"""jaxq.save / jaxq.load: a quantized model (several recipes, FP8 KV scales) round-trips through orbax with the
same pytree, the same logits and its QuantConfig; unquantized models too; errors."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq.io import native
from jaxq.loaded_model import random_model
from jaxq.nn.quantized_weight import QuantizedWeight
from jaxq.recipes import QuantConfig, get_recipe

TINY = dict(architectures=["LlamaForCausalLM"], vocab_size=128, hidden_size=128, intermediate_size=256,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            tie_word_embeddings=False)
TOKENS = np.random.RandomState(0).randint(0, 128, 4 * 32).astype(np.int32)
# one layer of each weight layout: NVFP4 (W4A4), W4A8 INT4 (weight_scale_2), asymmetric INT4 (zero points),
# MXFP4, FP8 blocks and per-tensor FP8
CONFIG = QuantConfig(rules=(
    (r"layers\.0\.mlp\.(gate|up)_proj", get_recipe("nvfp4")),
    (r"layers\.0\.mlp\.down_proj", get_recipe("w4a8_awq", algorithm="max")),
    (r"layers\.1\.mlp\.down_proj", get_recipe("w4a16_gptq", algorithm="max", symmetric=False, group_size=64)),
    (r"layers\.1\.mlp\.", get_recipe("mxfp4")),
    (r"q_proj", get_recipe("fp8_block")),
    (r".*", get_recipe("fp8")),
), kv_cache="fp8")


@pytest.fixture(scope="module")
def quantized():
    model = random_model(TINY, "bfloat16", seed=1)
    return jaxq.quantize(model, CONFIG, calib_data=TOKENS, calib_size=4, calib_seq=32, progress=False)


def test_quantized_round_trip(quantized, tmp_path):
    path = jaxq.save(quantized, tmp_path / "q")
    restored = jaxq.load(path)
    assert jax.tree.structure(restored.params) == jax.tree.structure(quantized.params)
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(quantized.params)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a).reshape(-1).view(np.uint8), np.asarray(b).reshape(-1).view(np.uint8))
    np.testing.assert_array_equal(np.asarray(jaxq.logits(restored, TOKENS[:40])),
                                  np.asarray(jaxq.logits(quantized, TOKENS[:40])))
    assert restored.quantization == CONFIG and restored.dtype == jnp.bfloat16
    for got, want in zip(restored.kv_scales, quantized.kv_scales):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    manifest = json.loads((path / native.MANIFEST).read_text())
    assert manifest["structs"]["model/layers_0/mlp/down_proj/weight"]["static"]["recipe"]["recipe"]["name"] == "w4a8_awq"


def test_unquantized_round_trip_and_dtype_cast(tmp_path):
    model = random_model(TINY, "float32", seed=2)
    jaxq.save(model, tmp_path / "plain")
    same = jaxq.load(tmp_path / "plain", dtype="float32")
    assert same.quantization is None and same.kv_scales is None
    np.testing.assert_array_equal(np.asarray(jaxq.logits(same, TOKENS[:16])), np.asarray(jaxq.logits(model, TOKENS[:16])))
    cast = jaxq.load(tmp_path / "plain")  # jaxq.load's default dtype: bfloat16
    assert {leaf.dtype for leaf in jax.tree.leaves(cast.params)} == {jnp.dtype(jnp.bfloat16)}


def test_quantized_weights_keep_their_formats_when_cast(quantized, tmp_path):
    jaxq.save(quantized, tmp_path / "q")
    cast = native.load(tmp_path / "q", dtype="float32")
    qw = cast.params["model"]["layers_0"]["mlp"]["gate_proj"]["weight"]
    assert isinstance(qw, QuantizedWeight) and qw.weight.block_scale.dtype == jnp.float8_e4m3fn
    assert cast.params["model"]["norm"]["weight"].dtype == jnp.float32


def test_errors(quantized, tmp_path):
    jaxq.save(quantized, tmp_path / "q")
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        jaxq.save(quantized, tmp_path / "q")
    jaxq.save(quantized, tmp_path / "q", overwrite=True)
    manifest = json.loads((tmp_path / "q" / native.MANIFEST).read_text())
    (tmp_path / "q" / native.MANIFEST).write_text(json.dumps(dict(manifest, version=99)))
    with pytest.raises(ValueError, match="version 99, expected 'jaxq-native' version 1"):
        jaxq.load(tmp_path / "q")
