"""AutoAWQ GEMM checkpoints (spec 5.3): `quant_method: "awq"`, `version: "gemm"`, `zero_point: true`.

config.json quantization_config: {"quant_method": "awq", "bits": 4, "group_size": G, "zero_point": true,
"version": "gemm", "modules_to_not_convert": [substrings] | null}. A linear is quantized when it carries
`qweight`; its tensors:

| tensor | dtype | shape | meaning |
|---|---|---|---|
| qweight | I32 | [K, N/8] | unsigned codes packed along N, nibble slot i of word c = column 8c + [0,2,4,6,1,3,5,7][i] |
| qzeros | I32 | [K/G, N/8] | zero points, same packing |
| scales | F16 | [K/G, N] | W[n, k] = (q[k, n] - z[k // G, n]) * s[k // G, n] |

Recipe: w4a16_awq, asymmetric, group_size G. AutoAWQ folded its smoothing into the preceding norms and
projections, so there is no pre_quant_scale.
"""

from __future__ import annotations

from typing import Any, Mapping

from jaxq.formats import from_autoawq
from jaxq.io.quantized.scheme import FLOAT_DTYPES, Scheme, TensorSpec, finite_nonzero, int4_recipe
from jaxq.nn.quantized_weight import QuantizedWeight


class AutoAWQScheme(Scheme):
    """config: the `quant_method: "awq"` quantization_config (ValueError names an unsupported field)."""

    def __init__(self, config: Mapping[str, Any], source: str = "config.json quantization_config"):
        for field, want in (("bits", 4), ("zero_point", True)):
            if config.get(field, want) != want:
                raise ValueError(f"{source}.{field} is {config.get(field)!r}; jaxq loads AutoAWQ with {field} {want!r}")
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"{source}.version is {config.get('version')!r}; jaxq loads the 'gemm' layout only "
                             "(re-save with AutoAWQ's GEMM version)")
        group_size = config.get("group_size", config.get("q_group_size", 128))
        self.recipe = int4_recipe("w4a16_awq", group_size, f"{source}.group_size", symmetric=False)
        self.exclusions = tuple(config.get("modules_to_not_convert") or ())
        self.entries_field = f"{source}.modules_to_not_convert"
        self.description = f"AutoAWQ GEMM w4 g{group_size} ({source.split()[0]})"

    def matches(self, module, entry):
        return entry in module  # AutoAWQ skips every module whose name contains an entry

    def recipe_for(self, module, roles):
        return None if "qweight" not in roles or self.excluded_by(module) else self.recipe

    def tensor_specs(self, recipe, n, k):
        g = k if recipe.group_size == -1 else recipe.group_size
        if n % 8 or k % g:
            raise ValueError(f"[N, K] = [{n}, {k}] does not fit AutoAWQ: N must be a multiple of 8 and K of "
                             f"group_size {g}")
        return {"qweight": TensorSpec(("I32",), ((k, n // 8),), "[K, N/8], packed along N"),
                "qzeros": TensorSpec(("I32",), ((k // g, n // 8),), f"[K/G, N/8] with G = {g}"),
                "scales": TensorSpec(FLOAT_DTYPES, ((k // g, n),), f"[K/G, N] with G = {g}", finite_nonzero)}

    def build(self, recipe, tensors, dtype):
        weight = from_autoawq(tensors["qweight"], tensors["qzeros"], tensors["scales"])
        return QuantizedWeight(recipe=recipe, weight=weight)
