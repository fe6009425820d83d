"""FP8 checkpoint scales (spec 2.1-2.3, 5.1, 5.6): every producer's scale shape <-> FP8Tensor.

| producer           | per tensor | per channel | 128 x 128 blocks                               |
| ModelOpt           | F32 []     | F32 [N]     | `weight_scale` F32 [N/128, 1, K/128, 1]         |
| DeepSeek-V3        |            |             | `weight_scale_inv` F32 [ceil(N/128), ceil(K/128)] |
| compressed-tensors | [1]        | [N, 1] bf16 | [N/128, K/128]                                  |
All of them are dequant multipliers (amax / 448), whatever the name.
"""

import jax.numpy as jnp

from jaxq.formats import _checks
from jaxq.formats._blocking import ceil_div
from jaxq.formats.fp8 import FP8Tensor

PRODUCERS = ("modelopt", "deepseek", "compressed_tensors")


def fp8_from_checkpoint(weight, scale, *, block_size: int = 128) -> FP8Tensor:
    """`weight` F8_E4M3 [..., N, K] and its scale in any producer's shape (table above) -> FP8Tensor.

    The granularity follows from the scale's shape; the scale is upcast to float32 (exact).
    """
    fn = "fp8_from_checkpoint"
    _checks.check_dtype(fn, "weight", weight, jnp.float8_e4m3fn)
    _checks.check_rank(fn, "weight", weight, 2)
    scale = jnp.asarray(scale)
    _checks.check_floating(fn, "scale", scale)
    batch, (n, k) = tuple(weight.shape[:-2]), weight.shape[-2:]
    blocks = (*batch, ceil_div(n, block_size), ceil_div(k, block_size))
    shapes = {
        "tensor": [batch, (*batch, 1)] if batch else [(), (1,)],
        "channel": [(*batch, n), (*batch, n, 1)],
        "block": [blocks, (*batch, blocks[-2], 1, blocks[-1], 1)],
    }
    for granularity, accepted in shapes.items():
        if tuple(scale.shape) in accepted:
            target = {"tensor": batch, "channel": (*batch, n), "block": blocks}[granularity]
            return FP8Tensor(data=weight, scale=scale.reshape(target).astype(jnp.float32),
                             granularity=granularity, block_size=block_size)
    expected = ", ".join(f"{g} {s}" for g, ss in shapes.items() for s in ss)
    raise ValueError(f"{fn}: scale has shape {tuple(scale.shape)} for weight {tuple(weight.shape)}, expected one "
                     f"of: {expected}")


def fp8_checkpoint_scale(t: FP8Tensor, producer: str):
    """t.scale in `producer`'s on-disk shape (table above); DeepSeek stores only 128 x 128 blocks."""
    fn = "fp8_checkpoint_scale"
    _checks.check_choice(fn, "producer", producer, PRODUCERS)
    _checks.check_choice(fn, "t.granularity", t.granularity, ("tensor", "channel", "block"))
    s = t.scale
    if producer == "deepseek":
        _checks.check_choice(fn, "t.granularity (DeepSeek)", t.granularity, ("block",))
        return s
    if producer == "modelopt":
        return s[..., :, None, :, None] if t.granularity == "block" else s
    if t.granularity == "tensor":
        return s[..., None]
    return s[..., None] if t.granularity == "channel" else s
