"""jaxq models loaded from transformers-written checkpoints reproduce transformers' float32 logits."""
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tf

from .hf_reference import hf_logits, right_padded_batch, save_random_hf_model
from jaxq.io.hf_checkpoint import load_hf_params

_SIZES = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2,
)
_GEMMA_TEXT = dict(
    _SIZES, head_dim=16, query_pre_attn_scalar=24, sliding_window=4, final_logit_softcapping=3.0,
    layer_types=["sliding_attention", "full_attention"],
    rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
    },
)

# (id, config class, model class, config kwargs). Sequences are 12 long; windows and rope lengths are shorter
# so that sliding windows, llama3/yarn frequency bands and dynamic NTK growth all take effect.
CASES = [
    ("llama3_rope", tf.LlamaConfig, tf.LlamaForCausalLM, dict(
        _SIZES, max_position_embeddings=64, rope_parameters=dict(
            rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=8))),
    ("llama_linear_tied_biases", tf.LlamaConfig, tf.LlamaForCausalLM, dict(
        _SIZES, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
        rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))),
    ("llama_dynamic", tf.LlamaConfig, tf.LlamaForCausalLM, dict(
        _SIZES, max_position_embeddings=8, rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0))),
    ("llama_yarn", tf.LlamaConfig, tf.LlamaForCausalLM, dict(
        _SIZES, max_position_embeddings=32, rope_parameters=dict(
            rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=8))),
    ("mistral_sliding", tf.MistralConfig, tf.MistralForCausalLM, dict(_SIZES, sliding_window=4)),
    ("qwen2_bias_tied", tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(_SIZES, tie_word_embeddings=True)),
    ("qwen3_qk_norm", tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(_SIZES, head_dim=32)),
    ("gemma3_text", tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, _GEMMA_TEXT),
    ("gemma3_untied", tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, dict(_GEMMA_TEXT, tie_word_embeddings=False)),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_logits_match_transformers(case, tmp_path):
    _, config_cls, model_cls, kwargs = case
    torch_model = save_random_hf_model(tmp_path, config_cls, model_cls, **kwargs)
    tokens, mask = right_padded_batch(kwargs["vocab_size"], (12, 8))
    family, config, params = load_hf_params(tmp_path, dtype=jnp.float32)
    logits, cache = family.module_class(config).apply({"params": params}, jnp.asarray(tokens),
                                                      attention_mask=jnp.asarray(mask))
    assert cache is None and logits.dtype == jnp.float32
    valid = mask.astype(bool)
    err = np.abs(np.asarray(logits) - hf_logits(torch_model, tokens, mask))[valid].max()
    assert err < 1e-4, f"max abs diff {err}"


def test_gemma3_conditional_generation_text_part(tmp_path):
    """Gemma3ForConditionalGeneration: the text decoder loads (vision tower dropped) and matches text-only logits."""
    vision = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=16, patch_size=4)
    torch_model = save_random_hf_model(tmp_path, tf.Gemma3Config, tf.Gemma3ForConditionalGeneration,
                                       text_config=_GEMMA_TEXT, vision_config=vision, mm_tokens_per_image=4)
    tokens, mask = right_padded_batch(_GEMMA_TEXT["vocab_size"], (12, 8))
    family, config, params = load_hf_params(tmp_path, dtype=jnp.float32)
    logits, _ = family.module_class(config).apply({"params": params}, jnp.asarray(tokens),
                                                  attention_mask=jnp.asarray(mask))
    err = np.abs(np.asarray(logits) - hf_logits(torch_model, tokens, mask))[mask.astype(bool)].max()
    assert err < 1e-4, f"max abs diff {err}"
