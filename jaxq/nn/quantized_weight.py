"""QuantizedWeight: what a quantized QDense holds in its "weight" param.

One pytree for every recipe: the weight in its jaxq.formats layout plus the activation-side tensors
the recipe needs. Quantizers (jaxq.quantize), checkpoint loaders (jaxq.io) and exporters all produce
or consume exactly this, and `jaxq.nn.qdense.qmatmul` computes with it.
"""

import dataclasses

import jax
from flax import struct

from jaxq.formats import FP8Tensor, Int4Tensor, MXFP4Tensor, NVFP4Tensor
from jaxq.recipes import Recipe

WeightArray = FP8Tensor | NVFP4Tensor | MXFP4Tensor | Int4Tensor


@struct.dataclass
class QuantizedWeight:
    """A linear layer's weight W [N, K] (HF orientation) quantized by `recipe`.

    The layer computes, in float32 (per recipe numerics in jaxq.nn.qdense):
        x1 = x * pre_quant_scale                     (AWQ smoothing; skipped when None)
        xq = activation_fake_quant(x1)               (recipe.activation; static ones use input_scale)
        Wq = weight.dequantize()                     (then, for W4A8, the FP8 stage with weight_scale_2)
        y  = xq @ Wq^T

    Fields:
      recipe:          static; names the numerics (weight format, activation mode, ...).
      weight:          FP8Tensor | NVFP4Tensor | MXFP4Tensor | Int4Tensor, shape [N, K].
      input_scale:     f32 [] static activation scale (dequant multiplier, amax/448 for FP8 and
                       W4A8, amax/(6*448) for NVFP4), None for dynamic or weight-only recipes.
      pre_quant_scale: [K] in the model dtype, multiplies the input (ModelOpt AWQ layers whose
                       smoothing could not be folded into a norm), None otherwise.
      weight_scale_2:  f32 [], W4A8 only: the per-tensor FP8 stage applied to the dequantized INT4
                       (or FP4) weight, W_fp8 = e4m3(W / weight_scale_2) * weight_scale_2.
      kernel_rows:     None, or the scales in the layout a GPU kernel reads, derived from weight and
                       input_scale once rather than per call (jaxq.nn.kernel_dispatch.with_kernel_rows; not
                       saved or exported). `replace` drops them when weight or input_scale changes.
    """

    recipe: Recipe = struct.field(pytree_node=False)
    weight: WeightArray
    input_scale: jax.Array | None = None
    pre_quant_scale: jax.Array | None = None
    weight_scale_2: jax.Array | None = None
    kernel_rows: tuple | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.weight.shape


def _replace(self: QuantizedWeight, **changes) -> QuantizedWeight:
    """dataclasses.replace, with kernel_rows dropped when what they derive from (weight, input_scale)
    changes and they are not replaced too (flax.struct sets `replace` after the class body, hence here)."""
    if "kernel_rows" not in changes and changes.keys() & {"weight", "input_scale"}:
        changes["kernel_rows"] = None
    return dataclasses.replace(self, **changes)


QuantizedWeight.replace = _replace
