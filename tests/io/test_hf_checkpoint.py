"""load_hf_params: single and sharded checkpoints, and clear errors for bad ones (each names the tensor,
the shapes, the architecture or the file)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from safetensors.numpy import load_file, save_file

from jaxq.io.hf_checkpoint import load_hf_params

_CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2)


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny untied Llama checkpoint (float32 safetensors) at tmp_path / "ckpt"."""
    torch.manual_seed(0)
    path = tmp_path / "ckpt"
    tf.LlamaForCausalLM(tf.LlamaConfig(**_CONFIG)).save_pretrained(path)
    return path


def _rewrite(path, edit):
    """Apply edit(dict of numpy tensors) to the checkpoint's model.safetensors in place."""
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_loads_params_in_the_requested_dtype(checkpoint):
    family, config, params = load_hf_params(checkpoint)
    assert family.name == "llama" and config.num_key_value_heads == 2
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    q = params["model"]["layers_1"]["self_attn"]["q_proj"]["weight"]
    expected = load_file(checkpoint / "model.safetensors")["model.layers.1.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(np.asarray(q), expected.astype(jnp.bfloat16))


def test_sharded_checkpoint_equals_single_file(checkpoint, tmp_path):
    model = tf.LlamaForCausalLM.from_pretrained(checkpoint)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    _, _, single = load_hf_params(checkpoint, dtype=jnp.float32)
    _, _, sharded = load_hf_params(tmp_path / "sharded", dtype=jnp.float32)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), single, sharded))


def test_missing_tensor_is_named(checkpoint):
    _rewrite(checkpoint, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing .*model\.layers\.1\.mlp\.up_proj\.weight \(48, 32\)"):
        load_hf_params(checkpoint)


def test_wrong_shape_names_tensor_shapes_and_file(checkpoint):
    _rewrite(checkpoint, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((8, 32), np.float32)}))
    with pytest.raises(ValueError) as info:
        load_hf_params(checkpoint)
    message = str(info.value)
    for part in ("model.layers.0.self_attn.k_proj.weight", "(8, 32)", "expected (16, 32)", "model.safetensors"):
        assert part in message


def test_unexpected_tensor_is_an_error_but_inv_freq_is_not(checkpoint):
    _rewrite(checkpoint, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)}))
    load_hf_params(checkpoint)
    _rewrite(checkpoint, lambda t: t.update({"model.layers.0.self_attn.extra.weight": np.ones(4, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.extra\.weight'"):
        load_hf_params(checkpoint)


def test_tensor_in_two_shards_is_an_error(checkpoint):
    tensors = load_file(checkpoint / "model.safetensors")
    save_file({"model.norm.weight": tensors["model.norm.weight"]}, checkpoint / "extra.safetensors")
    index = {"weight_map": {**{n: "model.safetensors" for n in tensors}, "x": "extra.safetensors"}}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' appears twice"):
        load_hf_params(checkpoint)


def test_index_naming_an_absent_shard(checkpoint):
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        load_hf_params(checkpoint)


def test_unknown_architecture_is_named(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*LlamaForCausalLM"):
        load_hf_params(checkpoint)


def test_pickle_checkpoints_are_refused(checkpoint):
    (checkpoint / "model.safetensors").rename(checkpoint / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pickle weights \['pytorch_model\.bin'\].*safetensors"):
        load_hf_params(checkpoint)
    with pytest.raises(ValueError, match="pickle file"):
        load_hf_params(checkpoint / "pytorch_model.bin")


def test_quantized_checkpoints_are_refused(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "modelopt"}
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quant_method 'modelopt'"):
        load_hf_params(checkpoint)
