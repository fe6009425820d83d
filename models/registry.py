"""Model families keyed by Hugging Face `architectures`, so the API reaches models without import cycles.

    family = get_model_family(hf_config["architectures"])
    config = family.config_class.from_hf_config(hf_config)
    module = family.module_class(config)                   # dtype=None: compute in the params' dtype
    params = family.hf_to_params(tensors, config, dtype)   # {HF name: array} -> params
    cache = family.init_kv_cache(config, batch, max_len, jnp.bfloat16)
"""
import dataclasses
import functools
from typing import Any, Callable, Mapping

import numpy as np

from jaxq.nn.kv_cache import KVCache
from models.hf_interop import ParamsBuilder, WeightMap, expected_shapes


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """How one HF architecture maps onto jaxq: config class, Flax module, HF-name -> params table."""

    name: str
    config_class: type
    module_class: type
    weight_map: Callable[[Any], WeightMap]

    def hf_to_params(self, tensors: Mapping[str, Any], config, dtype) -> dict:
        """params from in-memory {HF name: array} (e.g. a dequantized GGUF renamed to HF names)."""
        builder = ParamsBuilder(self.weight_map(config), expected_shapes(self.module_class(config)), dtype)
        for name, array in tensors.items():
            builder.add(name, np.shape(array), lambda a=array: a, "<in-memory tensors>")
        return builder.finish("<in-memory tensors>")

    def init_kv_cache(self, config, batch: int, max_len: int, dtype, k_scale=None, v_scale=None) -> KVCache:
        """An empty KVCache: per layer [batch, H_kv, max_len, head_dim] in dtype (compute dtype or FP8 E4M3);
        k_scale/v_scale ([L] or scalar, ModelOpt's amax / 448) only matter for FP8."""
        return KVCache.create(
            config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim, dtype,
            k_scale, v_scale,
        )


@functools.cache
def _families() -> dict[str, ModelFamily]:
    # Imported on first use: the model modules import jaxq.nn, and importing jaxq (jaxq/__init__) imports the API,
    # which imports this registry; top-level imports here would make that a cycle.
    from models import gemma3, llama

    llama_family = ModelFamily("llama", llama.LlamaConfig, llama.LlamaForCausalLM, llama.weight_map)
    gemma3_family = ModelFamily("gemma3", gemma3.Gemma3Config, gemma3.Gemma3ForCausalLM, gemma3.weight_map)
    gemma3_multimodal = dataclasses.replace(
        gemma3_family, name="gemma3_multimodal", weight_map=functools.partial(gemma3.weight_map, multimodal=True)
    )
    return {
        "LlamaForCausalLM": llama_family,
        "MistralForCausalLM": llama_family,
        "Qwen2ForCausalLM": llama_family,
        "Qwen3ForCausalLM": llama_family,
        "Gemma3ForCausalLM": gemma3_family,
        "Gemma3ForConditionalGeneration": gemma3_multimodal,
    }


def supported_architectures() -> list[str]:
    return sorted(_families())


def get_model_family(architectures: list[str]) -> ModelFamily:
    """The family of the first supported entry of config.json's `architectures`; ValueError otherwise."""
    for arch in architectures:
        if arch in _families():
            return _families()[arch]
    raise ValueError(
        f"unsupported architecture(s) {list(architectures)}; jaxq supports {supported_architectures()}"
    )
