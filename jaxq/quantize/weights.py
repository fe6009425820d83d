"""Round-to-nearest weight quantization per recipe, static scales from calibrated amax, and the shape
rules each recipe imposes on a layer (checked before any work, naming the layer).

Weight rule per Recipe.weight_format (all in float32, jaxq.formats; spec section in brackets):
  fp8    E4M3, scale = amax / 448 per tensor | output channel | 128 x 128 block         [2.1-2.3]
  nvfp4  E2M1 per 16, E4M3 block scale, weight_scale_2 = A / 2688 with A the max over the layer's
         fused group (q/k/v, gate/up), as ModelOpt's exporter                          [2.4, 1]
  mxfp4  E2M1 per 32, E8M0 = ceil(log2(amax / 6))                                       [2.5]
  int4   groups of G along K; *_awq recipes: ModelOpt symmetric s = amax / 7 (AutoAWQ min/max with a
         zero point when not symmetric); *_gptq recipes: GPTQ's grid (sym z = 8, or asym)  [2.6, 5.3, 5.4]
Static activation scales (dequant multipliers): FP8 input_scale = amax / 448, NVFP4 input_scale =
amax / (6 * 448); a zero amax gives 1.0 (ModelOpt exports a zero amax as the max bound). W4A8 adds
weight_scale_2 = amax(|dequant_int4(W)|) / 448, the group max over fused layers [2.7].
"""

import functools

import jax
import jax.numpy as jnp

from jaxq.formats import (E4M3_MAX, exact_divide, fake_quant_fp8_static, global_scale_from_amax, quantize_fp8,
                          quantize_int4, quantize_mxfp4, quantize_nvfp4)
from jaxq.formats.int4 import SYMMETRIC_ZERO
from jaxq.nn.qdense import dequantized_weight
from jaxq.nn.quantized_weight import QuantizedWeight, WeightArray
from jaxq.recipes import Recipe

INT4_GROUP_SIZES = (128, 64, 32)
_BLOCK = {"nvfp4": 16, "mxfp4": 32}


def int4_scheme(recipe: Recipe) -> str:
    """The jaxq.formats.quantize_int4 scheme of an INT4 recipe (its producers' rounding convention)."""
    if "gptq" in recipe.name:
        return "gptq" if recipe.symmetric else "gptq_asym"
    return "modelopt" if recipe.symmetric else "autoawq"


def is_w4a8(recipe: Recipe) -> bool:
    """INT4 weights with FP8 activations: the weight gets ModelOpt's second (FP8 per-tensor) stage."""
    return recipe.weight_format == "int4" and recipe.activation == "fp8_static"


def layer_error(name: str, shape: tuple[int, ...], recipe: Recipe) -> str | None:
    """Why `recipe` cannot quantize the linear `name` with weight shape [N, K], or None if it can."""
    if len(shape) != 2:
        return f"layer {name}: weight has shape {tuple(shape)}, expected a 2-D [N, K] linear weight"
    k = shape[1]
    fmt = recipe.weight_format
    if fmt in _BLOCK and k % _BLOCK[fmt]:
        return (f"layer {name}: recipe {recipe.name!r} ({fmt.upper()}) needs in_features K divisible by "
                f"{_BLOCK[fmt]} (its block size), got K={k}; exclude the layer or pick another recipe")
    if recipe.activation == "nvfp4" and k % 16:
        return (f"layer {name}: recipe {recipe.name!r} quantizes activations in NVFP4 blocks of 16, "
                f"got K={k}; exclude the layer or use activation='none'")
    if fmt == "int4":
        group = k if recipe.group_size == -1 else recipe.group_size
        if k % group or k % 2:
            return (f"layer {name}: recipe {recipe.name!r} quantizes INT4 in groups of {group} along K, "
                    f"got K={k}, not a multiple")
        if is_w4a8(recipe) and not recipe.symmetric:
            return f"layer {name}: recipe {recipe.name!r}: W4A8 needs symmetric INT4 (signed FP8 stage)"
    return None


def best_int4_group(ks) -> int | None:
    """The largest INT4 group size that divides every K in ks, or None."""
    return next((g for g in INT4_GROUP_SIZES if all(k % g == 0 for k in ks)), None)


def quantize_weight_array(w: jax.Array, recipe: Recipe, global_amax=None) -> WeightArray:
    """W [N, K] -> the recipe's quantized array (module docstring). global_amax: NVFP4's fused-group amax."""
    fmt = recipe.weight_format
    if fmt == "fp8":
        return quantize_fp8(w, recipe.weight_granularity,
                            block_size=recipe.group_size if recipe.weight_granularity == "block" else 128)
    if fmt == "nvfp4":
        return quantize_nvfp4(w, global_amax)
    if fmt == "mxfp4":
        return quantize_mxfp4(w)
    return quantize_int4(w, recipe.group_size, scheme=int4_scheme(recipe))


def int4_group_size(recipe: Recipe, k: int) -> int:
    """The INT4 group size along K of a layer with K inputs (group_size -1 means one group: K)."""
    return k if recipe.group_size == -1 else recipe.group_size


def int4_codes(w, scale, zero):
    """Unsigned INT4 codes u = clip(round(w / s) + z, 0, 15) of w on a given grid (s, z broadcasting to w;
    z = 8 for symmetric): every jaxq.formats.quantize_int4 scheme's code rule once its grid is known."""
    return jnp.clip(jnp.round(exact_divide(w, scale)) + zero, 0, 15)


@functools.partial(jax.jit, static_argnames="recipe")
def fake_quant_weight(w, recipe: Recipe) -> jax.Array:
    """W [N, K] quantized by `recipe` as one fused group (NVFP4 global amax and W4A8 weight_scale_2 over all
    of it) and dequantized to float32, as the layer computes with it (the search target of AWQ)."""
    if recipe.weight_format != "int4":
        global_amax = abs_max(w) if recipe.weight_format == "nvfp4" else None
        return dequantized_weight(QuantizedWeight(recipe, quantize_weight_array(w, recipe, global_amax)))
    # The grid from quantize_int4, the values without packing codes (XLA on CPU fuses the packing slowly).
    grid = quantize_weight_array(w, recipe)
    n, k = w.shape
    group = int4_group_size(recipe, k)
    # The barrier materialises the grid: fused into the division below, XLA on CPU recomputes it per element.
    scale, zero = jax.lax.optimization_barrier((grid.scale, grid.zero))
    s = jnp.repeat(scale, group, axis=-1)
    z = SYMMETRIC_ZERO if zero is None else jnp.repeat(zero.astype(jnp.float32), group, axis=-1)
    values = (int4_codes(w.astype(jnp.float32), s, z) - z) * s
    if is_w4a8(recipe):
        values = fake_quant_fp8_static(values, fp8_scale_from_amax(abs_max(values)))
    return values


def input_scale_from_amax(recipe: Recipe, amax) -> jax.Array | None:
    """The static activation scale of a recipe from the calibrated input amax (None for dynamic ones)."""
    if recipe.activation == "nvfp4":
        return global_scale_from_amax(amax)
    if recipe.activation == "fp8_static":
        return fp8_scale_from_amax(amax)
    return None


def fp8_scale_from_amax(amax) -> jax.Array:
    """amax / 448 as float32 (1.0 for a zero amax)."""
    amax = jnp.asarray(amax, jnp.float32)
    return jnp.where(amax == 0, 1.0, exact_divide(amax, E4M3_MAX))


@jax.jit
def abs_max(x) -> jax.Array:
    return jnp.max(jnp.abs(x.astype(jnp.float32)))
