"""Token embedding table that can also serve as a tied output projection."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxq.nn.qdense import qmatmul


class Embed(nn.Module):
    """Param "weight" [num_embeddings, features] (HF `embed_tokens.weight`).

    __call__(tokens [B, T] int) -> [B, T, features] in dtype (None: the table's dtype).
    attend(x [..., features]) -> [..., num_embeddings]: x @ weight^T, the tied lm_head.
    """

    num_embeddings: int
    features: int
    dtype: Any = None

    def setup(self):
        self.weight = self.param(
            "weight", nn.initializers.normal(0.02), (self.num_embeddings, self.features), jnp.float32
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = jnp.take(self.weight, tokens, axis=0)
        return x if self.dtype is None else x.astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        return qmatmul(x, self.weight)
