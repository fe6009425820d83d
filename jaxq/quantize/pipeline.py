"""`jaxq.quantize`: the one entry point that turns an unquantized model into a quantized one.

Steps: plan (QuantConfig rules -> recipe per linear, shape checks naming the layer), calibrate (max amax
of each static-activation layer's input, KV scales), then quantize the linears one fused group at a
time (q/k/v, gate/up share input_scale and NVFP4 / W4A8 weight_scale_2, as ModelOpt's exporter makes
them), reading each bf16 weight once and keeping only its quantized form.
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

from jaxq.kv_scales import calibrate_kv_scales
from jaxq.loaded_model import LoadedModel
from jaxq.nn.activation_quant import STATIC_MODES
from jaxq.nn.quantized_weight import QuantizedWeight
from jaxq.quantize.calibrate import calibration_windows, input_amax, linear_names
from jaxq.quantize.weights import (abs_max, best_int4_group, fp8_scale_from_amax, input_scale_from_amax, is_w4a8,
                                   layer_error, quantize_weight_array)
from jaxq.recipes import DEFAULT_EXCLUSIONS, QuantConfig, Recipe
from models.hf_interop import hf_path

log = logging.getLogger(__name__)

# Linears that read the same tensor (ModelOpt's fused groups): they share their static scales.
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
IMPLEMENTED_ALGORITHMS = ("max",)


@dataclasses.dataclass
class QuantizeReport:
    """What `quantize` did: layers per recipe, bytes, time and memory.

    bytes_before / bytes_after: all params (unquantized leaves included). largest_layer_bytes: the biggest
    decoder layer's unquantized linear weights. host_peak_rise: how far the process's peak resident
    memory rose while the layers after the first were quantized (Linux; None elsewhere, or for a single
    layer): the measured_quantized_bytes those layers produced plus the loop's working set.
    device_peak_bytes: the accelerator's own peak since start-up, where it reports one.
    """

    layers: dict[str, int]
    excluded: list[str]
    unmatched_rules: list[str]
    bytes_before: int
    bytes_after: int
    quantized_linear_bytes: int
    measured_quantized_bytes: int
    largest_layer_bytes: int
    host_peak_rise: int | None
    device_peak_bytes: int | None
    seconds: float

    def __str__(self) -> str:
        mb = lambda b: f"{b / 2**20:.1f} MiB"
        lines = [f"quantized {sum(self.layers.values())} linears {self.layers}, kept {len(self.excluded)} "
                 f"unquantized; params {mb(self.bytes_before)} -> {mb(self.bytes_after)} in {self.seconds:.1f} s"]
        if self.host_peak_rise is not None:
            lines.append(f"host peak rose {mb(self.host_peak_rise)} while layers 1.. were quantized, which "
                         f"produced {mb(self.measured_quantized_bytes)} of quantized weights (one unquantized "
                         f"layer: {mb(self.largest_layer_bytes)})")
        if self.device_peak_bytes is not None:
            lines.append(f"device peak {mb(self.device_peak_bytes)}")
        return "\n".join(lines)


def quantize(
    model: LoadedModel,
    recipe: str | Recipe | QuantConfig,
    *,
    calib_data: str | os.PathLike | Sequence[int] | np.ndarray | None = None,
    calib_size: int = 512,
    calib_seq: int = 512,
    kv_cache: str | None = None,
    group_size: int | None = None,
    exclude: Iterable[str] = (),
    progress: bool = True,
    return_report: bool = False,
) -> LoadedModel | tuple[LoadedModel, QuantizeReport]:
    """The model with its linear layers quantized: each planned QDense "weight" becomes a QuantizedWeight.

    recipe: a recipe name ("fp8", "nvfp4", "w4a16_awq", ...), a Recipe, or a QuantConfig (ordered
      per-module rules, exclusions, KV cache dtype). Layers an exclusion or a None rule leaves out stay as
      they are; rules or exclusions that match no layer are logged as a warning.
    calib_data: text, a path to a text file, or token ids; needed for static activation scales (fp8,
      nvfp4 W4A4, w4a8_*, mxfp4 with FP8 input) and for kv_cache="fp8". The first calib_size windows of
      calib_seq tokens are used (ModelOpt's defaults: 512 x 512), each from position 0.
    kv_cache: "fp8" calibrates per-layer k/v scales (jaxq.calibrate_kv_scales) into model.kv_scales; run
      the result with kv_cache_dtype="fp8" (jaxq.generate, jaxq.perplexity) to use them.
    group_size: INT4 group size along K (default: the recipe's, 128). There is no silent per-layer
      fallback: when a layer's K is not a multiple, the error names the layer and the largest of
      128/64/32 that divides every quantized layer's K (SmolLM2's hidden size 576 needs 64), so one
      checkpoint has one group size, as the ModelOpt/vLLM/TRT-LLM configs require.
    exclude: extra regexes of dotted module names (model.layers.0.mlp.down_proj) to keep unquantized.
    return_report: also return a QuantizeReport (layers, bytes, peak memory); it is logged at INFO anyway.

    Only round-to-nearest weights with max-calibrated static scales (algorithm "max") are implemented;
    recipes whose algorithm is "awq" or "gptq" raise unless overridden, e.g.
    get_recipe("w4a16_awq", algorithm="max"). The weights are read and quantized one fused group at a
    time from model.params: keep them on the host (jax.device_get) to hold only the quantized model plus
    one layer on the device. Returns a new LoadedModel (same config and tokenizer, quantization = the
    resolved QuantConfig).
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

    needs_amax = any(plan[g[0]].activation in STATIC_MODES for g in groups)
    windows = None
    if needs_amax or config.kv_cache == "fp8":
        if calib_data is None:
            why = "static activation scales" if needs_amax else "FP8 KV-cache scales"
            raise ValueError(f"{why} need calibration data: pass calib_data=<text, text file or token ids>")
        windows = calibration_windows(model, calib_data, calib_size, calib_seq)
    amax = input_amax(model, windows, progress) if needs_amax else {}
    if config.kv_cache == "fp8":
        model = calibrate_kv_scales(model, windows.reshape(-1), calib_seq, len(windows))

    # The memory span starts after the first decoder layer, whose shapes compile every quantizer, so
    # compiler memory does not count as working set.
    first_layer = _layer_of(groups[0][0]) if groups else None
    meter, measured_bytes = None, 0
    new = dict(flat)
    for group in _progress(groups, progress):
        if meter is None and _layer_of(group[0]) != first_layer:
            jax.block_until_ready(new)
            meter = _PeakMemory()
        for name, qw in _quantize_group(group, plan[group[0]], flat, amax).items():
            new[hf_path(name) + ("weight",)] = qw
            measured_bytes += _nbytes(qw) if meter is not None else 0
    jax.block_until_ready(new)
    host_rise, device_peak = meter.read() if meter is not None else (None, None)

    quantized = model.replace(params=flax.traverse_util.unflatten_dict(new), quantization=config)
    report = QuantizeReport(
        layers=_count_recipes(plan), excluded=[n for n in names if plan[n] is None], unmatched_rules=unmatched,
        bytes_before=_nbytes(model.params), bytes_after=_nbytes(quantized.params),
        quantized_linear_bytes=sum(_nbytes(new[hf_path(n) + ("weight",)]) for n in names if plan[n]),
        measured_quantized_bytes=measured_bytes,
        largest_layer_bytes=_largest_layer_bytes(names, plan, flat), host_peak_rise=host_rise,
        device_peak_bytes=device_peak, seconds=time.perf_counter() - start)
    log.info("%s", report)
    return (quantized, report) if return_report else quantized


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
        if r is not None and r.algorithm not in IMPLEMENTED_ALGORITHMS:
            raise NotImplementedError(
                f"recipe {r.name!r} uses algorithm {r.algorithm!r}, which jaxq.quantize does not implement yet; "
                f"for round-to-nearest pass get_recipe({r.name!r}, algorithm='max')")
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


def _quantize_group(group: tuple[str, ...], recipe: Recipe, flat: dict, amax: dict) -> dict[str, QuantizedWeight]:
    """Quantize one fused group: shared input_scale (max of the members' input amax), shared NVFP4 global
    amax (max |W| over members) and W4A8 weight_scale_2 (max |dequant_int4(W)| / 448 over members)."""
    weights = [jnp.asarray(flat[hf_path(n) + ("weight",)]) for n in group]
    input_scale = None
    if recipe.activation in STATIC_MODES:
        missing = [n for n in group if n not in amax]
        if missing:
            raise ValueError(f"layers {missing} were not reached by the calibration forward; no input amax")
        input_scale = input_scale_from_amax(recipe, max(jnp.max(amax[n]) for n in group))
    global_amax = max(abs_max(w) for w in weights) if recipe.weight_format == "nvfp4" else None
    arrays = [quantize_weight_array(w, recipe, global_amax) for w in weights]
    weight_scale_2 = None
    if is_w4a8(recipe):
        weight_scale_2 = fp8_scale_from_amax(max(abs_max(a.dequantize()) for a in arrays))
    return {n: QuantizedWeight(recipe, a, input_scale, None, weight_scale_2) for n, a in zip(group, arrays)}


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
