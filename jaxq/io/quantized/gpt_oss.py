"""GPT-OSS MXFP4 checkpoints (spec 5.2): `quant_method: "mxfp4"`, only the MoE experts are MXFP4.

config.json quantization_config: {"quant_method": "mxfp4", "modules_to_not_convert":
["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}. Per layer L:

| tensor (`model.layers.L.mlp.experts.`) | dtype | shape |
|---|---|---|
| gate_up_proj_blocks | U8 | [E, 2I, H/32, 16], rows interleave gate (2j) and up (2j + 1) |
| gate_up_proj_scales | U8 E8M0 | [E, 2I, H/32] |
| gate_up_proj_bias | BF16 | [E, 2I] |
| down_proj_blocks | U8 | [E, H, I/32, 16] |
| down_proj_scales | U8 E8M0 | [E, H, I/32] |
| down_proj_bias | BF16 | [E, H] |

W = e2m1(nibble, low = even k) * 2**(scale - 127). jaxq has no GPT-OSS model yet, so no linear of a loaded
model is MXFP4 under this scheme; `experts_from_gpt_oss` converts one layer's experts for the MoE block.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxq.formats import deinterleave_gate_up, from_gpt_oss_mxfp4
from jaxq.io.quantized.scheme import FLOAT_DTYPES, Scheme, TensorSpec, e8m0_finite
from jaxq.nn.quantized_weight import QuantizedWeight
from jaxq.recipes import get_recipe

# Hopper has no FP4 tensor cores: the experts run as W4A16 (TRT-LLM's W4A16_MXFP4 on SM90).
RECIPE = get_recipe("mxfp4")


class GptOssScheme(Scheme):
    """config: the `quant_method: "mxfp4"` quantization_config."""

    def __init__(self, config: Mapping[str, Any], source: str = "config.json quantization_config"):
        self.exclusions = tuple(config.get("modules_to_not_convert") or ())
        self.entries_field = f"{source}.modules_to_not_convert"
        self.description = f"GPT-OSS MXFP4 experts ({source.split()[0]})"

    def recipe_for(self, module, roles):
        return None  # attention, router, embeddings and lm_head stay bf16; experts are not QDense linears

    def tensor_specs(self, recipe, n, k):
        raise ValueError("GPT-OSS stores no quantized linear; its experts load with experts_from_gpt_oss")

    def build(self, recipe, tensors, dtype):
        raise ValueError("GPT-OSS stores no quantized linear; its experts load with experts_from_gpt_oss")


def expert_specs(num_experts: int, intermediate: int, hidden: int) -> dict[str, TensorSpec]:
    """{suffix of `model.layers.L.mlp.experts.`: TensorSpec} of one layer's experts (table above)."""
    e, i, h = num_experts, intermediate, hidden
    if h % 32 or i % 32:
        raise ValueError(f"hidden {h} and intermediate {i} must be multiples of the MXFP4 block 32")
    return {
        "gate_up_proj_blocks": TensorSpec(("U8",), ((e, 2 * i, h // 32, 16),), "[E, 2I, H/32, 16]"),
        "gate_up_proj_scales": TensorSpec(("U8",), ((e, 2 * i, h // 32),), "[E, 2I, H/32] E8M0", e8m0_finite),
        "gate_up_proj_bias": TensorSpec(FLOAT_DTYPES, ((e, 2 * i),), "[E, 2I]"),
        "down_proj_blocks": TensorSpec(("U8",), ((e, h, i // 32, 16),), "[E, H, I/32, 16]"),
        "down_proj_scales": TensorSpec(("U8",), ((e, h, i // 32),), "[E, H, I/32] E8M0", e8m0_finite),
        "down_proj_bias": TensorSpec(FLOAT_DTYPES, ((e, h),), "[E, H]"),
    }


def experts_from_gpt_oss(tensors: Mapping[str, jax.Array], dtype=jnp.bfloat16) -> dict[str, Any]:
    """One layer's experts, keyed by the suffixes of expert_specs, as jaxq params in HF orientation:
    {"gate_proj": {"weight": QuantizedWeight [E, I, H], "bias": [E, I]}, "up_proj": {...},
     "down_proj": {"weight": QuantizedWeight [E, H, I], "bias": [E, H]}}, gate and up de-interleaved
    (rows 0::2 and 1::2 of gate_up_proj) and biases cast to dtype."""
    gate_up = from_gpt_oss_mxfp4(tensors["gate_up_proj_blocks"], tensors["gate_up_proj_scales"])
    gate, up = deinterleave_gate_up(gate_up)
    bias = tensors["gate_up_proj_bias"].astype(dtype)
    down = from_gpt_oss_mxfp4(tensors["down_proj_blocks"], tensors["down_proj_scales"])
    return {
        "gate_proj": {"weight": QuantizedWeight(recipe=RECIPE, weight=gate), "bias": bias[..., 0::2]},
        "up_proj": {"weight": QuantizedWeight(recipe=RECIPE, weight=up), "bias": bias[..., 1::2]},
        "down_proj": {"weight": QuantizedWeight(recipe=RECIPE, weight=down),
                      "bias": tensors["down_proj_bias"].astype(dtype)},
    }
