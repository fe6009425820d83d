"""The plan for one quantized checkpoint, made from its tensor names alone: which linears of the model it holds
quantized (with which recipe and which tensors), which it leaves in the model dtype, and its FP8 KV scales.

`jaxq.io.check` validates the files against the plan; `hf_checkpoint.load_hf_params(modules=plan)` then loads
through it (the plan is the ModuleConverter): the tensors of one quantized linear are read together, turned
into a QuantizedWeight on the device and dropped from the host before the next module, so the host never
holds a second copy of the model.

Names: the plan speaks of modules by their checkpoint names (`model.layers.0.self_attn.q_proj`), which are
what exclusion lists match; a module is a linear when `<module>.weight` maps to a QDense weight of the model
(through the family's WeightMap, so renamed checkpoints work too).
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any, Callable, Iterable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxq.io.quantized.scheme import Scheme, TensorSpec
from jaxq.nn.qdense import QDense
from jaxq.recipes import QuantConfig, Recipe

# ModelOpt's `<layer>.self_attn.k_proj.k_scale` / `v_proj.v_scale`, and the bare `self_attn.k_scale` that
# compressed-tensors and vLLM use.
KV_SCALE = re.compile(r"(?:^|\.)layers\.(?P<layer>\d+)\.self_attn\.(?:(?P<proj>[kv])_proj\.)?(?P<which>[kv])_scale$")


def kv_scale_of(name: str) -> tuple[int, str] | None:
    """(layer, "k" or "v") when `name` is an FP8 KV-cache scale, else None."""
    m = KV_SCALE.search(name)
    if m is None or m["proj"] not in (None, m["which"]):
        return None
    return int(m["layer"]), m["which"]


def linear_shapes(family, config) -> dict[str, tuple[int, ...]]:
    """{HF module name: weight shape [N, K]} of every QDense the model calls (one jax.eval_shape, no memory)."""
    module = family.module_class(config)
    paths = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, QDense) and context.method_name == "__call__":
            paths.append(context.module.path)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    flat = flax.traverse_util.flatten_dict(shapes)
    hf_names = {entry.path: name for name, entry in family.weight_map(config).entries.items()}
    return {hf_names[p + ("weight",)].removesuffix(".weight"): tuple(flat[p + ("weight",)].shape) for p in paths}


@dataclasses.dataclass(frozen=True)
class QuantizedLinear:
    """A linear the checkpoint holds quantized: weight shape [N, K], recipe, {role: TensorSpec} and the roles the
    checkpoint has. specs is None, with `error`, when [N, K] cannot be stored in the recipe's layout."""

    shape: tuple[int, ...]
    recipe: Recipe
    specs: dict[str, TensorSpec] | None
    present: frozenset[str]
    error: str | None = None


class CheckpointPlan:
    """The plan of a quantized checkpoint (see the module docstring).

    quantized: {module: QuantizedLinear}. unquantized: {linear module: its roles} for linears the scheme leaves
    in the model dtype. kv: {tensor name: (layer, "k" | "v")}. After loading, `kv_scales()` and
    `quant_config()` describe what was loaded.
    """

    def __init__(self, scheme: Scheme, family, config, names: Iterable[str]):
        self.scheme, self.num_layers = scheme, config.num_hidden_layers
        names = list(names)
        weight_map, shapes = family.weight_map(config), linear_shapes(family, config)
        roles: dict[str, set[str]] = collections.defaultdict(set)
        for name in names:
            module, _, role = name.rpartition(".")
            roles[module].add(role)
        self.quantized: dict[str, QuantizedLinear] = {}
        self.unquantized: dict[str, frozenset[str]] = {}
        for module, present in roles.items():
            canonical = _canonical_module(weight_map, module)
            if canonical not in shapes:
                continue
            recipe = scheme.recipe_for(module, frozenset(present))
            if recipe is None:
                self.unquantized[module] = frozenset(present)
                continue
            try:
                specs, error = scheme.tensor_specs(recipe, *shapes[canonical]), None
            except ValueError as e:
                specs, error = None, f"{module} [N, K] = {list(shapes[canonical])} under {recipe.name}: {e}"
            self.quantized[module] = QuantizedLinear(shapes[canonical], recipe, specs,
                                                     frozenset(present & set(specs or ())), error)
        self.kv = {name: where for name in names if (where := kv_scale_of(name)) is not None}
        self._claims = {f"{m}.{role}": m for m, q in self.quantized.items() for role in q.present}
        self._claims.update({name: name for name in self.kv})
        self._kv_values: dict[tuple[int, str], float] = {}

    def module_of(self, name: str) -> str | None:
        """The ModuleConverter hook: the module a checkpoint tensor belongs to when the plan consumes it."""
        return self._claims.get(name)

    def convert(self, module: str, read: Callable[[str], np.ndarray], dtype: Any) -> dict[str, Any]:
        """The ModuleConverter hook: {"<module>.weight": QuantizedWeight} for a quantized linear; {} for a KV
        scale, which is kept for kv_scales()."""
        if module in self.kv:
            self._kv_values[self.kv[module]] = float(np.asarray(read(module), np.float32).reshape(-1)[0])
            return {}
        linear = self.quantized[module]
        tensors = {role: jnp.asarray(read(f"{module}.{role}")) for role in linear.present}
        try:
            weight = self.scheme.build(linear.recipe, tensors, dtype)
        except ValueError as e:
            raise ValueError(f"{module} ({self.scheme.description}): {e}") from None
        return {f"{module}.weight": weight}

    def kv_scales(self) -> tuple[jax.Array, jax.Array] | None:
        """(k_scale [L], v_scale [L]) float32 as loaded (amax / 448, used as stored), or None without KV scales."""
        if not self._kv_values:
            return None
        return tuple(jnp.asarray([self._kv_values[(i, which)] for i in range(self.num_layers)], jnp.float32)
                     for which in ("k", "v"))

    def quant_config(self) -> QuantConfig:
        """The loaded quantization as a QuantConfig: one rule per recipe over the quantized module names (a
        single `.*` rule with the unquantized linears as exclusions when every quantized linear shares one)."""
        recipes = {q.recipe for q in self.quantized.values()}
        kv_cache = "fp8" if self.kv else None
        exact = lambda m: f"^{re.escape(m)}$"
        if len(recipes) == 1:
            return QuantConfig(rules=((".*", recipes.pop()),), exclusions=tuple(map(exact, self.unquantized)),
                               kv_cache=kv_cache)
        return QuantConfig(rules=tuple((exact(m), q.recipe) for m, q in self.quantized.items()), exclusions=(),
                           kv_cache=kv_cache)


def _canonical_module(weight_map, module: str) -> str | None:
    """The model's name for checkpoint module `module` when `<module>.weight` is a model parameter."""
    try:
        name, entry = weight_map.resolve(f"{module}.weight")
    except KeyError:
        return None
    return None if entry is None else name.removesuffix(".weight")
