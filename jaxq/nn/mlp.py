"""Gated MLP (SwiGLU / GeGLU): down_proj(act(gate_proj(x)) * up_proj(x))."""
from functools import partial
from typing import Any, Callable

import flax.linen as nn
import jax

from jaxq.nn.qdense import QDense, dense_group

# Names as Hugging Face config.json spells them (hidden_act / hidden_activation).
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True),
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation function for a config.json activation name; ValueError names the supported ones."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


class GatedMLP(nn.Module):
    """Params gate_proj, up_proj [intermediate, hidden], down_proj [hidden, intermediate] (QDense, HF names).

    x: [..., hidden] -> [..., hidden]. The activation runs in the compute dtype, as in transformers. gate and
    up run through dense_group (one launch where their quantized weights allow it).
    """

    intermediate_size: int
    activation: str
    use_bias: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = activation(self.activation)
        dense = partial(QDense, use_bias=self.use_bias, dtype=self.dtype)
        gate, up = dense_group([dense(self.intermediate_size, name="gate_proj"),
                                dense(self.intermediate_size, name="up_proj")], x)
        return dense(x.shape[-1], name="down_proj")(act(gate) * up)
