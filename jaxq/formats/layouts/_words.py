"""Eight 4-bit codes per int32 word (AutoAWQ, GPTQ, compressed-tensors), exact for every bit pattern.

Words are handled as uint32 (bitcast, never an arithmetic conversion), so a word whose top nibble is
>= 8 (a negative int32) packs and unpacks exactly.
"""

import functools

import jax
import jax.numpy as jnp

from jaxq.formats import _checks
from jaxq.formats.int4 import SYMMETRIC_ZERO

SEQUENTIAL = (0, 1, 2, 3, 4, 5, 6, 7)


@functools.partial(jax.jit, static_argnames=("axis", "order"))
def pack_int32_nibbles(codes, axis: int, order: tuple = SEQUENTIAL):
    """uint8 codes (0..15), length along `axis` a multiple of 8 -> int32 words, 1/8 as long.

    Nibble slot i (bits 4i..4i+3) of word c holds element 8c + order[i].
    """
    c = jnp.moveaxis(codes.astype(jnp.uint32), axis, -1)
    c = c.reshape(*c.shape[:-1], -1, 8)[..., list(order)]
    word = functools.reduce(jnp.bitwise_or, [(c[..., i] & 0xF) << (4 * i) for i in range(8)])
    return jnp.moveaxis(jax.lax.bitcast_convert_type(word, jnp.int32), -1, axis)


@functools.partial(jax.jit, static_argnames=("axis", "order"))
def unpack_int32_nibbles(words, axis: int, order: tuple = SEQUENTIAL):
    """Inverse of pack_int32_nibbles: int32 words -> uint8 codes, 8x as long along `axis`."""
    w = jnp.moveaxis(jax.lax.bitcast_convert_type(words, jnp.uint32), axis, -1)
    slots = jnp.stack([(w >> (4 * i)) & 0xF for i in range(8)], axis=-1)
    slot_of = [order.index(j) for j in range(8)]  # element j sits in slot order.index(j)
    codes = slots[..., slot_of].astype(jnp.uint8)
    return jnp.moveaxis(codes.reshape(*w.shape[:-1], 8 * w.shape[-1]), -1, axis)


def zero_codes(fn: str, t, lo: int = 0, hi: int = 15):
    """t's zero points as uint8 codes for a 4-bit field: 8 everywhere for a symmetric t (zero None), else
    t.zero, which must hold integers in [lo, hi] (checked when concrete)."""
    if t.zero is None:
        return jnp.full(t.scale.shape, SYMMETRIC_ZERO, jnp.uint8)
    if not jnp.issubdtype(t.zero.dtype, jnp.integer):
        raise ValueError(f"{fn}: t.zero has dtype {t.zero.dtype}, expected integer zero points to pack")
    _checks.check_range(fn, "t.zero", t.zero, lo, hi)
    return t.zero.astype(jnp.uint8)
