"""Static-shape KV cache, stored in the compute dtype or in FP8 E4M3 with per-layer scales.

FP8 storage reproduces ModelOpt's FP8 KV fake-quant exactly (fixtures/README.md, "ModelOpt FP8 KV cache"):
with amax = scale * 448 and s = 448 / amax, a stored value is q = e4m3(clamp(x * s, -448, 448)) and it reads
back as q * (1 / s), all in float32. Keys are quantized after RoPE and before any GQA repeat (the cache holds
H_kv heads only).

Layout: heads before positions, [B, H_kv, S_max, D], so attention's two batched matmuls read each (row, head)
slice of the cache in place; a [B, S_max, H_kv, D] cache made XLA transpose every layer's whole cache twice per
step (four ~15 us copies per layer at batch 16 on Llama-3.1-8B shapes, H100).
"""
from typing import Any

import flax
import jax
import jax.numpy as jnp

from jaxq.formats.elements import E4M3_MAX, to_e4m3


def _is_fp8(dtype: Any) -> bool:
    return jnp.dtype(dtype) == jnp.dtype(jnp.float8_e4m3fn)


def _fp8_multiplier(scale: jax.Array) -> jax.Array:
    # ModelOpt's op order: amax = scale * 448, s = 448 / amax (not 1 / scale: that rounds differently).
    return E4M3_MAX / (scale.astype(jnp.float32) * E4M3_MAX)


@flax.struct.dataclass
class LayerKV:
    """One layer's view of a KVCache: k, v [B, H_kv, S_max, D] and scalar float32 k_scale, v_scale."""

    k: jax.Array
    v: jax.Array
    k_scale: jax.Array
    v_scale: jax.Array

    def write(self, k_new: jax.Array, v_new: jax.Array, positions: jax.Array) -> "LayerKV":
        """Store k_new, v_new [B, T, H_kv, D] at positions [B, T] of each row (FP8-quantized if the cache is FP8).

        Writes at positions >= S_max are dropped rather than clamped, so an overfull row cannot overwrite
        valid entries; callers keep lengths + T <= S_max.
        """
        return self.replace(
            k=_scatter(self.k, _encode(k_new, self.k.dtype, self.k_scale), positions),
            v=_scatter(self.v, _encode(v_new, self.v.dtype, self.v_scale), positions),
        )

    def read(self, dtype: Any) -> tuple[jax.Array, jax.Array]:
        """(k, v) [B, H_kv, S_max, D] in dtype, dequantized if FP8 (q * (1 / s) in float32, then cast)."""
        return _decode(self.k, self.k_scale, dtype), _decode(self.v, self.v_scale, dtype)


def _encode(x: jax.Array, dtype: Any, scale: jax.Array) -> jax.Array:
    if _is_fp8(dtype):
        return to_e4m3(x.astype(jnp.float32) * _fp8_multiplier(scale))  # saturating: clamp to +-448
    return x.astype(dtype)


def _decode(x: jax.Array, scale: jax.Array, dtype: Any) -> jax.Array:
    if _is_fp8(x.dtype):
        return (x.astype(jnp.float32) * (1.0 / _fp8_multiplier(scale))).astype(dtype)
    return x.astype(dtype)


def _scatter(cache: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    # cache [B, H_kv, S_max, D], new [B, T, H_kv, D], positions [B, T]: a per-row scatter, in place when donated.
    rows = jnp.arange(cache.shape[0])[:, None, None]
    heads = jnp.arange(cache.shape[1])[None, :, None]
    return cache.at[rows, heads, positions[:, None, :]].set(jnp.swapaxes(new, 1, 2), mode="drop")


@flax.struct.dataclass
class KVCache:
    """Per-layer key/value cache with a valid length per batch row.

    k, v: tuple over layers of [B, H_kv, S_max, D], dtype = compute dtype or float8_e4m3fn.
    k_scale, v_scale: [L] float32 FP8 dequant multipliers (ModelOpt's k_scale/v_scale = amax / 448);
      ones, and unused, when the cache is not FP8.
    lengths: [B] int32, positions [0, lengths[b]) of row b hold valid entries.
    A pytree: pass it through jit and donate it; the model returns the updated cache.
    """

    k: tuple
    v: tuple
    k_scale: jax.Array
    v_scale: jax.Array
    lengths: jax.Array

    @classmethod
    def create(
        cls,
        num_layers: int,
        batch: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: Any,
        k_scale: jax.Array | None = None,
        v_scale: jax.Array | None = None,
    ) -> "KVCache":
        """An empty cache (zeros, lengths 0). k_scale/v_scale: [L] or scalar, default ones."""
        shape = (batch, num_kv_heads, max_len, head_dim)

        def scales(value):
            value = jnp.ones((), jnp.float32) if value is None else jnp.asarray(value, jnp.float32)
            return jnp.broadcast_to(value, (num_layers,))

        return cls(
            k=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
            v=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
            k_scale=scales(k_scale),
            v_scale=scales(v_scale),
            lengths=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def positions(self, num_tokens: int) -> jax.Array:
        """[B, T] positions of the next num_tokens tokens of each row: lengths[:, None] + arange(T)."""
        return self.lengths[:, None] + jnp.arange(num_tokens, dtype=jnp.int32)[None, :]

    def layer(self, i: int) -> LayerKV:
        return LayerKV(self.k[i], self.v[i], self.k_scale[i], self.v_scale[i])

    def advance(self, layers: list[LayerKV], num_new: jax.Array) -> "KVCache":
        """The cache holding the written `layers`, with lengths += num_new ([B] int32)."""
        return self.replace(
            k=tuple(layer.k for layer in layers),
            v=tuple(layer.v for layer in layers),
            lengths=self.lengths + num_new.astype(jnp.int32),
        )

    def nbytes(self) -> int:
        """Bytes of the stored keys and values (scales and lengths excluded): FP8 halves bf16."""
        return sum(x.size * x.dtype.itemsize for x in self.k + self.v)
