"""Rotary position embeddings with the rope_type variants of transformers' ROPE_INIT_FUNCTIONS.

Inverse frequencies are float32 and computed with the same float32 operations transformers uses, because
the fixtures' reference logits were produced that way (a bf16-rounded inv_freq moves logits by ~1e-4).
Rotation is the "rotate half" convention of HF Llama/Gemma checkpoints (first half / second half of the head).
"""
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """One RoPE parameterisation, field names as in HF `rope_parameters` / `rope_scaling`.

    original_max_position_embeddings defaults to the model's max_position_embeddings for llama3 and yarn,
    as transformers' standardize_rope_params does; factor is required for every type but "default".
    """

    rope_type: str = "default"
    rope_theta: float = 10000.0
    factor: float | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    @classmethod
    def from_hf(cls, params: dict[str, Any] | None, rope_theta: float, max_position_embeddings: int):
        """Build from an HF rope dict (v5 `rope_parameters` or v4 `rope_scaling`; "type" is the v4 key).

        rope_theta is used when the dict has none. Unknown rope types and partial rotary factors raise.
        """
        params = dict(params or {})
        rope_type = params.pop("rope_type", params.pop("type", "default"))
        if rope_type not in _TYPES:
            raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {list(_TYPES)}")
        if params.pop("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported by the jaxq RoPE")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in params.items() if k in fields and v is not None}
        kwargs.setdefault("rope_theta", rope_theta)
        if rope_type in ("llama3", "yarn"):
            kwargs.setdefault("original_max_position_embeddings", max_position_embeddings)
        if rope_type != "default" and rope_type != "yarn" and "factor" not in kwargs:
            raise ValueError(f"rope_type {rope_type!r} needs a 'factor' in rope_parameters/rope_scaling")
        return cls(rope_type=rope_type, **kwargs)


def _default_inv_freq(base: float, dim: int) -> np.ndarray:
    # float32 like torch: base ** (arange(0, dim, 2).float() / dim), then 1 / that.
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float32(1.0) / np.power(np.float32(base), exponent)).astype(np.float32)


def _llama3(rope: RopeConfig, dim: int) -> np.ndarray:
    inv_freq = _default_inv_freq(rope.rope_theta, dim)
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(rope.factor), inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / np.float32(rope.factor) + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(rope: RopeConfig, dim: int, max_position_embeddings: int) -> tuple[np.ndarray, float]:
    base, original = rope.rope_theta, rope.original_max_position_embeddings
    factor = rope.factor if rope.factor is not None else max_position_embeddings / original

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = rope.attention_factor
    if attention is None:
        if rope.mscale and rope.mscale_all_dim:
            attention = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
        else:
            attention = mscale(factor)

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast or 32), correction_dim(rope.beta_slow or 1)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoids a zero-width ramp, as transformers does
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    pos_freqs = np.power(np.float32(base), np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    extrapolation = np.float32(1.0) / pos_freqs
    interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    keep = np.float32(1.0) - ramp
    return (interpolation * (1 - keep) + extrapolation * keep).astype(np.float32), float(attention)


def inv_frequencies(
    rope: RopeConfig, head_dim: int, max_position_embeddings: int, seq_len: jax.Array | None = None
) -> tuple[jax.Array, float]:
    """(inv_freq float32 [head_dim // 2], attention_scaling) for one RoPE parameterisation.

    seq_len (traced int scalar) only matters for "dynamic" NTK scaling, which transformers recomputes from
    max(position_ids) + 1 once the sequence outgrows max_position_embeddings. Unlike transformers' stateful
    module, this is a pure function of seq_len: keys already in a KV cache keep the frequencies they were
    written with.
    attention_scaling multiplies cos and sin (yarn); it is 1.0 for the other types.
    """
    kind, dim = rope.rope_type, head_dim
    if kind == "default":
        return jnp.asarray(_default_inv_freq(rope.rope_theta, dim)), 1.0
    if kind == "linear":
        return jnp.asarray(_default_inv_freq(rope.rope_theta, dim) / np.float32(rope.factor)), 1.0
    if kind == "llama3":
        return jnp.asarray(_llama3(rope, dim)), 1.0
    if kind == "yarn":
        inv_freq, attention = _yarn(rope, dim, max_position_embeddings)
        return jnp.asarray(inv_freq), attention
    # dynamic: past max_position_embeddings the base grows with the current length (traced, so jit-safe);
    # within it transformers keeps the default frequencies, so select those exactly.
    default = jnp.asarray(_default_inv_freq(rope.rope_theta, dim))
    if seq_len is None:
        return default, 1.0
    length = jnp.asarray(seq_len).astype(jnp.float32)
    growth = rope.factor * length / max_position_embeddings - (rope.factor - 1)
    base = rope.rope_theta * jnp.maximum(growth, 1.0) ** (dim / (dim - 2))
    grown = 1.0 / (base ** (jnp.arange(0, dim, 2).astype(jnp.float32) / dim))
    return jnp.where(seq_len > max_position_embeddings, grown, default), 1.0


def rope_tables(
    positions: jax.Array, inv_freq: jax.Array, attention_scaling: float, dtype: Any
) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, D] for positions [B, T]: angles pos * inv_freq in float32, cast to dtype as HF does."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, D]
    return (jnp.cos(angles) * attention_scaling).astype(dtype), (jnp.sin(angles) * attention_scaling).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, H, D] rotated by cos/sin [B, T, D]: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
