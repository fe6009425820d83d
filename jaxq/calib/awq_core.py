"""AWQ, the maths: per-input-channel smoothing scales s that protect the weights of salient channels, and the
per-group weight clipping search.

Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han, "AWQ: Activation-aware Weight Quantization for
LLM Compression and Acceleration", MLSys 2024 (arXiv:2306.00978), section 3.2 (search s = s_X^alpha over a
grid of alpha, weight clipping); in the form of NVIDIA ModelOpt's awq_lite and awq_clip (spec/formats.md 6.3).

A linear layer y = x W^T is rewritten y = (x / s) (W diag(s))^T and W diag(s) is quantized, so channel c's
weights are scaled up by s_c before rounding and the rounding error is divided by s_c afterwards.

Every loss is measured on the layer's output over calibration tokens x, through their second moment
Sigma = E[x x^T] [K, K]: for an effective weight error D [N, K], mean over tokens and outputs of
(x D^T)^2 = tr(D Sigma D^T) / N. This is exactly ModelOpt's per-token loss summed over all calibration
tokens, at the cost of one [N, K] x [K, K] product per candidate instead of a pass over the tokens.

`fake_quant(w [N, K]) -> float32 [N, K]` is the recipe's weight quantize-dequantize (INT4 groups, NVFP4 or
MXFP4 blocks, ...), supplied by the caller, so the maths here is format-agnostic.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

FakeQuant = Callable[[jax.Array], jax.Array]
_SCALE_MIN, _SCALE_MAX = 1e-4, 1e4


def alpha_grid(step: float) -> tuple[float, ...]:
    """0, step, 2 step, ..., 1 (1 included, as awq_lite; AutoAWQ stops at 0.95)."""
    count = round(1 / step)
    if count < 1 or abs(count * step - 1) > 1e-6:
        raise ValueError(f"alpha_step={step} must divide 1 (0.1, 0.05, 0.5, 1.0, ...)")
    return tuple(i / count for i in range(count + 1))


def weight_channel_scale(w, block: int):
    """ModelOpt's w_scale [K]: |W| normalised by the absolute maximum of its quantization block (block
    elements along K; K for one block per row), then averaged over the output rows."""
    n, k = w.shape
    wb = jnp.abs(w.astype(jnp.float32)).reshape(n, k // block, block)
    normed = wb / jnp.maximum(jnp.max(wb, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    return jnp.mean(normed.reshape(n, k), axis=0)


def smoothing_scale(act_mean, w_scale, alpha):
    """s = act_mean^alpha / w_scale^(1 - alpha), clamped to [1e-4, 1e4], normalised by sqrt(max s * min s)
    so the scales straddle 1. act_mean [K]: mean |x| per input channel."""
    s = jnp.power(act_mean, alpha) / (jnp.power(w_scale, 1.0 - alpha) + 1e-4)
    s = jnp.clip(s, _SCALE_MIN, _SCALE_MAX)
    return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


def output_error(delta, sigma):
    """tr(delta Sigma delta^T) / N: the mean squared output error of a weight error delta [N, K]."""
    return jnp.sum(jnp.matmul(delta, sigma, precision=lax.Precision.HIGHEST) * delta) / delta.shape[0]


def search_scale(w, act_mean, sigma, fake_quant: FakeQuant, alphas: tuple[float, ...], block: int):
    """awq_lite's search: the s (smoothing_scale) of the alpha in `alphas` whose smoothed, quantized weight
    fake_quant(W diag(s)) diag(1/s) has the smallest output error against W.

    w [N, K] (a fused group's rows stacked), act_mean [K], sigma [K, K] = E[x x^T] of the shared input;
    block: the quantizer's block along K (for weight_channel_scale). Returns (s [K], losses [len(alphas)]);
    on a tie the smallest alpha wins.
    """
    w = w.astype(jnp.float32)
    w_scale = weight_channel_scale(w, block)

    def loss(alpha):
        s = smoothing_scale(act_mean, w_scale, alpha)
        return output_error(fake_quant(w * s) / s - w, sigma)

    losses = lax.map(loss, jnp.asarray(alphas, jnp.float32))
    best = jnp.argmin(losses)
    return smoothing_scale(act_mean, w_scale, jnp.asarray(alphas, jnp.float32)[best]), losses


def search_clip(w, sigma, fake_quant: FakeQuant, group_size: int, ratios: tuple[float, ...], symmetric: bool):
    """awq_clip: per output row and group of `group_size` columns, the clipping ratio r in `ratios` whose
    quantized group has the smallest block-local output error d Sigma_gg d^T (d = the group's weight error,
    Sigma_gg its diagonal block of sigma). Clipping limits the group to [-r amax, r amax] (symmetric
    grids) or [r min, r max] (asymmetric). fake_quant must quantize each group independently.

    w [N, K] already smoothed, sigma [K, K] of the smoothed input. Returns (the clipped w, ratio [N, K/G]).
    """
    n, k = w.shape
    g = k // group_size
    wg = w.astype(jnp.float32).reshape(n, g, group_size)
    if symmetric:
        hi = jnp.max(jnp.abs(wg), axis=-1, keepdims=True)
        lo = -hi
    else:
        lo, hi = jnp.min(wg, axis=-1, keepdims=True), jnp.max(wg, axis=-1, keepdims=True)
    blocks = sigma.reshape(g, group_size, g, group_size)[jnp.arange(g), :, jnp.arange(g), :]  # [g, G, G]

    def clipped(r):
        return jnp.clip(wg, r * lo, r * hi)

    def loss(r):
        d = fake_quant(clipped(r).reshape(n, k)).reshape(n, g, group_size) - wg
        return jnp.einsum("ngi,gij,ngj->ng", d, blocks, d, precision=lax.Precision.HIGHEST)

    ratios_arr = jnp.asarray(ratios, jnp.float32)
    best = ratios_arr[jnp.argmin(lax.map(loss, ratios_arr), axis=0)]  # [N, g]
    return clipped(best[..., None]).reshape(n, k), best
