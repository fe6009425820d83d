"""Configs from config.json dicts (transformers v4 and v5 layouts), the registry, and real model sizes by
shape: every tensor of transformers' own model (built on the meta device, no memory) maps to a jaxq param
of the same shape (jax.eval_shape), and nothing is left over."""
import jax.numpy as jnp
import pytest
import torch
import transformers as tf

from jaxq.nn.rope import RopeConfig
from models.gemma3 import Gemma3Config
from models.hf_interop import expected_shapes
from models.llama import LlamaConfig
from models.registry import get_model_family, supported_architectures

_LLAMA31_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=131072, tie_word_embeddings=False,
    rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                         high_freq_factor=4.0, original_max_position_embeddings=8192),
)
REAL = [
    ("Llama-3.1-8B", "LlamaForCausalLM", tf.LlamaConfig, tf.LlamaForCausalLM, _LLAMA31_8B),
    ("Qwen2.5-7B", "Qwen2ForCausalLM", tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)),
    ("Qwen3-8B", "Qwen3ForCausalLM", tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)),
    ("gemma-3-1b", "Gemma3ForCausalLM", tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, dict(
        vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512)),
]


@pytest.mark.parametrize("case", REAL, ids=[c[0] for c in REAL])
def test_real_sizes_map_every_transformers_tensor(case):
    _, arch, config_cls, model_cls, kwargs = case
    hf_config = config_cls(**kwargs)
    with torch.device("meta"):
        hf_shapes = {k: tuple(v.shape) for k, v in model_cls(hf_config).state_dict().items()}
    family = get_model_family([arch])
    config = family.config_class.from_hf_config(hf_config.to_dict())
    shapes = expected_shapes(family.module_class(config))
    weight_map = family.weight_map(config)
    mapped = {}
    for name, shape in hf_shapes.items():
        canonical, entry = weight_map.resolve(name)
        if entry is not None:
            assert shapes[entry.path] == shape, name
            mapped[canonical] = entry.path
    assert set(mapped) == set(weight_map.entries) and set(mapped.values()) == set(shapes)


def test_llama_v4_layout_rope_scaling():
    """transformers v4 config.json: rope_theta and rope_scaling ({"type": ...}) at top level."""
    hf = dict(_LLAMA31_8B, model_type="llama", rope_theta=500000.0)
    hf["rope_scaling"] = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192}
    del hf["rope_parameters"]
    config = LlamaConfig.from_hf_config(hf)
    assert config.rope_parameters == RopeConfig("llama3", 500000.0, 8.0, 1.0, 4.0, 8192)
    assert config.head_dim == 128 and config.layer_windows == (None,) * 32


def test_qwen_sliding_layers_follow_transformers():
    hf = tf.Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,
                        use_sliding_window=True, sliding_window=16, max_window_layers=2).to_dict()
    expected = tuple(hf.pop("layer_types"))  # derive them ourselves from use_sliding_window/max_window_layers
    config = LlamaConfig.from_hf_config(hf)
    assert config.layer_types == expected == ("full_attention",) * 2 + ("sliding_attention",) * 2
    assert config.layer_windows == (None, None, 16, 16)


def test_gemma3_multimodal_v4_config_uses_transformers_defaults():
    """gemma-3-4b-it's config.json (transformers 4.50) lists only non-default text_config fields."""
    text = {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text", "num_hidden_layers": 34,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024}
    config = Gemma3Config.from_hf_config({"architectures": ["Gemma3ForConditionalGeneration"], "text_config": text})
    ref = tf.Gemma3TextConfig(**text)
    for field in ("vocab_size", "num_attention_heads", "num_key_value_heads", "head_dim", "query_pre_attn_scalar",
                  "rms_norm_eps", "max_position_embeddings", "sliding_window"):
        assert getattr(config, field) == getattr(ref, field), field
    assert config.layer_types == tuple(ref.layer_types)
    assert config.rope_parameters == RopeConfig("linear", 1_000_000.0, factor=8.0)
    assert config.rope_local_parameters == RopeConfig("default", 10_000.0)
    assert config.tie_word_embeddings


def test_bad_configs_name_the_problem():
    with pytest.raises(ValueError, match="intermediate_size"):
        LlamaConfig.from_hf_config({"vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1})
    with pytest.raises(ValueError, match="longrope"):
        RopeConfig.from_hf({"rope_type": "longrope", "factor": 2.0}, 10000.0, 128)
    with pytest.raises(ValueError, match="factor"):
        RopeConfig.from_hf({"rope_type": "linear"}, 10000.0, 128)
    with pytest.raises(ValueError, match="attn_logit_softcapping"):
        Gemma3Config(hidden_size=8, intermediate_size=8, num_hidden_layers=1, attn_logit_softcapping=50.0)
    with pytest.raises(ValueError, match="gelu_new"):
        LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                    hidden_act="gelu_new")


def test_unknown_architecture_lists_supported_ones():
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as info:
        get_model_family(["GPT2LMHeadModel"])
    assert all(arch in str(info.value) for arch in supported_architectures())
    assert "Gemma3ForConditionalGeneration" in supported_architectures()


def test_init_kv_cache_shapes():
    config = LlamaConfig(vocab_size=8, hidden_size=32, intermediate_size=8, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    cache = get_model_family(["LlamaForCausalLM"]).init_kv_cache(config, 2, 16, jnp.float8_e4m3fn, k_scale=0.5)
    assert len(cache.k) == 3 and cache.k[0].shape == (2, 2, 16, 8) and cache.k[0].dtype == jnp.float8_e4m3fn
    assert cache.k_scale.tolist() == [0.5] * 3 and cache.v_scale.tolist() == [1.0] * 3
