"""GGUF loading on small files written here the way llama.cpp's converter writes them (permuted Llama q/k rows,
Gemma norms stored as 1 + w, one Q8_0 tensor), checked against the float32 transformers model they came from."""
import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf

from jaxq.io import gguf_checkpoint
from jaxq.io.gguf_checkpoint import _unpermute_rope_rows, load_gguf_params

from ..models.hf_reference import save_random_hf_model

SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, rms_norm_eps=1e-5)


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp convert_hf_to_gguf.py, LlamaModel.permute: within each head, interleave the two rotate-half halves.
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_BLOCK = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
          "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "self_attn.q_norm": "attn_q_norm",
          "self_attn.k_norm": "attn_k_norm", "post_feedforward_layernorm": "post_ffw_norm"}


def _gguf_name(arch: str, hf_name: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    block = dict(_BLOCK, post_attention_layernorm="ffn_norm" if arch == "llama" else "post_attention_norm",
                 pre_feedforward_layernorm="ffn_norm")
    return f"blk.{layer}.{block[module]}.{kind}"


def _write_gguf(path, arch: str, model, metadata) -> None:
    """Write `model` as llama.cpp would: its metadata keys, its tensor names and transforms; ffn_down of layer 0
    as Q8_0 (the torch model gets the dequantised weight so both sides see the same numbers)."""
    cfg = model.config
    tensors = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = tensor.numpy().astype(np.float32)
        if arch == "llama" and hf_name.endswith("q_proj.weight"):
            w = _llama_cpp_permute(w, cfg.num_attention_heads)
        if arch == "llama" and hf_name.endswith("k_proj.weight"):
            w = _llama_cpp_permute(w, cfg.num_key_value_heads)
        if arch == "gemma3" and hf_name.endswith("norm.weight"):
            w = w + 1.0
        if hf_name == "model.layers.0.mlp.down_proj.weight":
            q = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
            with torch.no_grad():
                tensor.copy_(torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)))
            w = q
        tensors[_gguf_name(arch, hf_name)] = w
    _minimal(path, arch, tensors, metadata, cfg)


def _common_metadata(writer, cfg):
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_eos_token_id(5)
    writer.add_eot_token_id(7)


def _llama_metadata(writer, cfg):
    _common_metadata(writer, cfg)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(cfg.head_dim)


def _gemma3_metadata(writer, cfg):
    _common_metadata(writer, cfg)
    writer.add_rope_freq_base(cfg.rope_parameters["full_attention"]["rope_theta"])
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_sliding_window(cfg.sliding_window)


CASES = {
    "llama_tied": ("llama", tf.LlamaConfig, tf.LlamaForCausalLM, _llama_metadata,
                   dict(SIZES, num_hidden_layers=2, tie_word_embeddings=True, rope_theta=50000.0)),
    "llama_untied": ("llama", tf.LlamaConfig, tf.LlamaForCausalLM, _llama_metadata,
                     dict(SIZES, num_hidden_layers=2, tie_word_embeddings=False)),
    # Six layers: llama.cpp's fixed Gemma 3 pattern (five sliding, one global) is what the GGUF implies.
    "gemma3": ("gemma3", tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, _gemma3_metadata,
               dict(SIZES, num_hidden_layers=6, head_dim=16, query_pre_attn_scalar=16, sliding_window=4)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gguf_logits_match_the_source_model(case, tmp_path):
    arch, config_cls, model_cls, metadata, kwargs = CASES[case]
    model = save_random_hf_model(tmp_path / "hf", config_cls, model_cls, **kwargs)
    path = tmp_path / "m.gguf"
    _write_gguf(path, arch, model, metadata)
    assert {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors} == {"F32", "Q8_0"}
    family, config, params, hf_config, eos = load_gguf_params(path, jnp.float32)
    assert eos == (5, 7)
    assert hf_config["tie_word_embeddings"] == model.config.tie_word_embeddings
    assert ("lm_head" in params) == (not model.config.tie_word_embeddings)
    tokens = np.random.RandomState(0).randint(0, 128, (2, 12))
    logits, _ = family.module_class(config).apply({"params": params}, jnp.asarray(tokens, jnp.int32))
    with torch.no_grad():
        expected = model(torch.tensor(tokens)).logits.numpy()
    err = np.abs(np.asarray(logits) - expected).max()
    assert err < 1e-4, f"max abs logit diff {err}"


def test_unpermute_inverts_llama_cpp():
    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(32, 3)
    np.testing.assert_array_equal(_unpermute_rope_rows(_llama_cpp_permute(w, 4), 4), w)
    assert not np.array_equal(_llama_cpp_permute(w, 4), w)


def test_gemma3_layer_pattern_from_metadata():
    assert gguf_checkpoint._gemma3_layer_types(2, 4) == ["sliding_attention", "full_attention"] * 2
    assert gguf_checkpoint._gemma3_layer_types([True, False], 2) == ["sliding_attention", "full_attention"]


def _minimal(path, arch, tensors, metadata=None, cfg=None):
    writer = gguf.GGUFWriter(str(path), arch)
    if metadata is not None:
        metadata(writer, cfg)
    for name, w in tensors.items():  # uint8 arrays are Q8_0 blocks
        writer.add_tensor(name, w, raw_dtype=gguf.GGMLQuantizationType.Q8_0 if w.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unsupported_architecture_is_named(tmp_path):
    _minimal(tmp_path / "x.gguf", "falcon", {"token_embd.weight": np.zeros((4, 4), np.float32)})
    with pytest.raises(ValueError, match=r"GGUF architecture 'falcon' is not supported"):
        load_gguf_params(tmp_path / "x.gguf")


def test_unknown_tensor_is_named():
    with pytest.raises(ValueError, match=r"GGUF tensor 'blk.0.ssm_conv1d.weight' has no HF name"):
        gguf_checkpoint._hf_name("llama", "blk.0.ssm_conv1d.weight")


def test_rope_factor_tensor_is_refused(tmp_path):
    cfg = tf.LlamaConfig(**SIZES, num_hidden_layers=1)
    _minimal(tmp_path / "m.gguf", "llama", {"rope_freqs.weight": np.ones(8, np.float32)}, _llama_metadata, cfg)
    with pytest.raises(NotImplementedError, match="rope_freqs.weight"):
        load_gguf_params(tmp_path / "m.gguf")


def test_missing_metadata_is_named(tmp_path):
    _minimal(tmp_path / "m.gguf", "llama", {"token_embd.weight": np.zeros((4, 4), np.float32)})
    with pytest.raises(ValueError, match=r"GGUF metadata lacks llama.embedding_length"):
        load_gguf_params(tmp_path / "m.gguf")
