"""ModelOpt unified HF export (spec sections 1-3): every `quant_algo`, exclude_modules, FP8 KV scales.

Config: hf_quant_config.json `{"producer": {"name": "modelopt"}, "quantization": {"quant_algo",
"kv_cache_quant_algo", "group_size", "exclude_modules" | "quantized_layers"}}` (authoritative), or the
config.json `quantization_config` with `quant_method: "modelopt"` (`ignore`, `kv_cache_scheme`).

| quant_algo | jaxq recipe | tensors of `<lin>` (besides bias) |
|---|---|---|
| FP8 | fp8 | weight F8_E4M3 [N, K], weight_scale F32 [], input_scale F32 [] |
| FP8_PER_CHANNEL_PER_TOKEN | fp8_rowwise | weight F8_E4M3 [N, K], weight_scale F32 [N] |
| fp8_pb_wo | fp8_block, activation none | weight F8_E4M3 [N, K], weight_scale F32 [N/128, 1, K/128, 1] |
| NVFP4, NVFP4_AWQ | nvfp4 | weight U8 [N, K/2], weight_scale F8_E4M3 [N, K/16], weight_scale_2 F32 [], |
| | | input_scale F32 [] (NVFP4_AWQ: pre_quant_scale [K] where not folded) |
| W4A16_NVFP4 | nvfp4, activation none | as NVFP4 without input_scale |
| mxfp4, W4A8_MXFP4_FP8 | mxfp4 (fp8_static) | weight U8 [N, K/2], weight_scale U8 E8M0 [N, K/32] (input_scale F32 []) |
| W4A16_AWQ | w4a16_awq, group G | weight U8 [N/2, K] (along N), weight_scale F32 [N, K/G], pre_quant_scale [K] |
| W4A8_AWQ | w4a8_awq, group G | as W4A16_AWQ plus weight_scale_2 F32 [], input_scale F32 [] |

Every scale is a dequant multiplier. fp8_pb_wo is weight-only as ModelOpt calibrates and exports it (serving
engines add dynamic 1x128 FP8 activations: get_recipe("fp8_block") emulates them). AWQ: pre_quant_scale
multiplies the input of o_proj/down_proj; for q/k/v and gate/up the exporter folded it into the RMSNorm
weights, which therefore load as they are. Fused q/k/v and gate/up shards keep their own scales.
KV cache FP8: `<layer>.self_attn.k_proj.k_scale`, `v_proj.v_scale` F32 [] (amax / 448, used as stored).
"""

from __future__ import annotations

from typing import Mapping

from jaxq.formats import from_modelopt_int4, from_modelopt_mxfp4, from_modelopt_nvfp4
from jaxq.io.quantized.scheme import (FLOAT_DTYPES, Scheme, TensorSpec, e8m0_finite, finite_nonzero,
                                      fp8_weight, fp8_weight_specs, int4_recipe, module_matches, scalar,
                                      scalar_spec)
from jaxq.nn.quantized_weight import QuantizedWeight
from jaxq.recipes import Recipe, get_recipe

_ALGOS = {
    "FP8": lambda g: get_recipe("fp8"),
    "FP8_PER_CHANNEL_PER_TOKEN": lambda g: get_recipe("fp8_rowwise"),
    "FP8_PB_WO": lambda g: get_recipe("fp8_block", activation="none"),
    "NVFP4": lambda g: get_recipe("nvfp4"),
    "NVFP4_AWQ": lambda g: get_recipe("nvfp4", algorithm="awq"),
    "W4A16_NVFP4": lambda g: get_recipe("nvfp4", activation="none"),
    "MXFP4": lambda g: get_recipe("mxfp4"),
    "W4A8_MXFP4_FP8": lambda g: get_recipe("mxfp4", activation="fp8_static"),
    "W4A16_AWQ": lambda g: int4_recipe("w4a16_awq", g or 128, "group_size"),
    "W4A8_AWQ": lambda g: int4_recipe("w4a8_awq", g or 128, "group_size"),
}
# The group (block) size each FP4 algo fixes; a config that says otherwise is not this format.
_FIXED_GROUP = {"NVFP4": 16, "NVFP4_AWQ": 16, "W4A16_NVFP4": 16, "MXFP4": 32, "W4A8_MXFP4_FP8": 32}
KV_ALGOS = (None, "FP8")


class ModelOptScheme(Scheme):
    """A ModelOpt export: one quant_algo with exclude_modules, or MIXED_PRECISION with quantized_layers.

    quant_algo / layers: the algo string, or {module: {"quant_algo", "group_size"}} for MIXED_PRECISION.
    kv_algo: kv_cache_quant_algo (None or "FP8"). source: the file the config came from, for messages.
    """

    def __init__(self, quant_algo: str, group_size: int | None, exclude: list[str], kv_algo: str | None,
                 source: str, layers: Mapping[str, Mapping] | None = None):
        field = f"{source} quant_algo"
        self.layers = None
        if layers is not None:
            self.layers = {m: recipe_for_algo(c.get("quant_algo"), c.get("group_size"), f"{source} quantized_layers"
                                              f"[{m!r}].quant_algo") for m, c in layers.items()}
            self.recipe = None
        else:
            self.recipe = recipe_for_algo(quant_algo, group_size, field)
        if kv_algo not in KV_ALGOS:
            raise ValueError(f"{source}: kv_cache_quant_algo {kv_algo!r} is not supported; jaxq reads "
                             f"{[a for a in KV_ALGOS if a]} KV caches (or none). Load without it is not possible: "
                             "the checkpoint's attention expects that cache")
        self.description = f"ModelOpt {quant_algo} ({source})"
        self.kv_cache = kv_algo == "FP8"
        self.exclusions = () if self.layers is not None else tuple(exclude)
        self.entries_field = f"{source} {'quantized_layers' if self.layers is not None else 'exclude_modules'}"

    def module_entries(self):
        return tuple(self.layers) if self.layers is not None else self.exclusions

    def recipe_for(self, module, roles):
        if self.layers is not None:  # quantized_layers lists what is quantized, the rest stays as is
            return next((r for m, r in self.layers.items() if module_matches(module, m)), None)
        return None if self.excluded_by(module) else self.recipe

    def tensor_specs(self, recipe: Recipe, n, k):
        static_input = recipe.activation in ("fp8_static", "nvfp4")
        if recipe.weight_format == "fp8":
            specs = fp8_weight_specs(recipe, n, k, "weight_scale", modelopt_block=True)
            if recipe.weight_granularity == "channel":  # TRT-LLM reads it only for attention output: ignored
                specs["input_scale"] = TensorSpec(FLOAT_DTYPES, ((), (1,)), "F32 []", required=False)
        elif recipe.weight_format in ("nvfp4", "mxfp4"):
            block = recipe.group_size
            _require(k % block == 0, f"K={k} is not a multiple of the {recipe.weight_format} block {block}")
            specs = {"weight": TensorSpec(("U8",), ((n, k // 2),), "[N, K/2], two E2M1 codes per byte")}
            if recipe.weight_format == "nvfp4":
                specs["weight_scale"] = TensorSpec(("F8_E4M3",), ((n, k // block),), f"[N, K/{block}]", finite_nonzero)
                specs["weight_scale_2"] = scalar_spec("per-tensor global scale")
                specs["pre_quant_scale"] = _pre_quant_scale_spec(k)
            else:
                specs["weight_scale"] = TensorSpec(("U8",), ((n, k // block),), f"[N, K/{block}] E8M0", e8m0_finite)
        else:  # int4, packed along N
            g = k if recipe.group_size == -1 else recipe.group_size
            _require(n % 2 == 0, f"N={n} is odd; ModelOpt INT4 packs two output rows per byte")
            _require(k % g == 0, f"K={k} is not a multiple of group_size {g}")
            specs = {"weight": TensorSpec(("U8",), ((n // 2, k),), "[N/2, K], packed along N"),
                     "weight_scale": TensorSpec(FLOAT_DTYPES, ((n, k // g),), f"[N, K/G] with G = {g}", finite_nonzero),
                     "pre_quant_scale": _pre_quant_scale_spec(k)}
            if not recipe.weight_only:
                specs["weight_scale_2"] = scalar_spec("per-tensor FP8 stage of the INT4 weight")
        if static_input:
            specs["input_scale"] = scalar_spec("static activation scale")
        return specs

    def build(self, recipe, tensors, dtype):
        t = tensors
        if recipe.weight_format == "fp8":
            weight = fp8_weight(recipe, t["weight"], t["weight_scale"])
        elif recipe.weight_format == "nvfp4":
            weight = from_modelopt_nvfp4(t["weight"], t["weight_scale"], t["weight_scale_2"])
        elif recipe.weight_format == "mxfp4":
            weight = from_modelopt_mxfp4(t["weight"], t["weight_scale"])
        else:
            weight = from_modelopt_int4(t["weight"], t["weight_scale"])
        static_input = recipe.activation in ("fp8_static", "nvfp4")
        return QuantizedWeight(
            recipe=recipe, weight=weight,
            input_scale=scalar(t["input_scale"]) if static_input else None,
            pre_quant_scale=t["pre_quant_scale"].astype(dtype) if "pre_quant_scale" in t else None,
            weight_scale_2=scalar(t["weight_scale_2"]) if recipe.weight_format == "int4" and "weight_scale_2" in t
            else None,
        )


def _pre_quant_scale_spec(k: int) -> TensorSpec:
    # AWQ smoothing the exporter could not fold into a norm (o_proj, down_proj); absent elsewhere.
    return TensorSpec(FLOAT_DTYPES, ((k,),), "[K] AWQ smoothing", finite_nonzero, required=False)


def _require(ok: bool, why: str) -> None:
    if not ok:
        raise ValueError(why)


def recipe_for_algo(algo, group_size, field: str) -> Recipe:
    """The jaxq recipe of a ModelOpt quant_algo (case-insensitive: ModelOpt writes fp8_pb_wo and mxfp4 in lower
    case); ValueError naming the field and value when jaxq has no such recipe."""
    key = algo.upper() if isinstance(algo, str) else algo
    if key not in _ALGOS:
        raise ValueError(f"{field} is {algo!r}, which jaxq cannot load; supported: {sorted(_ALGOS)} "
                         "(and MIXED_PRECISION of them)")
    if key in _FIXED_GROUP and group_size not in (None, _FIXED_GROUP[key]):
        raise ValueError(f"{field} {algo!r} has group_size {group_size}; {algo} uses blocks of {_FIXED_GROUP[key]}")
    try:
        return _ALGOS[key](group_size)
    except ValueError as e:
        raise ValueError(f"{field} {algo!r} with group_size {group_size}: {e}") from None


def scheme_from_config(quantization: Mapping, source: str) -> ModelOptScheme:
    """A ModelOptScheme from hf_quant_config.json's `quantization` dict, or from config.json's flat
    quantization_config (`ignore`, `kv_cache_scheme` as a dict {num_bits: 8, type: float} or a string)."""
    algo = quantization.get("quant_algo")
    kv = quantization.get("kv_cache_quant_algo")
    if "kv_cache_scheme" in quantization and kv is None:
        scheme = quantization["kv_cache_scheme"]
        if isinstance(scheme, Mapping):
            kv = "FP8" if (scheme.get("type"), scheme.get("num_bits")) == ("float", 8) else str(scheme)
        else:
            kv = scheme
    exclude = quantization.get("exclude_modules", quantization.get("ignore")) or []
    if not isinstance(exclude, list) or not all(isinstance(e, str) for e in exclude):
        raise ValueError(f"{source} exclude_modules is {exclude!r}, expected a list of module-name patterns")
    layers = None
    if isinstance(algo, str) and algo.upper() == "MIXED_PRECISION":
        layers = quantization.get("quantized_layers")
        if not isinstance(layers, Mapping) or not layers:
            raise ValueError(f"{source} quant_algo MIXED_PRECISION needs a non-empty quantized_layers object, got "
                             f"{layers!r}")
    return ModelOptScheme(algo, quantization.get("group_size"), exclude, kv, source, layers)
