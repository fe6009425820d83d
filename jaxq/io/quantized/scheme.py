"""What every quantized-checkpoint format shares.

A `Scheme` is one detected format (detect.py picks it from the JSON configs). For each linear layer of the
model it says which jaxq recipe the checkpoint holds (`recipe_for`, None = left in the model dtype), which
sibling tensors `<module>.<role>` hold it (`tensor_specs`: dtypes, shapes, a rule over the values) and how
they become the QuantizedWeight a QDense computes with (`build`, through jaxq.formats.layouts). `jaxq check`
validates a checkpoint against the specs without reading any weight data; the loader builds from them.
"""

from __future__ import annotations

import abc
import dataclasses
import fnmatch
from typing import Callable, Mapping

import jax
import numpy as np

from jaxq.formats import fp8_from_checkpoint
from jaxq.formats._blocking import ceil_div
from jaxq.nn.quantized_weight import QuantizedWeight
from jaxq.recipes import Recipe, get_recipe

FLOAT_DTYPES = ("F32", "BF16", "F16")
# jaxq keeps fused projections split; exclusion lists written against a fused model name the fused module.
FUSED_NAMES = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
               "up_proj": "gate_up_proj"}

ValueRule = Callable[[np.ndarray], "str | None"]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor `<module>.<role>` of a quantized linear.

    dtypes: accepted safetensors dtype names. shapes: accepted shapes (one layout may have several spellings,
    such as [] and [1]). why: the layout rule behind the shape, for messages. values: None, or a rule over the
    values returning a problem description (scales: finite and non-zero). required: False for tensors a layout
    may omit (ModelOpt's pre_quant_scale, GPTQ's g_idx).
    """

    dtypes: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    why: str = ""
    values: ValueRule | None = None
    required: bool = True


def finite_nonzero(x: np.ndarray) -> str | None:
    """Scales multiply the weights or activations: NaN/Inf poison the layer and 0 erases what it scales."""
    f = x.astype(np.float32)
    bad = [f"{n} {what}" for n, what in ((int(np.count_nonzero(~np.isfinite(f))), "NaN/Inf"),
                                         (int(np.count_nonzero(f == 0)), "zero")) if n]
    return f"has {' and '.join(bad)} value(s) of {x.size}; scales must be finite and non-zero" if bad else None


def e8m0_finite(x: np.ndarray) -> str | None:
    """E8M0 scale bytes: 255 encodes NaN (every other byte is a finite non-zero power of two)."""
    n = int(np.count_nonzero(x == 255))
    return f"has {n} NaN byte(s) (255) of {x.size}; E8M0 scales must be finite" if n else None


def equal_to(expected: tuple[int, ...]) -> ValueRule:
    """A rule for metadata tensors such as compressed-tensors' weight_shape."""
    def rule(x):
        got = tuple(int(v) for v in np.asarray(x).reshape(-1))
        return None if got == tuple(expected) else f"holds {list(got)}, expected {list(expected)}"
    return rule


def indices_below(n: int) -> ValueRule:
    """A rule for group indices (GPTQ g_idx): every entry in [0, n)."""
    def rule(x):
        bad = int(np.count_nonzero((x < 0) | (x >= n)))
        return f"has {bad} group index(es) outside [0, {n})" if bad else None
    return rule


def module_matches(module: str, pattern: str) -> bool:
    """fnmatch of a module name (or its fused name: q_proj -> qkv_proj, gate_proj -> gate_up_proj) against an
    exclusion pattern; a pattern also covers the submodules of what it names ("model.layers.*.self_attn")."""
    head, _, leaf = module.rpartition(".")
    names = [module] + ([f"{head}.{FUSED_NAMES[leaf]}" if head else FUSED_NAMES[leaf]] if leaf in FUSED_NAMES else [])
    return any(fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n, pattern + ".*") for n in names)


class Scheme(abc.ABC):
    """One checkpoint format, detected from its JSON configs.

    description: names the format and where it was declared, for messages ("ModelOpt W4A16_AWQ
      (hf_quant_config.json)"). kv_cache: the config declares an FP8 KV cache, so every layer must carry
      k/v scales. exclusions: the config's patterns of modules left unquantized. entries_field: the config
      field that lists modules (exclusions, or ModelOpt's quantized_layers), for messages.
    """

    description: str = ""
    kv_cache: bool = False
    exclusions: tuple[str, ...] = ()
    entries_field: str = ""

    @abc.abstractmethod
    def recipe_for(self, module: str, roles: frozenset[str]) -> Recipe | None:
        """The recipe of the linear `module` (checkpoint name), None when the checkpoint leaves it unquantized.
        roles: the suffixes of the tensors the checkpoint holds for it (formats marked by presence use them)."""

    @abc.abstractmethod
    def tensor_specs(self, recipe: Recipe, n: int, k: int) -> dict[str, TensorSpec]:
        """{role: TensorSpec} of a linear with weight [N, K] under recipe (bias excluded: it loads as is).
        Raises ValueError when [N, K] cannot be stored this way (e.g. K not a multiple of the group size)."""

    @abc.abstractmethod
    def build(self, recipe: Recipe, tensors: Mapping[str, jax.Array], dtype) -> QuantizedWeight:
        """The QuantizedWeight from the present roles' tensors (validated against tensor_specs first).
        dtype: the model dtype (pre_quant_scale is stored in it)."""

    def matches(self, module: str, entry: str) -> bool:
        """Whether exclusion `entry` covers `module` (fnmatch semantics unless a format says otherwise)."""
        return module_matches(module, entry)

    def module_entries(self) -> tuple[str, ...]:
        """The config's module-name entries; `jaxq check` reports each one that matches no module."""
        return self.exclusions

    def excluded_by(self, module: str) -> str | None:
        """The first exclusion entry that covers module, or None."""
        return next((e for e in self.exclusions if self.matches(module, e)), None)


def int4_recipe(name: str, group_size, field: str, **overrides) -> Recipe:
    """An INT4 recipe with the checkpoint's group size; -1 (one group spanning K, GPTQ's per-channel) is
    channel granularity. ValueError names the config field when jaxq has no such group size."""
    granularity = "channel" if group_size == -1 else "group"
    try:
        return get_recipe(name, group_size=group_size, weight_granularity=granularity, **overrides)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{field} is {group_size!r}: {e}") from None


def blocks(n: int, k: int, b: int) -> tuple[int, int]:
    """Scale-grid shape of an [N, K] weight in b x b blocks (partial edge blocks count)."""
    return ceil_div(n, b), ceil_div(k, b)


def fp8_weight_specs(recipe: Recipe, n: int, k: int, scale_role: str, *, modelopt_block: bool = False,
                     scale_dtypes=FLOAT_DTYPES) -> dict[str, TensorSpec]:
    """`weight` F8_E4M3 [N, K] and its scale (`scale_role`) in the shapes fp8_from_checkpoint accepts for the
    recipe's granularity: per tensor [] / [1], per channel [N] / [N, 1], blocks [N/b, K/b] (ModelOpt 4-D
    [N/b, 1, K/b, 1] when modelopt_block)."""
    b = recipe.group_size
    if recipe.weight_granularity == "tensor":
        shapes, why = ((), (1,)), "one scale per tensor"
    elif recipe.weight_granularity == "channel":
        shapes, why = ((n,), (n, 1)), "one scale per output channel"
    else:
        nb, kb = blocks(n, k, b)
        shapes, why = ((nb, 1, kb, 1),) if modelopt_block else ((nb, kb),), f"one scale per {b}x{b} block"
    return {"weight": TensorSpec(("F8_E4M3",), ((n, k),), "[N, K]"),
            scale_role: TensorSpec(scale_dtypes, shapes, why, finite_nonzero)}


def fp8_weight(recipe: Recipe, weight, scale):
    """FP8Tensor from a checkpoint weight and scale (any producer's scale shape, see fp8_weight_specs)."""
    return fp8_from_checkpoint(weight, scale, block_size=recipe.group_size if recipe.group_size > 0 else 128)


def scalar_spec(what: str) -> TensorSpec:
    """A per-tensor float32 scale ([] or [1]): input_scale, weight_scale_2, k/v scales."""
    return TensorSpec(FLOAT_DTYPES, ((), (1,)), what, finite_nonzero)


def scalar(x) -> jax.Array:
    """A per-tensor scale as float32 []."""
    return x.reshape(()).astype("float32")
