"""Layer-by-layer (sequential) calibration: run the model one decoder layer at a time over cached hidden
states, let a callback quantize that layer from statistics of its linears' inputs, and feed the layer's
output forward (llm-compressor's sequential pipeline; GPTQ's "inputs from the already-quantized layers").

Memory: the calibration activations [N, L, hidden] (one cache in, one out) plus one layer's working set;
the whole model never runs at once. The model needs a `layerwise` description (jaxq.nn.decoder.Layerwise).

Per decoder layer i:
  1. statistics pass: the unquantized layer over every cached batch, with a flax interceptor recording each
     requested linear's input (InputStats);
  2. `quantize_layer(i, params, stats)` returns the layer's new params (QuantizedWeight linears, folded norms);
  3. propagate: with propagate="quantized", the new layer runs over the cache again and its outputs are the
     next layer's inputs; with "float", the unquantized outputs of pass 1 are (ModelOpt's and AutoAWQ's
     calibration, one pass per layer).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxq.loaded_model import LoadedModel
from jaxq.nn.decoder import attention_masks
from jaxq.calib.observers import record_inputs

PROPAGATE = ("quantized", "float")


@dataclasses.dataclass
class InputStats:
    """A linear input x over the calibration tokens, float32: count T, amax [K] = max_t |x|, abs_mean [K] =
    mean_t |x| and, when asked for, second_moment [K, K] = mean_t x x^T (GPTQ's Hessian / 2, AWQ's loss)."""

    count: int
    amax: jax.Array
    abs_mean: jax.Array
    second_moment: jax.Array | None = None

    def is_finite(self) -> bool:
        parts = [self.amax, self.abs_mean] + ([self.second_moment] if self.second_moment is not None else [])
        return self.count > 0 and all(bool(jnp.all(jnp.isfinite(p))) for p in parts)

    def smoothed(self, pre_quant_scale) -> "InputStats":
        """The statistics of x * pre_quant_scale (AWQ's smoothed input), exactly."""
        p = jnp.asarray(pre_quant_scale, jnp.float32)
        sm = None if self.second_moment is None else self.second_moment * p[:, None] * p[None, :]
        return InputStats(self.count, self.amax * jnp.abs(p), self.abs_mean * jnp.abs(p), sm)


QuantizeLayer = Callable[[int, dict, Mapping[str, InputStats]], dict]


def run_sequential(model: LoadedModel, tokens: np.ndarray, quantize_layer: QuantizeLayer,
                   wanted: Callable[[int], Mapping[str, bool]], *, propagate: str = "quantized", batch_size: int = 4,
                   progress: bool = True) -> list[dict]:
    """Quantize every decoder layer of `model` in order; returns the new params of each layer
    (params["model"]["layers_<i>"] replacements), the input params untouched.

    tokens [N, L] int32 calibration windows; wanted(i) for layer i: {layer-relative linear name
    ("self_attn.q_proj"): whether its InputStats needs the second moment}; linears that share an input
    need only one entry.
    quantize_layer(i, layer params, {name: InputStats}) -> new layer params.
    """
    if propagate not in PROPAGATE:
        raise ValueError(f"propagate={propagate!r}, expected one of {PROPAGATE}")
    spec = getattr(type(model.module), "layerwise", None)
    if spec is None:
        raise ValueError(f"{type(model.module).__name__} has no `layerwise` description, so it cannot be "
                         "calibrated layer by layer (see jaxq.nn.decoder.Layerwise)")
    from tqdm.auto import tqdm

    cfg, dtype = model.config, model.module.dtype
    backbone, layer = spec.backbone(cfg, dtype), spec.layer(cfg, dtype)
    model_params = model.params["model"]
    batches = [jnp.asarray(tokens[i:i + batch_size]) for i in range(0, len(tokens), batch_size)]
    hidden = [backbone.apply({"params": {"embed_tokens": model_params["embed_tokens"]}}, b, method="embed")
              for b in batches]
    context = {}  # per batch size: positions, per-layer (cos, sin) and masks, shared by every batch of that size
    new_layers = []
    for i in tqdm(range(cfg.num_hidden_layers), desc="quantize layers", unit="layer", disable=not progress):
        params = model_params[f"layers_{i}"]
        wanted_key = tuple(sorted(wanted(i).items()))
        sums: dict = {}
        outputs = []
        for h, tok in zip(hidden, batches):
            positions, rope, masks = _context(context, backbone, cfg, tok, h.dtype)
            out, batch_stats = _layer_stats(layer, wanted_key, params, h, *rope[i], masks[i], positions)
            _accumulate(sums, batch_stats, h.shape[0] * h.shape[1])
            if propagate == "float":
                outputs.append(out)
        stats = {name: InputStats(count, amax, total / count, None if gram is None else gram / count)
                 for name, (count, amax, total, gram) in sums.items()}
        new_params = quantize_layer(i, params, stats)
        if propagate == "quantized":
            for h, tok in zip(hidden, batches):
                positions, rope, masks = _context(context, backbone, cfg, tok, h.dtype)
                outputs.append(_layer_forward(layer, new_params, h, *rope[i], masks[i], positions))
        hidden = outputs
        new_layers.append(new_params)
    return new_layers


def _context(cache: dict, backbone, cfg, tokens, dtype):
    """(positions, per-layer (cos, sin), per-layer mask) for a no-cache forward of tokens' shape."""
    key = tokens.shape
    if key not in cache:
        positions, masks = attention_masks(tokens, None, None, set(cfg.layer_windows))
        rope = backbone.apply({"params": {}}, positions, dtype, method="rope")
        cache[key] = (positions, rope, [masks[w] for w in cfg.layer_windows])
    return cache[key]


def _accumulate(sums: dict, batch_stats: dict, tokens: int) -> None:
    for name, (amax, total, gram) in batch_stats.items():
        if name not in sums:
            sums[name] = (tokens, amax, total, gram)
            continue
        count, a, t, g = sums[name]
        sums[name] = (count + tokens, jnp.maximum(a, amax), t + total, None if g is None else g + gram)


@functools.partial(jax.jit, static_argnames=("layer", "wanted"))
def _layer_stats(layer, wanted, params, h, cos, sin, mask, positions):
    """The layer's output on h [B, T, hidden] and, per wanted linear, (amax [K], sum |x| [K], x^T x [K, K]
    or None) of its input in float32."""
    inputs: dict = {}
    with nn.intercept_methods(record_inputs(inputs)):
        out, _ = layer.apply({"params": params}, h, cos, sin, mask, None, positions)
    stats = {}
    for name, gram in wanted:
        if name not in inputs:
            raise ValueError(f"linear {name} was not called by {type(layer).__name__}; known: {sorted(inputs)}")
        x = inputs[name][0].astype(jnp.float32)
        x = x.reshape(-1, x.shape[-1])
        xx = jnp.matmul(x.T, x, precision=lax.Precision.HIGHEST) if gram else None
        stats[name] = (jnp.max(jnp.abs(x), axis=0), jnp.sum(jnp.abs(x), axis=0), xx)
    return out, stats


@functools.partial(jax.jit, static_argnames="layer")
def _layer_forward(layer, params, h, cos, sin, mask, positions):
    return layer.apply({"params": params}, h, cos, sin, mask, None, positions)[0]
