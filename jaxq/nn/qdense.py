"""QDense: the one linear layer every model uses, and `qmatmul`, the hook quantized weights plug into.

Weights are kept in Hugging Face orientation, [N, K] = [out_features, in_features], so checkpoints load
without transposes and quantized layouts (packed along K or N, with per-group scales) keep the shapes their
producers document.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def qmatmul(x: jax.Array, weight: Any) -> jax.Array:
    """y = x @ weight^T, accumulated in float32, returned in x.dtype.

    x: [..., K]. weight: a plain [N, K] array today. This function is THE extension point for quantized
    weights: the quantization issue makes it accept the quantized-array pytrees of jaxq.formats (and pick a
    kernel or the reference path); callers must not look inside `weight` themselves.
    """
    w = weight.astype(x.dtype)
    y = lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


class QDense(nn.Module):
    """Linear layer y = x @ W^T (+ b) with params "weight" [features, K] and, if use_bias, "bias" [features].

    dtype: compute dtype (x is cast to it); None keeps x.dtype. The "weight" param may be any pytree that
    `qmatmul` understands, so this module never reads its shape: `features` gives the output size.
    """

    features: int
    use_bias: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.dtype is not None:
            x = x.astype(self.dtype)
        weight = self.param("weight", nn.initializers.normal(0.02), (self.features, x.shape[-1]), x.dtype)
        y = qmatmul(x, weight)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), x.dtype)
            y = y + bias.astype(y.dtype)
        return y
