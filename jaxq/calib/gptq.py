"""GPTQ in jaxq.quantize: a fused group's INT4 weights from the Hessian of its calibrated input
(jaxq.calib.gptq_core has the maths), with damping raised until the Cholesky factorisation exists and a
round-to-nearest fallback, named in a warning, when the calibration statistics are unusable.
"""

from __future__ import annotations

import dataclasses
import logging

import jax.numpy as jnp

from jaxq.calib import gptq_core
from jaxq.calib.sequential import InputStats
from jaxq.formats.elements import pack_nibbles
from jaxq.formats.int4 import Int4Tensor
from jaxq.quantize.weights import int4_scheme
from jaxq.recipes import Recipe

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GPTQConfig:
    """GPTQ knobs (defaults tuned on SmolLM2-135M, benchmarks/ptq_ppl.py).

    damp_percent: damping lambda = damp_percent * mean(diag H) added to diag H (the reference's 0.01); when
      H + lambda I is not numerically positive definite, it doubles (up to max_damp) and a warning names the
      layer and the value used.
    block_size: columns per lazy-batch block (128 as the paper; a multiple of the group size is used).
    order: column order of recipes without act_order: "static" (descending diag H, groups and their scales
      fixed up front from the original weights: llm-compressor's actorder="static", no g_idx) or "natural"
      (AutoGPTQ desc_act=False). Recipe.act_order=True always uses "group" (act-order with g_idx).
    """

    damp_percent: float = 0.01
    block_size: int = 128
    order: str = "static"
    max_damp: float = 1.0

    def __post_init__(self):
        if self.order not in ("static", "natural"):
            raise ValueError(f"GPTQConfig.order={self.order!r}, expected 'static' or 'natural' (act-order with "
                             "g_idx is Recipe.act_order=True)")
        if not 0 < self.damp_percent <= self.max_damp:
            raise ValueError(f"GPTQConfig: damp_percent={self.damp_percent} must be in (0, max_damp={self.max_damp}]")


def gptq_quantize(name: str, w, stats: InputStats, recipe: Recipe, config: GPTQConfig) -> tuple[Int4Tensor, list[str]]:
    """INT4 weights of w [N, K] (a fused group's rows stacked) by GPTQ on stats.second_moment.

    name: the group's layers, for messages. Returns (Int4Tensor [N, K], notes): notes name a raised damping.
    ValueError (naming the layer) when the statistics are empty or not finite; the caller falls back.
    """
    if recipe.weight_format != "int4":
        raise ValueError(f"layer {name}: GPTQ is implemented for INT4 recipes, got {recipe.name!r} "
                         f"({recipe.weight_format})")
    if stats.second_moment is None or not stats.is_finite():
        raise ValueError(f"layer {name}: GPTQ needs finite input statistics, got {stats.count} tokens with "
                         "non-finite or missing values")
    k = w.shape[-1]
    group = k if recipe.group_size == -1 else recipe.group_size
    order = "group" if recipe.act_order else config.order
    h, w = gptq_core.prepare_hessian(stats.second_moment, jnp.asarray(w, jnp.float32))
    perm = gptq_core.processing_order(h, order)
    hp = h[perm][:, perm]
    damp, notes = config.damp_percent, []
    u = gptq_core.inverse_cholesky(hp, damp)
    while not bool(jnp.all(jnp.isfinite(u))):
        if damp * 2 > config.max_damp:
            raise ValueError(f"layer {name}: the Hessian is not positive definite even with damping {damp:g} "
                             f"(max_damp {config.max_damp:g})")
        damp *= 2
        u = gptq_core.inverse_cholesky(hp, damp)
    if damp != config.damp_percent:
        notes.append(f"layer {name}: GPTQ damping raised from {config.damp_percent:g} to {damp:g} (the Hessian "
                     "was not numerically positive definite)")
        log.warning("%s", notes[-1])
    res = gptq_core.gptq(w, h, u, perm, group_size=group, scheme=int4_scheme(recipe), order=order,
                         block_size=config.block_size)
    zero = None if res.zero is None else res.zero.astype(jnp.uint8)
    return Int4Tensor(packed=pack_nibbles(res.codes), scale=res.scale, group_size=group, zero=zero,
                      g_idx=res.g_idx), notes
