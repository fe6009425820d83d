"""`jaxq.quantize`: the one entry point that turns an unquantized model into a quantized one.

Steps: plan (QuantConfig rules -> recipe per linear, shape checks naming the layer); then, when any recipe
needs calibration (static activation scales, AWQ, GPTQ), layer-by-layer calibration (jaxq.calib.sequential):
each decoder layer's input statistics, its AWQ smoothing (jaxq.calib.awq), its weights (GPTQ, AWQ-clipped
or round to nearest) and its static scales, then its output fed to the next layer; otherwise round to
nearest one fused group at a time. Fused q/k/v and gate/up share input_scale and NVFP4 / W4A8
weight_scale_2, as ModelOpt's exporter makes them. Each bf16 weight is read once and only its quantized
form is kept.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from typing import Any, Iterable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxq.calib.awq import AWQConfig, clip_weights, smooth_layer
from jaxq.calib.data import DEFAULT_SEED, calibration_tokens
from jaxq.calib.gptq import GPTQConfig, gptq_quantize
from jaxq.calib.observers import linear_names
from jaxq.calib.sequential import InputStats, run_sequential
from jaxq.kv_scales import calibrate_kv_scales
from jaxq.loaded_model import LoadedModel
from jaxq.nn.activation_quant import STATIC_MODES
from jaxq.nn.quantized_weight import QuantizedWeight
from jaxq.quantize.weights import (abs_max, best_int4_group, fp8_scale_from_amax, input_scale_from_amax, is_w4a8,
                                   layer_error, quantize_weight_array)
from jaxq.recipes import DEFAULT_EXCLUSIONS, QuantConfig, Recipe
from models.hf_interop import hf_path

log = logging.getLogger(__name__)

# Linears that read the same tensor (ModelOpt's fused groups): they share their static scales.
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# Calibration samples when calib_size is not given: ModelOpt's 512 on an accelerator, fewer on a CPU,
# where a 135M-parameter model runs about 250 tokens/s per layer pass on two cores.
DEFAULT_CALIB_SIZE = {"cpu": 64}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclasses.dataclass
class QuantizeReport:
    """What `quantize` did: layers per recipe, bytes, time, memory and anything that fell back.

    bytes_before / bytes_after: all params (unquantized leaves included); model_bf16_bytes: the params'
    size in bf16 (the yardstick of memory). largest_layer_bytes: the biggest decoder layer's unquantized
    linear weights. calibration: what calibrated the model ("" without calibration).
    host_peak_rise: how far the process's peak resident memory rose (Linux; None elsewhere): with
    calibration, over the whole layer-by-layer run (activation caches, statistics, compilation and the
    quantized weights it produced included); without, while the layers after the first were quantized (the
    measured_quantized_bytes they produced plus the loop's working set).
    device_peak_bytes: the accelerator's own peak since start-up, where it reports one.
    notes: fallbacks and adjustments, each naming its layer (also logged as warnings).
    """

    layers: dict[str, int]
    excluded: list[str]
    unmatched_rules: list[str]
    bytes_before: int
    bytes_after: int
    model_bf16_bytes: int
    quantized_linear_bytes: int
    measured_quantized_bytes: int
    largest_layer_bytes: int
    host_peak_rise: int | None
    device_peak_bytes: int | None
    seconds: float
    calibration: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        mb = lambda b: f"{b / 2**20:.1f} MiB"
        lines = [f"quantized {sum(self.layers.values())} linears {self.layers}, kept {len(self.excluded)} "
                 f"unquantized; params {mb(self.bytes_before)} -> {mb(self.bytes_after)} in {self.seconds:.1f} s"]
        if self.calibration:
            lines.append(f"calibration: {self.calibration}")
        if self.host_peak_rise is not None:
            ratio = f" = {self.host_peak_rise / self.model_bf16_bytes:.2f} x the bf16 model ({mb(self.model_bf16_bytes)})"
            if self.calibration:
                lines.append(f"host peak rose {mb(self.host_peak_rise)}{ratio} during layer-by-layer calibration")
            else:
                lines.append(f"host peak rose {mb(self.host_peak_rise)}{ratio} while layers 1.. were quantized, "
                             f"which produced {mb(self.measured_quantized_bytes)} of quantized weights (one "
                             f"unquantized layer: {mb(self.largest_layer_bytes)})")
        if self.device_peak_bytes is not None:
            lines.append(f"device peak {mb(self.device_peak_bytes)}")
        lines += self.notes
        return "\n".join(lines)


def quantize(
    model: LoadedModel,
    recipe: str | Recipe | QuantConfig,
    *,
    calib_data: str | os.PathLike | Sequence[int] | np.ndarray | None = None,
    calib_size: int | None = None,
    calib_seq: int = 512,
    calib_seed: int = DEFAULT_SEED,
    calib_field: str = "text",
    kv_cache: str | None = None,
    group_size: int | None = None,
    exclude: Iterable[str] = (),
    awq: AWQConfig = AWQConfig(),
    gptq: GPTQConfig = GPTQConfig(),
    propagate: str | None = None,
    batch_size: int = 4,
    progress: bool = True,
    return_report: bool = False,
) -> LoadedModel | tuple[LoadedModel, QuantizeReport]:
    """The model with its linear layers quantized: each planned QDense "weight" becomes a QuantizedWeight.

    recipe: a recipe name ("fp8", "nvfp4", "w4a16_awq", ...), a Recipe, or a QuantConfig (ordered
      per-module rules, exclusions, KV cache dtype). Layers an exclusion or a None rule leaves out stay as
      they are; rules or exclusions that match no layer are logged as a warning. Recipe.algorithm picks how
      weights are made: "max" (round to nearest), "awq" (any weight format; clipping for INT4) or "gptq"
      (INT4); get_recipe("w4a16_gptq", symmetric=False, act_order=True) etc. change the variant.
    calib_data: text, a text or JSONL file (calib_field names the JSONL text field), or token ids; None uses
      the built-in default text (jaxq.calib.data). Needed for static activation scales (fp8, nvfp4 W4A4,
      w4a8_*, mxfp4 with FP8 input), AWQ, GPTQ and kv_cache="fp8". calib_size samples of calib_seq tokens
      are drawn with calib_seed; calib_size None means 512 (ModelOpt's default), 64 on a CPU.
    kv_cache: "fp8" calibrates per-layer k/v scales (jaxq.calibrate_kv_scales, unquantized model, the
      same samples) into model.kv_scales; run the result with kv_cache_dtype="fp8" to use them.
    group_size: INT4 group size along K (default: the recipe's, 128). There is no silent per-layer
      fallback: when a layer's K is not a multiple, the error names the layer and the largest of
      128/64/32 that divides every quantized layer's K (SmolLM2's hidden size 576 needs 64), so one
      checkpoint has one group size, as the ModelOpt/vLLM/TRT-LLM configs require.
    exclude: extra regexes of dotted module names (model.layers.0.mlp.down_proj) to keep unquantized.
    awq, gptq: the algorithms' knobs (jaxq.calib.awq.AWQConfig, jaxq.calib.gptq.GPTQConfig). AWQ's default
      fold="norms" keeps o_proj/down_proj smoothing as pre_quant_scale (ModelOpt); pass
      awq=AWQConfig(fold="foldable") for a model to export with format="compressed-tensors".
    propagate: what a calibrated layer feeds the next one, "quantized" (its quantized output,
      llm-compressor's sequential pipeline) or "float" (its unquantized output, ModelOpt; one pass per
      layer instead of two); None: "quantized" when any recipe uses GPTQ or AWQ, else "float".
    batch_size: calibration samples per layer pass.
    return_report: also return a QuantizeReport (layers, bytes, peak memory, fallbacks); it is logged at INFO.

    Calibration runs decoder layer by decoder layer (jaxq.calib.sequential), so peak memory is about one
    layer plus the calibration activations; linears outside the decoder layers (an untied lm_head) can only
    take recipes that need no calibration. Keep model.params on the host (jax.device_get) to hold only the
    quantized model plus one layer on the device. Returns a new LoadedModel (same config and tokenizer,
    quantization = the resolved QuantConfig, norms carrying folded AWQ scales).
    """
    start = time.perf_counter()
    if not isinstance(model, LoadedModel):
        raise TypeError(f"quantize needs a LoadedModel (jaxq.load or jaxq.loaded_model.from_params), got "
                        f"{type(model).__name__}")
    config = _resolve_config(recipe, kv_cache, group_size, tuple(exclude))
    flat = flax.traverse_util.flatten_dict(model.params)
    names = linear_names(model)
    plan, unmatched = _plan(config, names, flat)
    groups = _fused_groups([n for n in names if plan[n] is not None], plan)
    calibrated = [g for g in groups if _needs_calibration(plan[g[0]])]
    outside = [g[0] for g in calibrated if not _LAYER.match(g[0])]
    if outside:
        raise ValueError(f"layer {outside[0]}: recipe {plan[outside[0]].name!r} needs calibration, which runs "
                         "decoder layer by decoder layer and does not reach linears outside the layers; exclude "
                         "it or give it a recipe without static activation scales, AWQ or GPTQ")

    tokens = None
    if calibrated or config.kv_cache == "fp8":
        why = "static activation scales" if any(plan[g[0]].activation in STATIC_MODES for g in calibrated) else (
            "AWQ/GPTQ" if calibrated else "FP8 KV-cache scales")
        tokens = _calibration_tokens(model, why, calib_data, calib_size, calib_seq, calib_seed, calib_field, progress)
    if config.kv_cache == "fp8":
        model = calibrate_kv_scales(model, tokens.reshape(-1), tokens.shape[1], len(tokens))

    notes: list[str] = []
    measured_bytes, calibration = 0, ""
    if calibrated:
        propagate = propagate or ("quantized" if any(plan[g[0]].algorithm != "max" for g in calibrated) else "float")
        calibration = f"{len(tokens)} x {tokens.shape[1]} tokens, layer by layer, {propagate} outputs propagated"
        new, (host_rise, device_peak) = _quantize_layerwise(model, tokens, groups, plan, flat, awq, gptq, propagate,
                                                            batch_size, progress, notes)
    else:
        new, measured_bytes, (host_rise, device_peak) = _quantize_rtn(groups, plan, flat, progress)

    quantized = model.replace(params=flax.traverse_util.unflatten_dict(new), quantization=config)
    report = QuantizeReport(
        layers=_count_recipes(plan), excluded=[n for n in names if plan[n] is None], unmatched_rules=unmatched,
        bytes_before=_nbytes(model.params), bytes_after=_nbytes(quantized.params),
        model_bf16_bytes=2 * sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model.params)),
        quantized_linear_bytes=sum(_nbytes(new[hf_path(n) + ("weight",)]) for n in names if plan[n]),
        measured_quantized_bytes=measured_bytes,
        largest_layer_bytes=_largest_layer_bytes(names, plan, flat), host_peak_rise=host_rise,
        device_peak_bytes=device_peak, seconds=time.perf_counter() - start, calibration=calibration, notes=notes)
    log.info("%s", report)
    return (quantized, report) if return_report else quantized


def _calibration_tokens(model, why, calib_data, calib_size, calib_seq, calib_seed, calib_field, progress):
    if calib_data is None and model.tokenizer is None:
        raise ValueError(f"{why} need calibration data: pass calib_data=<text, text/JSONL file or token ids> "
                         f"({model.source} has no tokenizer for the built-in default text)")
    size = calib_size or DEFAULT_CALIB_SIZE.get(jax.default_backend(), 512)
    return calibration_tokens(model, calib_data, num_samples=size, seq_len=calib_seq, seed=calib_seed,
                              field=calib_field, progress=progress)


def _quantize_layerwise(model, tokens, groups, plan, flat, awq, gptq, propagate, batch_size, progress, notes):
    """Every linear, calibrated decoder layer by decoder layer; returns (new flat params, (host peak rise,
    device peak)), the span measured over the whole run."""
    by_layer = _groups_by_layer(groups)
    meter = _PeakMemory()
    layer_params = run_sequential(
        model, tokens,
        lambda i, params, stats: _quantize_layer(i, params, stats, by_layer.get(i, []), plan, model, awq, gptq, notes),
        lambda i: {_LAYER.match(g[0]).group(2): plan[g[0]].algorithm != "max"
                   for g in by_layer.get(i, []) if _needs_calibration(plan[g[0]])},
        propagate=propagate, batch_size=batch_size, progress=progress)
    new = dict(flat)
    for i, params in enumerate(layer_params):
        new.update({("model", f"layers_{i}") + path: v for path, v in flax.traverse_util.flatten_dict(params).items()})
    for group in [g for g in groups if not _LAYER.match(g[0])]:
        new.update(_rtn_group(group, plan[group[0]], flat))
    jax.block_until_ready(new)
    return new, meter.read()


def _quantize_rtn(groups, plan, flat, progress):
    """Every linear round to nearest, one fused group at a time; returns (new flat params, bytes quantized
    after the first layer, (host peak rise, device peak)). The memory span starts after the first decoder
    layer, whose shapes compile every quantizer, so compiler memory does not count as working set."""
    new = dict(flat)
    first_layer = _layer_of(groups[0][0]) if groups else None
    meter, measured_bytes = None, 0
    for group in _progress(groups, progress):
        if meter is None and _layer_of(group[0]) != first_layer:
            jax.block_until_ready(new)
            meter = _PeakMemory()
        quantized_group = _rtn_group(group, plan[group[0]], flat)
        new.update(quantized_group)
        measured_bytes += _nbytes(quantized_group) if meter is not None else 0
    jax.block_until_ready(new)
    return new, measured_bytes, meter.read() if meter is not None else (None, None)


def _needs_calibration(recipe: Recipe) -> bool:
    return recipe.activation in STATIC_MODES or recipe.algorithm != "max"


def _resolve_config(recipe, kv_cache, group_size, exclude) -> QuantConfig:
    if isinstance(recipe, QuantConfig):
        config = dataclasses.replace(recipe, exclusions=recipe.exclusions + exclude,
                                     kv_cache=kv_cache if kv_cache is not None else recipe.kv_cache)
    else:
        config = QuantConfig.for_recipe(recipe, kv_cache=kv_cache, exclude=exclude)
    if group_size is not None:
        if not any(r is not None and r.weight_format == "int4" for _, r in config.rules):
            raise ValueError(f"group_size={group_size} applies to INT4 recipes only; this config has none")
        rules = tuple((p, r.replace(group_size=group_size) if r is not None and r.weight_format == "int4" else r)
                      for p, r in config.rules)
        config = dataclasses.replace(config, rules=rules)
    for _, r in config.rules:
        if r is not None and r.algorithm == "gptq" and r.weight_format != "int4":
            raise ValueError(f"recipe {r.name!r}: GPTQ is implemented for INT4 weights, not {r.weight_format}; "
                             "use algorithm='awq' or 'max'")
    return config
def _plan(config: QuantConfig, names: list[str], flat: dict) -> tuple[dict[str, Recipe | None], list[str]]:
    """Recipe per linear; every layer a recipe cannot take is reported at once, before any work."""
    plan, unmatched = config.resolve(names)
    unmatched = [p for p in unmatched if p not in DEFAULT_EXCLUSIONS]  # the defaults cover other families
    if unmatched:
        log.warning("quantization rules/exclusions that match no layer: %s", unmatched)
    errors, int4_ks = [], []
    for name, recipe in plan.items():
        if recipe is None:
            continue
        weight = flat[hf_path(name) + ("weight",)]
        if isinstance(weight, QuantizedWeight):
            raise ValueError(f"layer {name} is already quantized ({weight.recipe.name}); quantize an "
                             "unquantized model")
        if recipe.weight_format == "int4":
            int4_ks.append(weight.shape[-1])
        error = layer_error(name, tuple(weight.shape), recipe)
        if error:
            errors.append(error)
    if errors:
        hint = ""
        if any("INT4 in groups" in e for e in errors):
            best = best_int4_group(int4_ks)
            hint = (f"\npass group_size={best} (the largest of 128/64/32 dividing every INT4 layer's K)"
                    if best else "\nno INT4 group size of 128/64/32 divides every K; exclude those layers")
        more = f"\n(+{len(errors) - 10} more)" if len(errors) > 10 else ""
        raise ValueError("\n".join(errors[:10]) + more + hint)
    return plan, unmatched


def _fused_groups(names: list[str], plan: dict) -> list[tuple[str, ...]]:
    """Quantized linears in call order, siblings of one fused set (same parent, same recipe) together."""
    key_of = {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        fused = next((i for i, s in enumerate(FUSED_SIBLINGS) if leaf in s), None)
        key_of[name] = (parent, fused, plan[name]) if fused is not None else (name,)
    groups: dict[Any, list[str]] = {}
    for name in names:
        groups.setdefault(key_of[name], []).append(name)
    return [tuple(g) for g in groups.values()]


def _groups_by_layer(groups) -> dict[int, list[tuple[str, ...]]]:
    by_layer: dict[int, list] = {}
    for group in groups:
        match = _LAYER.match(group[0])
        if match:
            by_layer.setdefault(int(match.group(1)), []).append(group)
    return by_layer


def _rtn_group(group: tuple[str, ...], recipe: Recipe, flat: dict) -> dict:
    """Round to nearest, no calibration: {params path: QuantizedWeight} of one fused group."""
    weights = [flat[hf_path(n) + ("weight",)] for n in group]
    return {hf_path(n) + ("weight",): qw for n, qw in _quantize_group(group, recipe, weights, None).items()}


def _quantize_layer(i: int, params: dict, stats: dict[str, InputStats], groups: list, plan: dict,
                    model: LoadedModel, awq: AWQConfig, gptq: GPTQConfig, notes: list[str]) -> dict:
    """One decoder layer's new params from its input statistics: AWQ smoothing of its AWQ groups, then per
    fused group the weights (GPTQ, AWQ-clipped or round to nearest) and static scales."""
    prefix = f"model.layers.{i}."
    spec = type(model.module).layerwise
    flat = flax.traverse_util.flatten_dict(params)
    rel = lambda name: name[len(prefix):]
    weights = {rel(n): flat[hf_path(rel(n)) + ("weight",)] for g in groups for n in g}
    norms = {norm: flat[(norm, "weight")] for norm, _ in spec.norm_inputs}
    biases = {p: flat[hf_path(p) + ("bias",)] for p, _ in spec.row_inputs if hf_path(p) + ("bias",) in flat}
    awq_groups = [(tuple(rel(n) for n in g), plan[g[0]]) for g in groups if plan[g[0]].algorithm == "awq"]
    pre_quant_scales, awq_notes = smooth_layer(weights, norms, biases, awq_groups, stats, spec, awq, prefix)
    notes += awq_notes
    for group in groups:
        recipe, members = plan[group[0]], [rel(n) for n in group]
        st = stats.get(members[0])
        amax = None
        if recipe.activation in STATIC_MODES:
            if not st.is_finite():
                raise ValueError(f"layer {group[0]}: its calibration input has {st.count} tokens or NaN/Inf "
                                 f"values, so recipe {recipe.name!r} gets no static input scale; check the model "
                                 "runs finite in this dtype, or exclude the layer")
            amax = jnp.max(st.amax)
        ws = [weights[m] for m in members]
        arrays = None
        if recipe.algorithm == "gptq":
            try:
                fused, gptq_notes = gptq_quantize(group[0], jnp.concatenate(ws), st, recipe, gptq)
                notes += gptq_notes
                arrays = _split_rows(fused, [w.shape[0] for w in ws])
            except ValueError as err:
                notes.append(f"{err}; rounded to nearest instead")
                log.warning("%s", notes[-1])
        elif (recipe.algorithm == "awq" and awq.clip and recipe.weight_format == "int4"
              and st.second_moment is not None and st.is_finite()):
            ws = _split_rows(clip_weights(jnp.concatenate(ws), st, recipe, awq), [w.shape[0] for w in ws])
        pqs = [pre_quant_scales.get(m) for m in members]
        for name, qw in _quantize_group(group, recipe, ws, amax, arrays, pqs).items():
            flat[hf_path(rel(name)) + ("weight",)] = qw
    for norm, value in norms.items():
        flat[(norm, "weight")] = value
    for producer, value in biases.items():
        flat[hf_path(producer) + ("bias",)] = value
    return flax.traverse_util.unflatten_dict(flat)


def _split_rows(x, sizes: list[int]) -> list:
    """A fused [sum(sizes), K] array (or Int4Tensor) back into its members' rows."""
    bounds = np.cumsum([0] + sizes)
    if isinstance(x, jax.Array):
        return [x[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return [x.replace(packed=x.packed[a:b], scale=x.scale[a:b], zero=None if x.zero is None else x.zero[a:b])
            for a, b in zip(bounds[:-1], bounds[1:])]


def _quantize_group(group: tuple[str, ...], recipe: Recipe, weights: list, input_amax, arrays=None,
                    pre_quant_scales=None) -> dict[str, QuantizedWeight]:
    """Quantize one fused group: shared input_scale (from the group's input amax), shared NVFP4 global amax
    (max |W| over members) and W4A8 weight_scale_2 (max |dequant_int4(W)| / 448 over members).
    arrays: the members' weights already quantized (GPTQ), else round to nearest of `weights`;
    pre_quant_scales: per member, AWQ's kept smoothing or None."""
    input_scale = None if input_amax is None else input_scale_from_amax(recipe, input_amax)
    if arrays is None:
        weights = [jnp.asarray(w) for w in weights]
        global_amax = max(abs_max(w) for w in weights) if recipe.weight_format == "nvfp4" else None
        arrays = [quantize_weight_array(w, recipe, global_amax) for w in weights]
    weight_scale_2 = None
    if is_w4a8(recipe):
        weight_scale_2 = fp8_scale_from_amax(max(abs_max(a.dequantize()) for a in arrays))
    pre_quant_scales = pre_quant_scales or [None] * len(group)
    return {n: QuantizedWeight(recipe, a, input_scale, pqs, weight_scale_2)
            for n, a, pqs in zip(group, arrays, pre_quant_scales)}


def _progress(groups, enabled):
    from tqdm.auto import tqdm

    return tqdm(groups, desc="quantize", unit="group", disable=not enabled)


def _count_recipes(plan) -> dict[str, int]:
    counts: dict[str, int] = {}
    for recipe in plan.values():
        if recipe is not None:
            counts[recipe.name] = counts.get(recipe.name, 0) + 1
    return counts


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _layer_of(name: str) -> str:
    """model.layers.3.mlp.up_proj -> model.layers.3 (a name outside the decoder layers is its own)."""
    return re.sub(r"^(.*\.layers\.\d+)\..*$", r"\1", name)


def _largest_layer_bytes(names, plan, flat) -> int:
    per_layer: dict[str, int] = {}
    for name in names:
        if plan[name] is not None:
            layer = _layer_of(name)
            per_layer[layer] = per_layer.get(layer, 0) + _nbytes(flat[hf_path(name) + ("weight",)])
    return max(per_layer.values(), default=0)


class _PeakMemory:
    """Peak memory over a span: the host's resident-set high-water mark (Linux: reset through
    /proc/self/clear_refs, read from VmHWM) and the first device's peak_bytes_in_use where reported."""

    def __init__(self):
        self._host_start = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._host_start = self._status("VmHWM")
        except OSError:
            pass

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            line = next(l for l in f if l.startswith(key + ":"))
        return int(line.split()[1]) * 1024

    def read(self) -> tuple[int | None, int | None]:
        host = None if self._host_start is None else self._status("VmHWM") - self._host_start
        stats = jax.devices()[0].memory_stats() or {}
        return host, stats.get("peak_bytes_in_use")
