"""AWQ in jaxq.quantize: smooth one decoder layer's AWQ groups (jaxq.calib.awq_core has the maths), fold the
smoothing where ModelOpt's export puts it, and clip the smoothed weights before they are rounded.

Where the smoothing 1/s of a group's input goes (AWQConfig.fold):
  "norms" (default, ModelOpt's export): q/k/v and gate/up fold it into the RMSNorm they read (norm weight
          w <- w / s, Gemma's (1 + w) <- (1 + w) / s); o_proj and down_proj keep it as pre_quant_scale.
  "all"   additionally o_proj into v_proj's rows and down_proj into up_proj's rows when the sizes match one
          to one (v_proj -> o_proj only without GQA); otherwise pre_quant_scale.
  "foldable" (AutoAWQ, llm-compressor; what compressed-tensors needs, having no pre_quant_scale): folds as
          "all", and a group whose smoothing folds nowhere is not smoothed at all (o_proj under GQA: v_proj has
          fewer rows than o_proj has inputs), only clipped (INT4) and rounded, as those tools skip the mappings
          they cannot apply. The result has no pre_quant_scale. `jaxq quantize --export-format
          compressed-tensors` picks it for AWQ recipes; in Python pass
          jaxq.quantize(..., awq=AWQConfig(fold="foldable")) before jaxq.export(..., format="compressed-tensors").
  "none": every AWQ linear keeps its pre_quant_scale.
A group is folded into a norm only when it is exactly the set of linears reading that norm (one fused
group); otherwise its members keep pre_quant_scale ("foldable": are not smoothed). Unquantized, every choice
computes the same function.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp

from jaxq.calib import awq_core
from jaxq.calib.sequential import InputStats
from jaxq.nn.decoder import Layerwise
from jaxq.quantize.weights import fake_quant_weight, int4_group_size
from jaxq.recipes import Recipe

log = logging.getLogger(__name__)
FOLDS = ("norms", "all", "foldable", "none")
ROW_FOLDS = ("all", "foldable")  # the folds that also scale a producer's rows
_QUANT_BLOCK = {"nvfp4": 16, "mxfp4": 32}


@dataclasses.dataclass(frozen=True)
class AWQConfig:
    """AWQ knobs (defaults tuned on SmolLM2-135M, benchmarks/ptq_ppl.py).

    alpha_step: the grid 0, step, ..., 1 of awq_lite's search.
    clip: run awq_clip after the scale search (ModelOpt's awq_full); INT4 recipes only.
    clip_ratios: candidate clipping ratios (ModelOpt: 1.0 and 0.95 down to 0.5).
    fold: where the smoothing goes (module docstring).
    """

    alpha_step: float = 0.1
    clip: bool = True
    clip_ratios: tuple[float, ...] = tuple(round(1 - 0.05 * i, 2) for i in range(11))
    fold: str = "norms"

    def __post_init__(self):
        awq_core.alpha_grid(self.alpha_step)
        if self.fold not in FOLDS:
            raise ValueError(f"AWQConfig.fold={self.fold!r}, expected one of {FOLDS}")
        if not self.clip_ratios or not all(0 < r <= 1 for r in self.clip_ratios):
            raise ValueError(f"AWQConfig.clip_ratios={self.clip_ratios} must be in (0, 1]")


def smooth_layer(weights: dict[str, jax.Array], norms: dict[str, jax.Array], biases: dict[str, jax.Array],
                 groups: list[tuple[tuple[str, ...], Recipe]], stats: dict[str, InputStats], spec: Layerwise,
                 config: AWQConfig, prefix: str) -> tuple[dict[str, jax.Array], list[str]]:
    """Smooth every AWQ group of one decoder layer, in place in the three dicts (keyed by layer-relative
    names, "self_attn.q_proj" / "input_layernorm"; weights holds the layer's quantized linears only, so a
    row fold needs a quantized producer): W <- W diag(s) in float32, the smoothing folded per config.fold,
    stats[group[0]] replaced by the smoothed input's. Returns ({linear: pre_quant_scale kept,
    in the weights' dtype}, notes). A group whose statistics are empty or not finite is left unsmoothed
    with a warning naming it (round to nearest); with fold="foldable", a group whose smoothing would fold
    nowhere is left unsmoothed too (logged at INFO). prefix: "model.layers.<i>." for messages.
    """
    readers = {norm: set(lins) for norm, lins in spec.norm_inputs}
    producer_of = {consumer: producer for producer, consumer in spec.row_inputs}
    pre_quant_scales, notes = {}, []
    for names, recipe in groups:
        st = stats[names[0]]
        if st.second_moment is None or not st.is_finite():
            notes.append(f"layer {prefix}{names[0]} (+{len(names) - 1}): AWQ skipped, its calibration input has "
                         f"{st.count} tokens or non-finite values; rounded to nearest instead")
            log.warning("%s", notes[-1])
            continue
        norm, producer = _fold_target(names, weights, readers, producer_of, config.fold)
        if norm is None and producer is None and config.fold == "foldable":
            log.info("layer %s%s: not AWQ-smoothed, its smoothing would fold into no norm or producer rows "
                     "(fold='foldable')", prefix, "/".join(names))
            continue
        w = jnp.concatenate([weights[n].astype(jnp.float32) for n in names])
        dtype = weights[names[0]].dtype
        s, _ = _search(w, st.abs_mean, st.second_moment, recipe, awq_core.alpha_grid(config.alpha_step))
        pqs = (1.0 / s).astype(dtype)  # stored in the model dtype (ModelOpt); the weights use the same value
        pqs32 = pqs.astype(jnp.float32)
        for n in names:
            weights[n] = weights[n].astype(jnp.float32) / pqs32
        stats[names[0]] = st.smoothed(pqs32)
        if norm is not None:
            norms[norm] = _fold_norm(norms[norm], pqs32, spec.norm_unit_offset)
        elif producer is not None:
            weights[producer] = (weights[producer].astype(jnp.float32) * pqs32[:, None]).astype(
                weights[producer].dtype)
            if producer in biases:
                biases[producer] = (biases[producer].astype(jnp.float32) * pqs32).astype(biases[producer].dtype)
        else:
            pre_quant_scales.update({n: pqs for n in names})
    return pre_quant_scales, notes


def _fold_target(names, weights, readers, producer_of, fold: str) -> tuple[str | None, str | None]:
    """(the norm, or else the producer linear, that takes a group's smoothing under `fold`); (None, None):
    nowhere, the members keep pre_quant_scale ("foldable": the group is not smoothed)."""
    norm = next((m for m, lins in readers.items() if lins == set(names)), None)
    if fold != "none" and norm is not None:
        return norm, None
    producer = producer_of.get(names[0]) if len(names) == 1 else None
    if fold in ROW_FOLDS and producer in weights and weights[producer].shape[0] == weights[names[0]].shape[1]:
        return None, producer
    return None, None


def clip_weights(w, stats: InputStats, recipe: Recipe, config: AWQConfig):
    """awq_clip of a smoothed fused weight w [N, K] on its smoothed input statistics (INT4 groups)."""
    k = w.shape[-1]
    clipped, _ = _clip(w.astype(jnp.float32), stats.second_moment, recipe, config.clip_ratios,
                       int4_group_size(recipe, k))
    return clipped


def _fold_norm(weight, pqs, unit_offset: bool):
    """The norm weight whose output equals the old output times pqs (Gemma: (1 + w) is the scale)."""
    w = weight.astype(jnp.float32)
    folded = (1.0 + w) * pqs - 1.0 if unit_offset else w * pqs
    return folded.astype(weight.dtype)


@functools.partial(jax.jit, static_argnames=("recipe", "alphas"))
def _search(w, act_mean, sigma, recipe, alphas):
    block = _QUANT_BLOCK.get(recipe.weight_format) or int4_group_size(recipe, w.shape[-1])
    return awq_core.search_scale(w, act_mean, sigma, functools.partial(fake_quant_weight, recipe=recipe), alphas,
                                 block)


@functools.partial(jax.jit, static_argnames=("recipe", "ratios", "group_size"))
def _clip(w, sigma, recipe, ratios, group_size):
    return awq_core.search_clip(w, sigma, functools.partial(fake_quant_weight, recipe=recipe), group_size, ratios,
                                recipe.symmetric)
