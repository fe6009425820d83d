"""AutoGPTQ / GPTQModel checkpoints (spec 5.4): `quant_method: "gptq"`, 4 bits, v1 or v2 zero points.

Config: config.json quantization_config, or AutoGPTQ's quantize_config.json: {"bits": 4, "group_size": G
(-1 = per channel), "desc_act": act-order, "sym", "checkpoint_format": "gptq" (v1) | "gptq_v2"}. A linear is
quantized when it carries `qweight`; its tensors:

| tensor | dtype | shape | meaning |
|---|---|---|---|
| qweight | I32 | [K/8, N] | codes packed along K: bits 4j of word r = row 8r + j |
| qzeros | I32 | [G_n, N/8] | zero points packed along N; v1 stores zero - 1, v2 the zero |
| scales | F16 | [G_n, N] | W[n, k] = (q[k, n] - z[g, n]) * s[g, n], g = g_idx[k] |
| g_idx | I32 | [K] | group of each input channel (non-monotonic with act-order) |

Recipe: w4a16_gptq with the config's group_size, sym and act_order (desc_act).
"""

from __future__ import annotations

from typing import Any, Mapping

from jaxq.formats import from_gptq
from jaxq.io.quantized.scheme import FLOAT_DTYPES, Scheme, TensorSpec, finite_nonzero, indices_below, int4_recipe
from jaxq.nn.quantized_weight import QuantizedWeight

_VERSIONS = {"gptq": 1, "gptq_v2": 2}


class GPTQScheme(Scheme):
    """config: the GPTQ quantization config (ValueError names an unsupported field and value)."""

    def __init__(self, config: Mapping[str, Any], source: str = "config.json quantization_config"):
        if config.get("bits") != 4:
            raise ValueError(f"{source}.bits is {config.get('bits')!r}; jaxq loads 4-bit GPTQ only")
        fmt = config.get("checkpoint_format", config.get("format", "gptq"))
        if fmt not in _VERSIONS:
            raise ValueError(f"{source}.checkpoint_format is {fmt!r}; jaxq loads {sorted(_VERSIONS)} "
                             "(re-save a marlin/bitblas checkpoint in the gptq format)")
        if config.get("dynamic"):
            raise ValueError(f"{source}.dynamic is {config['dynamic']!r}; per-module GPTQ overrides are not supported")
        self.version = _VERSIONS[fmt]
        self.sym = bool(config.get("sym", True))
        group_size = config.get("group_size", 128)
        self.recipe = int4_recipe("w4a16_gptq", group_size, f"{source}.group_size", symmetric=self.sym,
                                  act_order=bool(config.get("desc_act", False)))
        self.description = (f"GPTQ {fmt} w4 g{group_size} {'sym' if self.sym else 'asym'}"
                            f"{' act-order' if self.recipe.act_order else ''} ({source.split()[0]})")

    def recipe_for(self, module, roles):
        return self.recipe if "qweight" in roles else None

    def tensor_specs(self, recipe, n, k):
        g = k if recipe.group_size == -1 else recipe.group_size
        if n % 8 or k % 8 or k % g:
            raise ValueError(f"[N, K] = [{n}, {k}] does not fit GPTQ: N and K must be multiples of 8 and K of "
                             f"group_size {g}")
        groups = k // g
        return {"qweight": TensorSpec(("I32",), ((k // 8, n),), "[K/8, N], packed along K"),
                "qzeros": TensorSpec(("I32",), ((groups, n // 8),), f"[K/G, N/8] with G = {g}"),
                "scales": TensorSpec(FLOAT_DTYPES, ((groups, n),), f"[K/G, N] with G = {g}", finite_nonzero),
                "g_idx": TensorSpec(("I32", "I64"), ((k,),), "[K] group of each input channel", indices_below(groups),
                                    required=recipe.act_order)}

    def build(self, recipe, tensors, dtype):
        weight = from_gptq(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors.get("g_idx"),
                           version=self.version, sym=self.sym)
        return QuantizedWeight(recipe=recipe, weight=weight)
