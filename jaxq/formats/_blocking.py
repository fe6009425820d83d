"""Reshaping helpers shared by the block-scaled formats (blocks along the last axis, per-matrix scales)."""

import jax.numpy as jnp


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def to_blocks(x, size: int):
    """[..., K] -> [..., K // size, size] (K must be a multiple of size)."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // size, size)


def from_blocks(xb):
    """[..., nb, size] -> [..., nb * size]."""
    return xb.reshape(*xb.shape[:-2], xb.shape[-2] * xb.shape[-1])


def pad_to_multiple(x, axis: int, multiple: int):
    """Zero-pad `axis` up to a multiple of `multiple` (partial edge blocks become full blocks of zeros)."""
    pad = ceil_div(x.shape[axis], multiple) * multiple - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def matrix_axes(x) -> tuple:
    """The trailing [N, K] axes (or the one axis of a 1-D array): what a per-tensor scale reduces over.

    Leading axes are batch axes (e.g. experts of a stacked MoE weight), each with its own scale.
    """
    return tuple(range(max(x.ndim - 2, 0), x.ndim))


def expand_trailing(s, ndim: int):
    """Append singleton axes to s until it has ndim axes, so s[...] broadcasts over trailing axes."""
    return s.reshape(s.shape + (1,) * (ndim - s.ndim))
