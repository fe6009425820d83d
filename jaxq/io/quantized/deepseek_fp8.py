"""Hugging Face `quant_method: "fp8"` checkpoints (spec 5.1, 5.5): DeepSeek-V3/R1 128x128 blocks, or
per-tensor FP8 with static activation scales.

config.json quantization_config: {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
"weight_block_size": [128, 128], "modules_to_not_convert": [...]}. As DeepSeek's own fp8_cast_bf16.py does,
a linear is quantized when it carries its scale:

* weight_block_size [b, b], dynamic activations -> fp8_block (dynamic 1 x b activation groups):
  weight F8_E4M3 [N, K], weight_scale_inv F32 [ceil(N/b), ceil(K/b)].
* no block size, static activations -> fp8: weight F8_E4M3 [N, K], weight_scale F32 [], input_scale F32 [].

`weight_scale_inv` is, despite its name, a dequant multiplier (block amax / 448): W = q * s[n // b, k // b].
"""

from __future__ import annotations

from typing import Any, Mapping

from jaxq.io.quantized.scheme import Scheme, fp8_weight, fp8_weight_specs, scalar, scalar_spec
from jaxq.nn.quantized_weight import QuantizedWeight
from jaxq.recipes import get_recipe


class FP8Scheme(Scheme):
    """config: the `quant_method: "fp8"` quantization_config (ValueError names an unsupported field)."""

    def __init__(self, config: Mapping[str, Any], source: str = "config.json quantization_config"):
        if config.get("fmt", "e4m3") != "e4m3":
            raise ValueError(f"{source}.fmt is {config.get('fmt')!r}; jaxq loads E4M3 FP8 weights only")
        if config.get("scale_fmt") not in (None, "float"):
            raise ValueError(f"{source}.scale_fmt is {config['scale_fmt']!r}; power-of-two activation scales are "
                             "not supported")
        block, acts = config.get("weight_block_size"), config.get("activation_scheme", "dynamic")
        if block is not None:
            if not (isinstance(block, list) and len(block) == 2 and block[0] == block[1] and isinstance(block[0], int)
                    and block[0] > 0):
                raise ValueError(f"{source}.weight_block_size is {block!r}; jaxq loads square blocks [b, b]")
            if acts != "dynamic":
                raise ValueError(f"{source}.activation_scheme is {acts!r}; block-scaled FP8 runs with dynamic "
                                 "activation groups")
            self.recipe, self.scale_role = get_recipe("fp8_block", group_size=block[0]), "weight_scale_inv"
        elif acts == "static":
            self.recipe, self.scale_role = get_recipe("fp8"), "weight_scale"
        else:
            raise ValueError(f"{source} has activation_scheme {acts!r} without weight_block_size; jaxq loads "
                             "block-scaled FP8 (weight_block_size) or per-tensor FP8 with static activations")
        self.exclusions = tuple(config.get("modules_to_not_convert") or config.get("ignored_layers") or ())
        self.entries_field = f"{source}.modules_to_not_convert"
        self.description = f"FP8 {'block ' + str(block) if block else 'per-tensor'} ({source.split()[0]})"

    def recipe_for(self, module, roles):
        return None if self.scale_role not in roles or self.excluded_by(module) else self.recipe

    def tensor_specs(self, recipe, n, k):
        specs = fp8_weight_specs(recipe, n, k, self.scale_role)
        if recipe.activation == "fp8_static":
            specs["input_scale"] = scalar_spec("static activation scale")
        return specs

    def build(self, recipe, tensors, dtype):
        return QuantizedWeight(
            recipe=recipe, weight=fp8_weight(recipe, tensors["weight"], tensors[self.scale_role]),
            input_scale=scalar(tensors["input_scale"]) if recipe.activation == "fp8_static" else None)
