"""compressed-tensors checkpoints (llm-compressor; spec 5.6): `quant_method: "compressed-tensors"`.

config.json quantization_config: `config_groups` {name: {targets, weights, input_activations, [format]}},
`format`, `ignore`, `kv_cache_scheme`, `quantization_status` ("compressed"), `sparsity_config`,
`transform_config`. Targets and ignore entries are module names, "re:<regex>" (re.match) or the class
"Linear". Each group's QuantizationArgs map to a jaxq recipe (format: weights, input_activations -> recipe;
the tensors of `<lin>`):

* float-quantized: float 8 weights per tensor / channel / block [b, b] -> fp8 / fp8_rowwise / fp8_block;
  activations none, float 8 static per tensor (fp8_static), dynamic per token (fp8_token) or dynamic in
  groups of b (fp8_group). weight F8_E4M3 [N, K], weight_scale [1] / [N, 1] / [N/b, K/b], input_scale [1].
* pack-quantized: int 4 weights per group G or channel, no activation quantization -> w4a16_gptq
  (symmetric; act_order for actorder "group") or w4a16_awq with symmetric=False. weight_packed I32
  [N, K/8] (q + 8, along K), weight_scale [N, K/G], weight_shape [2] = (N, K), weight_zero_point I32
  [N/8, K/G] (asymmetric, along N), weight_g_idx [K] (actorder "group").
* nvfp4-pack-quantized: float 4 tensor_group 16 -> nvfp4; activations none (NVFP4A16) or float 4
  tensor_group 16. weight_packed U8 [N, K/2], weight_scale F8_E4M3 [N, K/16], weight_global_scale F32 [1]
  = 448 * 6 / amax (the reciprocal of ModelOpt's weight_scale_2), input_global_scale F32 [1] likewise.

KV cache (`kv_cache_scheme` float 8): k_scale / v_scale per layer on `self_attn` (or ModelOpt's k_proj/v_proj).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from jaxq.formats import exact_divide, from_compressed_tensors_int4, from_compressed_tensors_nvfp4
from jaxq.formats._blocking import ceil_div
from jaxq.io.quantized.scheme import (FLOAT_DTYPES, Scheme, TensorSpec, equal_to, finite_nonzero, fp8_weight,
                                      fp8_weight_specs, indices_below, int4_recipe, module_matches, scalar,
                                      scalar_spec)
from jaxq.nn.quantized_weight import QuantizedWeight
from jaxq.recipes import Recipe, get_recipe

# format -> the (type, num_bits) of its weights
_WEIGHT_KINDS = {"float-quantized": ("float", 8), "pack-quantized": ("int", 4), "nvfp4-pack-quantized": ("float", 4)}
_FORMATS = tuple(_WEIGHT_KINDS)
_FP8_WEIGHTS = {"tensor": "fp8", "channel": "fp8_rowwise", "block": "fp8_block"}


class CompressedTensorsScheme(Scheme):
    """config: config.json's quantization_config (validated here; ValueError names the field and value)."""

    def __init__(self, config: Mapping[str, Any]):
        where = "config.json quantization_config"
        _expect(config, "quantization_status", ("compressed",), where,
                "a 'frozen' checkpoint holds fake-quantized float weights: save it with save_compressed=True")
        for field in ("sparsity_config", "transform_config"):
            if config.get(field):
                raise ValueError(f"{where}.{field} is {config[field]!r}; jaxq loads dense, untransformed "
                                 "compressed-tensors checkpoints only")
        groups = config.get("config_groups")
        if not isinstance(groups, Mapping) or not groups:
            raise ValueError(f"{where}.config_groups is {groups!r}, expected a non-empty object of quantization groups")
        self.groups = [(_targets(g, f"{where}.config_groups.{name}"),
                        _recipe(g, g.get("format", config.get("format")), f"{where}.config_groups.{name}"))
                       for name, g in groups.items()]
        self.exclusions = tuple(config.get("ignore") or ())
        self.entries_field = f"{where}.ignore"
        kv = config.get("kv_cache_scheme")
        if kv is not None and (kv.get("type"), kv.get("num_bits")) != ("float", 8):
            raise ValueError(f"{where}.kv_cache_scheme is {kv!r}; jaxq reads FP8 (float, 8 bits) KV caches only")
        self.kv_cache = kv is not None
        self.description = f"compressed-tensors {config.get('format')} (config.json)"

    def matches(self, module, entry):
        return bool(re.match(entry[3:], module)) if entry.startswith("re:") else module_matches(module, entry)

    def recipe_for(self, module, roles):
        if self.excluded_by(module):
            return None
        # compressed-tensors prefers an exact name over a regex over the class name "Linear".
        for kind in ("name", "regex", "class"):
            for targets, recipe in self.groups:
                if any(_target_kind(t) == kind and (kind == "class" or self.matches(module, t)) for t in targets):
                    return recipe
        return None

    def tensor_specs(self, recipe: Recipe, n, k):
        if recipe.weight_format == "fp8":
            specs = fp8_weight_specs(recipe, n, k, "weight_scale")
            if recipe.activation == "fp8_static":
                specs["input_scale"] = scalar_spec("static activation scale")
            return specs
        if recipe.weight_format == "nvfp4":
            if k % 16:
                raise ValueError(f"K={k} is not a multiple of the NVFP4 block 16")
            specs = {"weight_packed": TensorSpec(("U8",), ((n, k // 2),), "[N, K/2], two E2M1 codes per byte"),
                     "weight_scale": TensorSpec(("F8_E4M3",), ((n, k // 16),), "[N, K/16]", finite_nonzero),
                     "weight_global_scale": scalar_spec("448 * 6 / amax")}
            if recipe.activation == "nvfp4":
                specs["input_global_scale"] = scalar_spec("448 * 6 / activation amax")
            return specs
        g = k if recipe.group_size == -1 else recipe.group_size
        if k % g:
            raise ValueError(f"K={k} is not a multiple of group_size {g}")
        specs = {"weight_packed": TensorSpec(("I32",), ((n, ceil_div(k, 8)),), "[N, ceil(K/8)], eight codes per int32"),
                 "weight_scale": TensorSpec(FLOAT_DTYPES, ((n, k // g),), f"[N, K/G] with G = {g}", finite_nonzero),
                 "weight_shape": TensorSpec(("I64", "I32"), ((2,),), "[2] = (N, K)", equal_to((n, k)))}
        if not recipe.symmetric:
            specs["weight_zero_point"] = TensorSpec(("I32",), ((ceil_div(n, 8), k // g),), "[ceil(N/8), K/G], along N")
        if recipe.act_order:
            specs["weight_g_idx"] = TensorSpec(("I32", "I64"), ((k,),), "[K] group of each input channel",
                                               indices_below(k // g))
        return specs

    def build(self, recipe, tensors, dtype):
        t = tensors
        input_scale = None
        if recipe.weight_format == "fp8":
            weight = fp8_weight(recipe, t["weight"], t["weight_scale"])
            if recipe.activation == "fp8_static":
                input_scale = scalar(t["input_scale"])
        elif recipe.weight_format == "nvfp4":
            weight = from_compressed_tensors_nvfp4(t["weight_packed"], t["weight_scale"], t["weight_global_scale"])
            if recipe.activation == "nvfp4":  # stored as the reciprocal, like the weight's global scale
                input_scale = exact_divide(1.0, scalar(t["input_global_scale"]))
        else:
            weight = from_compressed_tensors_int4(t["weight_packed"], t["weight_scale"], t["weight_shape"],
                                                  t.get("weight_zero_point"), t.get("weight_g_idx"))
        return QuantizedWeight(recipe=recipe, weight=weight, input_scale=input_scale)


def _expect(config, field, allowed, where, hint=""):
    if config.get(field) not in allowed:
        raise ValueError(f"{where}.{field} is {config.get(field)!r}, expected one of {list(allowed)}"
                         + (f"; {hint}" if hint else ""))


def _targets(group: Mapping, where: str) -> tuple[str, ...]:
    targets = group.get("targets")
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{where}.targets is {targets!r}, expected a list of module names, 're:' regexes or 'Linear'")
    return tuple(targets)


def _target_kind(target: str) -> str:
    if target.startswith("re:"):
        return "regex"
    return "class" if target == "Linear" else "name"


def _recipe(group: Mapping, fmt: str | None, where: str) -> Recipe:
    """The jaxq recipe of one config group (its weights, input_activations and format)."""
    w, a = group.get("weights"), group.get("input_activations")
    if fmt not in _FORMATS:
        raise ValueError(f"{where}.format is {fmt!r}; jaxq loads {list(_FORMATS)}")
    if not isinstance(w, Mapping):
        raise ValueError(f"{where}.weights is {w!r}, expected QuantizationArgs")
    kind = (w.get("type"), w.get("num_bits"))
    expected = _WEIGHT_KINDS[fmt]
    if kind != expected:
        raise ValueError(f"{where}.weights has type {kind[0]!r} with num_bits {kind[1]!r}; format {fmt!r} in jaxq "
                         f"means type {expected[0]!r} with {expected[1]} bits")
    if fmt == "float-quantized":
        strategy = w.get("strategy")
        if strategy not in _FP8_WEIGHTS:
            raise ValueError(f"{where}.weights.strategy is {strategy!r}; jaxq loads FP8 weights per "
                             f"{list(_FP8_WEIGHTS)}")
        overrides = {}
        if strategy == "block":
            b = w.get("block_structure")
            if not (isinstance(b, list) and len(b) == 2 and b[0] == b[1] and isinstance(b[0], int) and b[0] > 0):
                raise ValueError(f"{where}.weights.block_structure is {b!r}; jaxq loads square blocks [b, b]")
            overrides["group_size"] = b[0]
        recipe = get_recipe(_FP8_WEIGHTS[strategy], **overrides)
        return recipe.replace(activation=_fp8_activation(a, recipe, where))
    if fmt == "nvfp4-pack-quantized":
        if (w.get("strategy"), w.get("group_size")) != ("tensor_group", 16):
            raise ValueError(f"{where}.weights has strategy {w.get('strategy')!r}, group_size {w.get('group_size')!r}; "
                             "NVFP4 is tensor_group with group_size 16")
        if a is None:
            return get_recipe("nvfp4", activation="none")
        if tuple(a.get(f) for f in ("type", "num_bits", "strategy", "group_size")) != ("float", 4, "tensor_group", 16):
            raise ValueError(f"{where}.input_activations is {dict(a)!r}; jaxq runs NVFP4 weights with no activation "
                             "quantization or NVFP4 (float 4, tensor_group 16) activations")
        return get_recipe("nvfp4")
    if a is not None:
        raise ValueError(f"{where}.input_activations is {dict(a)!r}; jaxq runs INT4 weights with unquantized "
                         "activations only (W4A16)")
    strategy, group_size = w.get("strategy"), w.get("group_size")
    if strategy not in ("group", "channel"):
        raise ValueError(f"{where}.weights.strategy is {strategy!r}; jaxq loads INT4 per group or per channel")
    group_size = -1 if strategy == "channel" else group_size
    act_order = w.get("actorder") == "group"  # "static" reorders during GPTQ only: groups stay contiguous
    symmetric = bool(w.get("symmetric", True))
    if symmetric or act_order:
        return int4_recipe("w4a16_gptq", group_size, f"{where}.weights.group_size", symmetric=symmetric,
                           act_order=act_order)
    return int4_recipe("w4a16_awq", group_size, f"{where}.weights.group_size", symmetric=False)


def _fp8_activation(a: Mapping | None, weight_recipe: Recipe, where: str) -> str:
    """The activation mode of FP8 input_activations; ValueError for anything jaxq does not run."""
    if a is None:
        return "none"
    kind = (a.get("type"), a.get("num_bits"), a.get("strategy"), bool(a.get("dynamic")))
    if kind == ("float", 8, "tensor", False):
        return "fp8_static"
    if kind == ("float", 8, "token", True):
        return "fp8_token"
    if kind == ("float", 8, "group", True) and a.get("group_size") == weight_recipe.group_size > 0:
        return "fp8_group"
    raise ValueError(f"{where}.input_activations is {dict(a)!r}; with {weight_recipe.name} weights jaxq runs FP8 "
                     "activations static per tensor, dynamic per token, or dynamic in groups of the block size")
