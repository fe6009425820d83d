"""QDense: the one linear layer every model uses, and `qmatmul`, the hook quantized weights plug into.

Weights are kept in Hugging Face orientation, [N, K] = [out_features, in_features], so checkpoints load
without transposes and quantized layouts (packed along K or N, with per-group scales) keep the shapes their
producers document. A quantized layer holds a `QuantizedWeight` (jaxq/nn/quantized_weight.py) in its
"weight" param: the weight in its jaxq.formats layout with its scales, plus the activation-side scales.
"""
import math
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxq.formats import fake_quant_fp8_static
from jaxq.nn import kernel_dispatch
from jaxq.nn.activation_quant import STATIC_MODES, apply_pre_quant_scale, fake_quant_activation
from jaxq.nn.quantized_weight import QuantizedWeight


def qmatmul(x: jax.Array, weight: Any, name: str = "") -> jax.Array:
    """y = x @ W^T for x [..., K] and W [N, K], accumulated in float32, returned in x.dtype.

    weight: a plain array, or a QuantizedWeight. For the latter, a Pallas kernel registered for
    (recipe, backend, M) in jaxq.nn.kernel_dispatch runs when one is usable (GPU only by default);
    otherwise `quantized_matmul_reference`. name: the layer, for error messages.
    """
    if not isinstance(weight, QuantizedWeight):
        return _dense_matmul(x, weight.astype(x.dtype))
    check_quantized_weight(x, weight, name)
    x2 = x.reshape(-1, x.shape[-1])
    kernel = kernel_dispatch.select_kernel(x2, weight)
    if kernel is not None:
        return kernel.fn(x2, weight).reshape(*x.shape[:-1], weight.shape[0])
    return quantized_matmul_reference(x, weight)


def qmatmul_group(x: jax.Array, weights: Sequence[Any], names: Sequence[str]) -> list[jax.Array]:
    """[qmatmul(x, w, name) for each weight], as one launch where kernel_dispatch.select_group finds one for
    these weights (they share x: q, k, v; gate, up), else as separate calls. Same results either way up to the
    summation order of the grouped kernel's K split."""
    x2 = x.reshape(-1, x.shape[-1])
    group = kernel_dispatch.select_group(x2, list(weights))
    if group is None:
        return [qmatmul(x, w, name) for w, name in zip(weights, names)]
    for w, name in zip(weights, names):
        check_quantized_weight(x, w, name)
    y = group(x2, list(weights))
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + w.shape[0])
    return [y[:, a:b].reshape(*x.shape[:-1], b - a) for a, b in zip(bounds, bounds[1:])]


def dense_group(layers: Sequence["QDense"], x: jax.Array) -> list[jax.Array]:
    """[layer(x) for layer in layers] for QDense layers of one parent module that read the same x and share
    dtype (attention's q, k, v; the MLP's gate, up), computed by qmatmul_group: one launch where the weights
    allow it. Each layer keeps its own params and names; biases are added per layer."""
    parts = [layer(x, weight_only=True) for layer in layers]
    ys = qmatmul_group(parts[0][0], [weight for _, weight, _ in parts],
                       [module_name(layer.scope.path) for layer in layers])
    return [y if bias is None else y + bias.astype(y.dtype) for y, (_, _, bias) in zip(ys, parts)]


def _dense_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., K] @ w[N, K]^T accumulated in float32, in x.dtype.

    One row on XLA CPU (batch-1 decode) is computed as two: XLA CPU's single-row dot with a float32 result
    is 10-15x slower than the same dot with two rows (measured with jax 0.10.2: 49152 x 576 bf16 34.6 ms
    vs 2.3 ms, 14336 x 4096 72.6 ms vs 5.7 ms; float32 operands alike). The padding row is zeros and is
    dropped; the row's result is that of a two-row matmul."""
    rows = math.prod(x.shape[:-1])
    lhs = x.reshape(rows, x.shape[-1])
    if rows == 1 and jax.default_backend() == "cpu":
        lhs = jnp.pad(lhs, ((0, 1), (0, 0)))
    y = lax.dot_general(lhs, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)[:rows]
    return y.reshape(*x.shape[:-1], w.shape[0]).astype(x.dtype)


def quantized_matmul_reference(x: jax.Array, weight: QuantizedWeight) -> jax.Array:
    """The producers' fake-quant numerics, all in float32, then one rounding to x.dtype:

        x1    = f32(x) * f32(pre_quant_scale)                     (AWQ smoothing, when present)
        x_hat = fake_quant_activation(x1, recipe.activation, input_scale)   (jaxq.nn.activation_quant)
        W     = weight.dequantize(f32), then for W4A8 (weight_scale_2 set) ModelOpt's second stage
                W = fake_quant_fp8_static(W, weight_scale_2)
        y     = x_hat @ W^T  (float32, full precision), cast to x.dtype

    Per recipe (spec/formats.md section 2; the fixtures README's "Numerics a loader must reproduce"):
      fp8          x: static FP8 (ModelOpt op order) ; W = f32(e4m3) * weight_scale
      fp8_rowwise  x: FP8 per token, llm-compressor  ; W = f32(e4m3) * weight_scale[n]
      fp8_block    x: FP8 1x128 groups (DeepSeek)    ; W = f32(e4m3) * weight_scale[n // 128, k // 128]
      nvfp4        x: NVFP4 16-blocks (ModelOpt), or none (weight-only) ; W = e2m1 * f32(e4m3 block) * ws2
      mxfp4        x: none, or static FP8            ; W = e2m1 * 2**(e8m0 - 127)
      w4a16_*      x: none                           ; W = (u - zero) * scale[n, g(k)]
      w4a8_*       x: static FP8                     ; W = fake_quant_fp8_static(int4 W, weight_scale_2)
    Exactly reproducible in NumPy: every step is elementwise float32 except the matmul (summation order).
    """
    x_hat = fake_quant_activation(apply_pre_quant_scale(x, weight.pre_quant_scale), weight.recipe.activation,
                                  weight.input_scale)
    y = lax.dot_general(x_hat, dequantized_weight(weight), (((x.ndim - 1,), (1,)), ((), ())),
                        precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def dequantized_weight(weight: QuantizedWeight) -> jax.Array:
    """W [N, K] float32 as the reference matmul uses it (including W4A8's FP8 stage)."""
    w = weight.weight.dequantize(jnp.float32)
    if weight.weight_scale_2 is not None:
        w = fake_quant_fp8_static(w, weight.weight_scale_2)
    return w


def check_quantized_weight(x: jax.Array, weight: QuantizedWeight, name: str = "") -> None:
    """ValueError naming the layer when x does not fit the weight or a static recipe lacks its input_scale."""
    where = f"layer {name}: " if name else ""
    k = weight.shape[-1]
    if x.shape[-1] != k:
        raise ValueError(f"{where}input has K={x.shape[-1]} features, but the {weight.recipe.name} weight "
                         f"{type(weight.weight).__name__} {tuple(weight.shape)} expects K={k}")
    if weight.recipe.activation in STATIC_MODES and weight.input_scale is None:
        raise ValueError(f"{where}recipe {weight.recipe.name!r} quantizes activations with a static scale "
                         f"({weight.recipe.activation}) but input_scale is None; calibrate it "
                         "(jaxq.quantize(..., calib_data=...)) or load it from the checkpoint")
    if weight.pre_quant_scale is not None and weight.pre_quant_scale.shape != (k,):
        raise ValueError(f"{where}pre_quant_scale has shape {tuple(weight.pre_quant_scale.shape)}, "
                         f"expected ({k},)")
    if weight.kernel_rows is not None:                  # one [K/G, N] row array per scale-like tensor
        want = tuple(reversed(weight.weight.scale.shape))
        got = [tuple(r.shape) for r in weight.kernel_rows]
        if any(g != want for g in got):
            raise ValueError(f"{where}kernel_rows have shapes {got}, expected {want} each (rebuild them with "
                             "jaxq.nn.kernel_dispatch.with_kernel_rows from this weight)")


def module_name(path: tuple[str, ...]) -> str:
    """Flax module path -> dotted HF module name: ("model", "layers_0", "mlp", "up_proj") ->
    "model.layers.0.mlp.up_proj" (the inverse of models.hf_interop.hf_path)."""
    return ".".join(re.sub(r"_(\d+)$", r".\1", part) for part in path)


class QDense(nn.Module):
    """Linear layer y = x @ W^T (+ b) with params "weight" [features, K] and, if use_bias, "bias" [features].

    dtype: compute dtype (x is cast to it); None keeps x.dtype. The "weight" param is a plain array or a
    QuantizedWeight (anything `qmatmul` understands), so this module never reads its shape: `features`
    gives the output size. The bias stays in the model dtype and is added after the matmul.
    """

    features: int
    use_bias: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, weight_only: bool = False):
        """y [..., features] = x @ W^T (+ bias). weight_only: declare the params and return (x in the compute
        dtype, weight, bias or None) instead, for dense_group to run several layers' matmuls together."""
        if self.dtype is not None:
            x = x.astype(self.dtype)
        weight = self.get_variable("params", "weight")
        if not isinstance(weight, QuantizedWeight):  # flax's shape check compares only a pytree's first leaf
            weight = self.param("weight", nn.initializers.normal(0.02), (self.features, x.shape[-1]), x.dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), x.dtype) if self.use_bias else None
        if weight_only:
            return x, weight, bias
        y = qmatmul(x, weight, module_name(self.scope.path))
        return y if bias is None else y + bias.astype(y.dtype)
