"""ModelOpt unified HF checkpoint (spec sections 1-4): what TensorRT-LLM loads (and vLLM for FP8 / NVFP4),
written exactly as ModelOpt 0.47's export_hf_checkpoint writes it (the modelopt-* fixtures).

| in-memory recipe (QuantizedWeight)      | quant_algo                  | tensors of `<lin>` besides bias              |
|-----------------------------------------|-----------------------------|----------------------------------------------|
| fp8 (per tensor, static input)          | FP8                         | weight F8_E4M3 [N, K], weight_scale F32 [], input_scale F32 [] |
| fp8_rowwise (channel, per-token input)  | FP8_PER_CHANNEL_PER_TOKEN   | weight F8_E4M3 [N, K], weight_scale F32 [N]  |
| fp8_block (128x128; input none or 1x128)| fp8_pb_wo                   | weight F8_E4M3 [N, K], weight_scale F32 [N/128, 1, K/128, 1] |
| nvfp4 (W4A4)                            | NVFP4 (NVFP4_AWQ with pqs)  | weight U8 [N, K/2], weight_scale F8_E4M3 [N, K/16], weight_scale_2 F32 [], input_scale F32 [] (pre_quant_scale [K]) |
| nvfp4, activation none                  | W4A16_NVFP4                 | as NVFP4 without input_scale                 |
| mxfp4 (input none / static FP8)         | mxfp4 / W4A8_MXFP4_FP8      | weight U8 [N, K/2], weight_scale U8 E8M0 [N, K/32] (input_scale F32 []) |
| symmetric INT4 (awq or gptq), W4A16     | W4A16_AWQ                   | weight U8 [N/2, K] (packed along N), weight_scale F32 [N, K/G], pre_quant_scale [K] model dtype |
| symmetric INT4, static FP8 input (W4A8) | W4A8_AWQ                    | as W4A16_AWQ plus weight_scale_2 F32 [], input_scale F32 [] |

ModelOpt has no GPTQ export (spec 2.8): symmetric GPTQ INT4 is written in the AWQ layout with
pre_quant_scale ones. Asymmetric INT4 (zero points), act-order (g_idx) and per-channel INT4 have no ModelOpt
layout: they raise, pointing to format="compressed-tensors".

pre_quant_scale: written where the QuantizedWeight has one, and as ones (model dtype) on every INT4 linear
outside a fused group, because TensorRT-LLM reads it unconditionally there (spec 2.6). It is not folded into
the RMSNorm weights as ModelOpt does (TensorRT-LLM reads it on fused shards too): that fold rounds the norm to
bf16, and keeping it makes jaxq.load reproduce the in-memory model bit for bit.
Fused q/k/v and gate/up: TensorRT-LLM asserts bit-identical input_scale and weight_scale_2 (NVFP4, W4A8) and
uses one pre_quant_scale; a model that violates it raises (jaxq.quantize makes them shared).
fp8_pb_wo is weight-only in ModelOpt's config: serving engines apply the dynamic 1x128 FP8 activations
themselves, and jaxq.load reads it as fp8_block with activation "none".
KV cache FP8: `<attn>.k_proj.k_scale`, `<attn>.v_proj.v_scale` F32 [] (amax / 448), kv_cache_quant_algo "FP8".

hf_quant_config.json {"producer": {"name": "modelopt", "version"}, "quantization": {"quant_algo",
"kv_cache_quant_algo", per-algo extras (group_size, has_zero_point, pre_quant_scale), "exclude_modules"}} and
config.json quantization_config (quant_method "modelopt", config_groups for FP8 / NVFP4 only, ignore,
quant_algo, kv_cache_scheme, producer); several algos give MIXED_PRECISION with quantized_layers.
The producer name "modelopt" is what TensorRT-LLM and jaxq.load detect the format by; the version is the
ModelOpt release whose layout this reproduces.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxq.formats import fp8_checkpoint_scale, to_modelopt_int4, to_modelopt_mxfp4, to_modelopt_nvfp4
from jaxq.io.export.common import ModelTensors, nonzero_block_scales
from jaxq.loaded_model import LoadedModel
from jaxq.nn.quantized_weight import QuantizedWeight
from jaxq.quantize.pipeline import FUSED_SIBLINGS

MODELOPT_VERSION = "0.47.0"
PRODUCER = {"name": "modelopt", "version": MODELOPT_VERSION}
_FUSED = {leaf for group in FUSED_SIBLINGS for leaf in group}
_INT4_EXTRAS = {"has_zero_point": False, "pre_quant_scale": True}
_STATIC_INPUT = ("fp8_static", "nvfp4")


def quant_algo(module: str, qw: QuantizedWeight) -> tuple[str, dict]:
    """(quant_algo, its hf_quant_config extras) of one quantized linear; ValueError naming the layer when
    ModelOpt has no layout for it."""
    r, w, pqs = qw.recipe, qw.weight, qw.pre_quant_scale
    act = r.activation
    if pqs is not None and r.weight_format not in ("int4", "nvfp4"):
        return _unsupported(module, qw, "a pre_quant_scale (ModelOpt stores one only with INT4 or NVFP4)")
    if r.weight_format == "fp8":
        if w.granularity == "tensor" and act == "fp8_static":
            return "FP8", {}
        if w.granularity == "channel" and act == "fp8_token":
            return "FP8_PER_CHANNEL_PER_TOKEN", {}
        if w.granularity == "block" and w.block_size == 128 and act in ("fp8_group", "none"):
            return "fp8_pb_wo", {}
    elif r.weight_format == "nvfp4":
        if act == "nvfp4":
            return ("NVFP4", {"group_size": 16}) if pqs is None else ("NVFP4_AWQ", {"group_size": 16, **_INT4_EXTRAS})
        if act == "none" and pqs is None:
            return "W4A16_NVFP4", {"group_size": 16}
    elif r.weight_format == "mxfp4":
        if act == "none":
            return "mxfp4", {}
        if act == "fp8_static":
            return "W4A8_MXFP4_FP8", {"group_size": 32}
    elif r.weight_format == "int4":
        if w.zero is not None or w.g_idx is not None or r.group_size == -1:
            what = ("zero points (asymmetric INT4)" if w.zero is not None else
                    "an act-order g_idx" if w.g_idx is not None else "one INT4 group per output channel")
            return _unsupported(module, qw, what)
        if act in ("none", "fp8_static"):
            return ("W4A16_AWQ" if act == "none" else "W4A8_AWQ"), {"group_size": w.group_size, **_INT4_EXTRAS}
    return _unsupported(module, qw, f"{type(w).__name__} with activation {act!r}")


def _unsupported(module, qw, what) -> tuple[str, dict]:
    raise ValueError(f"layer {module}: recipe {qw.recipe.name!r} has {what}, which ModelOpt's checkpoint format "
                     "cannot store; export it with format='compressed-tensors' (vLLM) or quantize it with a "
                     "ModelOpt recipe (symmetric INT4 without act-order, FP8, NVFP4, MXFP4)")


def linear_tensors(module: str, qw: QuantizedWeight, dtype) -> dict[str, Any]:
    """{"<module>.<role>": array} of one quantized linear (table in the module docstring)."""
    r, w = qw.recipe, qw.weight
    if r.weight_format == "fp8":
        out = {"weight": w.data, "weight_scale": fp8_checkpoint_scale(w, "modelopt")}
    elif r.weight_format == "nvfp4":
        out = to_modelopt_nvfp4(nonzero_block_scales(w))
    elif r.weight_format == "mxfp4":
        out = to_modelopt_mxfp4(w)
    else:
        out = to_modelopt_int4(w)
        out["weight_scale"] = out["weight_scale"].astype(jnp.float32)  # ModelOpt writes F32 (exact upcast)
        if qw.weight_scale_2 is not None:
            out["weight_scale_2"] = qw.weight_scale_2
        if qw.pre_quant_scale is None and module.rpartition(".")[2] not in _FUSED:
            out["pre_quant_scale"] = jnp.ones(w.shape[-1], dtype)  # TensorRT-LLM reads it unconditionally
    if qw.pre_quant_scale is not None:
        out["pre_quant_scale"] = qw.pre_quant_scale.astype(dtype)
    if r.activation in _STATIC_INPUT:
        out["input_scale"] = qw.input_scale
    return {f"{module}.{role}": _f32_scalar(a) if role in ("input_scale", "weight_scale_2") else a
            for role, a in out.items()}


def _f32_scalar(x):
    return jnp.asarray(x, jnp.float32).reshape(())


def kv_tensors(attention: str, k_scale, v_scale) -> dict[str, Any]:
    return {f"{attention}.k_proj.k_scale": _f32_scalar(k_scale), f"{attention}.v_proj.v_scale": _f32_scalar(v_scale)}


def check_fused(quantized: dict[str, QuantizedWeight]) -> None:
    """TensorRT-LLM loads q/k/v and gate/up as one GEMM: their pre_quant_scale, and for NVFP4 and W4A8 their
    input_scale and weight_scale_2, must be bit-identical. ValueError naming the layers otherwise."""
    parents = {m.rpartition(".")[0] for m in quantized}
    for parent in sorted(parents):
        for group in FUSED_SIBLINGS:
            members = {f"{parent}.{leaf}": quantized[f"{parent}.{leaf}"] for leaf in group
                       if f"{parent}.{leaf}" in quantized}
            if len(members) < 2:
                continue
            roles = ["pre_quant_scale"]
            if any(q.recipe.weight_format == "nvfp4" or q.weight_scale_2 is not None for q in members.values()):
                roles += ["input_scale", "weight_scale_2"]
            for role in roles:
                values = {m: getattr(q, role) for m, q in members.items()}
                if all(v is None for v in values.values()):
                    continue
                arrays = [None if v is None else np.asarray(v) for v in values.values()]
                if any(a is None or not np.array_equal(a, arrays[0]) for a in arrays):
                    listed = ", ".join(f"{m}: {'none' if a is None else a.reshape(-1)[:4]}"
                                       for m, a in zip(values, arrays))
                    raise ValueError(f"fused layers {list(values)} have different {role} ({listed}); "
                                     "TensorRT-LLM runs them as one GEMM and requires one shared value. "
                                     "Re-quantize with jaxq.quantize, which shares it across q/k/v and gate/up")


def configs(model: LoadedModel, tensors: ModelTensors, kv: bool) -> tuple[dict, dict[str, dict]]:
    """(config.json quantization_config, {"hf_quant_config.json": ...}); ValueError for any linear ModelOpt
    cannot store or any fused group that breaks TensorRT-LLM's sharing rules."""
    algos = {m: quant_algo(m, qw) for m, qw in tensors.quantized.items()}
    check_fused(tensors.quantized)
    kv_algo = "FP8" if kv else None
    distinct = {(a, tuple(sorted(e.items()))) for a, e in algos.values()}
    if len(distinct) == 1:
        algo, extras = next(iter(algos.values()))
        exclude = sorted(set(tensors.unquantized_linears) | set(tensors.embeddings) |
                         ({"lm_head"} if model.config.tie_word_embeddings else set()))  # as ModelOpt lists them
        quantization = {"quant_algo": algo, "kv_cache_quant_algo": kv_algo, **extras, "exclude_modules": exclude}
        inline: dict[str, Any] = {"ignore": exclude, "quant_algo": algo}
        if algo in ("FP8", "NVFP4"):
            inline = {"config_groups": {"group_0": _config_group(algo)}, **inline}
    else:
        layers = {m: {"quant_algo": a, **({"group_size": e["group_size"]} if "group_size" in e else {})}
                  for m, (a, e) in algos.items()}
        quantization = {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": kv_algo, "quantized_layers": layers}
        inline = {"ignore": [], "quant_algo": "MIXED_PRECISION", "quantized_layers": layers}
    if kv:
        inline["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    inline.update(producer=PRODUCER, quant_method="modelopt")
    return inline, {"hf_quant_config.json": {"producer": PRODUCER, "quantization": quantization}}


def _config_group(algo: str) -> dict:
    args = {"dynamic": False, "num_bits": 8, "type": "float"}
    if algo == "NVFP4":
        args = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
    return {"input_activations": dict(args), "weights": dict(args), "targets": ["Linear"]}
