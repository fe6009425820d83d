"""compressed-tensors checkpoint (spec 5.6): what vLLM (and transformers with the compressed-tensors
package) loads, written as llm-compressor 0.14 / compressed-tensors 0.19 write it (the llmc-* fixtures).

| in-memory recipe (QuantizedWeight)          | format (config group)  | tensors of `<lin>` besides bias          |
|---------------------------------------------|------------------------|------------------------------------------|
| fp8 (per tensor, static input)              | float-quantized        | weight F8_E4M3 [N, K], weight_scale F32 [1], input_scale F32 [1] |
| fp8_rowwise (channel, dynamic per token)    | float-quantized        | weight F8_E4M3 [N, K], weight_scale F32 [N, 1] |
| fp8_block (b x b; input none or 1 x b)      | float-quantized        | weight F8_E4M3 [N, K], weight_scale F32 [N/b, K/b] |
| INT4 W4A16 (sym / asym, groups / channel)   | pack-quantized         | weight_packed I32 [N, K/8] (q + 8 along K), weight_scale [N, K/G], weight_shape I64 [2], weight_zero_point I32 [N/8, K/G] (asym, along N), weight_g_idx I32 [K] (act-order) |
| nvfp4 (W4A4 or weight-only)                 | nvfp4-pack-quantized   | weight_packed U8 [N, K/2], weight_scale F8_E4M3 [N, K/16], weight_global_scale F32 [1], input_global_scale F32 [1] (W4A4) |

Scales keep their in-memory dtype (float32 from jaxq.quantize; llm-compressor writes bf16 INT4 and channel
scales, vLLM casts on load), so jaxq.load gives back the same weights. compressed-tensors' own symmetric INT4
quantizer uses scale = amax / 7.5, but the format stores any scale: jaxq's amax / 7 (AWQ) or GPTQ grids load
as they are. NVFP4 global scales are stored as reciprocals (448 * 6 / amax): `invertible_reciprocal` picks,
among the float32 values next to 1 / s, one whose reciprocal is s again, so jaxq.load restores s bit for bit
(for the few s where no float32 has that property, 1 / s, one ulp away).
Act-order INT4 (g_idx) is written with actorder "group" and weight_g_idx, as llm-compressor wrote it before
compressed-tensors 0.19 dropped that option (0.19 refuses it; jaxq reads it). No layout: W4A8 INT4 (FP8 activations with a weight_scale_2 stage), MXFP4 (jaxq does not load
mxfp4-pack-quantized) and any pre_quant_scale (AWQ smoothing kept apart from the weights): these raise,
pointing to format="modelopt". AWQ models export when quantized with AWQConfig(fold="foldable") (AWQ_FOLD;
jaxq/calib/awq.py), which smooths only the groups whose smoothing folds into a norm or the producing linear's
rows and leaves the rest unsmoothed, as llm-compressor does; `jaxq quantize --export-format compressed-tensors`
picks it.

config.json quantization_config, as the llmc fixtures: config_groups {group_i: {format, targets ["Linear"] (or
the module names, when several groups), weights, input_activations, output_activations}}, format (or
"mixed-precision"), ignore (unquantized linears), kv_cache_scheme, quant_method "compressed-tensors",
quantization_status "compressed", sparsity_config {}, transform_config {}, version.
KV cache FP8: `<attn>.k_scale`, `<attn>.v_scale` F32 [1] (amax / 448; vLLM reads them there).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.formats import (exact_divide, fp8_checkpoint_scale, to_compressed_tensors_int4,
                          to_compressed_tensors_nvfp4)
from jaxq.io.export.common import ModelTensors, nonzero_block_scales
from jaxq.loaded_model import LoadedModel
from jaxq.nn.quantized_weight import QuantizedWeight
from jaxq.recipes import Recipe

log = logging.getLogger(__name__)

COMPRESSED_TENSORS_VERSION = "0.19.0"
AWQ_FOLD = "foldable"  # the AWQConfig.fold whose AWQ models this format stores: no pre_quant_scale anywhere
_E4M3 = "torch.float8_e4m3fn"
_FP8_STRATEGY = {"tensor": "tensor", "channel": "channel", "block": "block"}


def _args(num_bits: int, type_: str, strategy: str, *, group_size=None, block_structure=None, symmetric=True,
          dynamic: bool | str = False, actorder=None, observer="memoryless_minmax", scale_dtype=None,
          zp_dtype=None) -> dict:
    """compressed-tensors QuantizationArgs with every field, as its model_dump writes them."""
    return {"actorder": actorder, "block_structure": block_structure, "dynamic": dynamic, "group_size": group_size,
            "num_bits": num_bits, "observer": observer, "observer_kwargs": {}, "scale_dtype": scale_dtype,
            "strategy": strategy, "symmetric": symmetric, "type": type_, "zp_dtype": zp_dtype}


def has_layout(recipe: Recipe) -> bool:
    """Whether compressed-tensors (as jaxq and vLLM read it) stores linears of `recipe` (the table above), AWQ
    ones only when quantized with AWQConfig(fold=AWQ_FOLD)."""
    act = recipe.activation
    if recipe.weight_format == "fp8":
        return act in ("none", "fp8_static", "fp8_token") or (act == "fp8_group" and
                                                              recipe.weight_granularity == "block")
    return act in {"nvfp4": ("none", "nvfp4"), "int4": ("none",)}.get(recipe.weight_format, ())


def scheme(module: str, qw: QuantizedWeight) -> tuple[str, dict, dict | None]:
    """(format, weights args, input_activations args or None) of one quantized linear; ValueError naming the
    layer when compressed-tensors (as jaxq and vLLM read it) has no layout for it."""
    r, w = qw.recipe, qw.weight
    act = r.activation
    if not has_layout(r):
        _unsupported(module, qw, f"{type(w).__name__} weights with activation {act!r}")
    if qw.pre_quant_scale is not None:
        _unsupported(module, qw, "a pre_quant_scale (AWQ smoothing kept apart from the weights)",
                     f"quantize it with awq=AWQConfig(fold={AWQ_FOLD!r}) (jaxq.calib.AWQConfig; `jaxq quantize "
                     "--export-format compressed-tensors` picks it), which leaves unsmoothed the groups whose "
                     "smoothing cannot be folded into the weights, or ")
    if r.weight_format == "fp8":
        weights = _args(8, "float", _FP8_STRATEGY[w.granularity],
                        block_structure=[w.block_size] * 2 if w.granularity == "block" else None)
        inputs = {"none": None,
                  "fp8_static": _args(8, "float", "tensor", observer="minmax"),
                  "fp8_token": _args(8, "float", "token", dynamic=True, observer=None),
                  "fp8_group": _args(8, "float", "group", group_size=w.block_size, dynamic=True, observer=None)}[act]
        return "float-quantized", weights, inputs
    if r.weight_format == "nvfp4":
        weights = _args(4, "float", "tensor_group", group_size=16, scale_dtype=_E4M3)
        inputs = None if act == "none" else _args(4, "float", "tensor_group", group_size=16, dynamic="local",
                                                  observer=None, scale_dtype=_E4M3)
        return "nvfp4-pack-quantized", weights, inputs
    per_channel = r.group_size == -1
    weights = _args(4, "int", "channel" if per_channel else "group", group_size=None if per_channel else
                    w.group_size, symmetric=w.zero is None, actorder="group" if w.g_idx is not None else None,
                    zp_dtype=None if w.zero is None else "torch.int8")
    return "pack-quantized", weights, None


def _unsupported(module, qw, what, fix=""):
    raise ValueError(f"layer {module}: recipe {qw.recipe.name!r} has {what}, which compressed-tensors cannot "
                     f"store as jaxq and vLLM read it; {fix}export it with format='modelopt' (TensorRT-LLM)")


def invertible_reciprocal(s) -> jax.Array:
    """float32 r near 1 / s with 1 / r == s exactly (exact_divide, as the loader computes it), else 1 / s.

    s > 0 and finite. Candidates: 1 / s and the float32 values up to two ulps either side; the first that
    inverts back wins, so r == 1 / s whenever that already round-trips.
    """
    s = jnp.asarray(s, jnp.float32)
    r0 = exact_divide(1.0, s)
    bits = jax.lax.bitcast_convert_type(r0, jnp.int32)
    out = r0
    for d in (-2, 2, -1, 1, 0):  # applied last = preferred
        c = jax.lax.bitcast_convert_type(bits + d, jnp.float32)
        out = jnp.where(exact_divide(1.0, c) == s, c, out)
    return out


def _warn_inexact_reciprocals(quantized: dict[str, QuantizedWeight]) -> None:
    inexact = [f"{m}.{what}" for m, qw in quantized.items() if qw.recipe.weight_format == "nvfp4"
               for what, s in (("weight_scale_2", qw.weight.global_scale), ("input_scale", qw.input_scale))
               if s is not None and not bool(jnp.all(exact_divide(1.0, invertible_reciprocal(s)) == s))]
    if inexact:
        log.warning("no float32 reciprocal of %s inverts back exactly: compressed-tensors stores the nearest, so "
                    "loaders read these scales one ulp off (format='modelopt' stores them as they are)",
                    ", ".join(inexact))


def linear_tensors(module: str, qw: QuantizedWeight, dtype) -> dict[str, Any]:
    """{"<module>.<role>": array} of one quantized linear (table in the module docstring)."""
    del dtype  # nothing here is stored in the model dtype
    r, w = qw.recipe, qw.weight
    if r.weight_format == "fp8":
        out = {"weight": w.data, "weight_scale": fp8_checkpoint_scale(w, "compressed_tensors")}
        if r.activation == "fp8_static":
            out["input_scale"] = jnp.asarray(qw.input_scale, jnp.float32).reshape(1)
    elif r.weight_format == "nvfp4":
        w = nonzero_block_scales(w)
        out = to_compressed_tensors_nvfp4(w)
        out["weight_global_scale"] = invertible_reciprocal(w.global_scale).reshape(1)
        if r.activation == "nvfp4":
            out["input_global_scale"] = invertible_reciprocal(qw.input_scale).reshape(1)
    else:
        out = to_compressed_tensors_int4(w)
        out["weight_shape"] = np.asarray(out["weight_shape"], np.int64)  # llm-compressor writes I64
    return {f"{module}.{role}": a for role, a in out.items()}


def kv_tensors(attention: str, k_scale, v_scale) -> dict[str, Any]:
    return {f"{attention}.{n}_scale": jnp.asarray(s, jnp.float32).reshape(1) for n, s in (("k", k_scale),
                                                                                        ("v", v_scale))}


def configs(model: LoadedModel, tensors: ModelTensors, kv: bool) -> tuple[dict, dict[str, dict]]:
    """(config.json quantization_config, {}): one config group per distinct scheme, targets "Linear" when
    there is one (the unquantized linears in ignore), else the module names of each."""
    schemes = {m: scheme(m, qw) for m, qw in tensors.quantized.items()}
    _warn_inexact_reciprocals(tensors.quantized)
    act_order = [m for m, (_, weights, _) in schemes.items() if weights["actorder"] == "group"]
    if act_order:
        log.warning("%s: act-order INT4 is written with actorder 'group' and weight_g_idx, which jaxq and vLLM's "
                    "g_idx kernels read but compressed-tensors >= 0.19 refuses", ", ".join(act_order))
    groups: dict[str, dict] = {}
    for module, (fmt, weights, inputs) in schemes.items():
        key = json.dumps([fmt, weights, inputs], sort_keys=True)
        groups.setdefault(key, {"format": fmt, "input_activations": inputs, "output_activations": None,
                                "targets": [], "weights": weights})["targets"].append(module)
    if len(groups) == 1:
        next(iter(groups.values()))["targets"] = ["Linear"]
    formats = {g["format"] for g in groups.values()}
    ignore = sorted(set(tensors.unquantized_linears) | ({"lm_head"} if model.config.tie_word_embeddings else set()))
    config = {
        "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "global_compression_ratio": None,
        "ignore": ignore,
        "kv_cache_scheme": _args(8, "float", "tensor", observer="minmax") if kv else None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": COMPRESSED_TENSORS_VERSION,
    }
    return config, {}
