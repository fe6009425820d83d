"""RMSNorm in the two conventions Hugging Face models use."""
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale over the last axis, statistics in float32; output in x.dtype.

    Param "weight" [dim]. unit_offset=False (Llama, Qwen): scale = weight, applied after casting the
    normalised x back to x.dtype, as transformers' LlamaRMSNorm does. unit_offset=True (Gemma): scale =
    1 + weight, applied in float32 before the cast, as Gemma3RMSNorm does (its weights are stored
    zero-centred).
    """

    eps: float = 1e-6
    unit_offset: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.unit_offset else nn.initializers.ones
        weight = self.param("weight", init, (x.shape[-1],), x.dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.unit_offset:
            return (normed * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
        return normed.astype(x.dtype) * weight.astype(x.dtype)
