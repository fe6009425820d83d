"""Quantization recipes: one frozen config per recipe, and ordered regex rules that map module paths
to recipes.

A recipe says how a linear layer's weight is stored and how its input activation is quantized at run
time. Names are the ones users type (``jaxq.quantize(params, "w4a16_awq")``); the numerics of each
are specified in ../shared/spec/formats.md (section in brackets):

| name         | weight                                  | activation                             |
|--------------|-----------------------------------------|----------------------------------------|
| fp8          | E4M3 per tensor [2.1]                   | E4M3 per tensor, static input_scale    |
| fp8_rowwise  | E4M3 per output channel [2.2]           | E4M3 per token, dynamic                |
| fp8_block    | E4M3, 128x128 blocks [2.3]              | E4M3, 1x128 groups, dynamic            |
| nvfp4        | E2M1 x E4M3/16 x fp32 global [2.4]      | NVFP4 16-blocks (W4A4), or none (bf16) |
| mxfp4        | E2M1 x E8M0/32 [2.5]                    | none (bf16), or E4M3 per tensor static |
| w4a16_awq    | INT4 groups, AWQ-smoothed [2.6]         | none                                   |
| w4a8_awq     | INT4 groups + fp32 weight_scale_2 [2.7] | E4M3 per tensor, static                |
| w4a16_gptq   | INT4 groups (sym or asym, act-order)    | none                                   |
| w4a8_gptq    | INT4 groups, GPTQ-optimized             | E4M3 per tensor, static                |

The KV cache recipe (``kv_cache="fp8"``) is independent of the linear recipe and lives in
:class:`QuantConfig`.

Rules are ``(regex, recipe or None)`` pairs over dotted HF module paths such as
``model.layers.0.self_attn.q_proj``; the first rule whose regex ``re.search``-matches a path wins and
``None`` leaves the module unquantized. The default exclusions follow ModelOpt: ``lm_head``, MoE
routers (``mlp.gate``, ``router``), embeddings, and anything that is not a linear layer (norms are
never handed to the rules).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Iterable, Mapping

WEIGHT_FORMATS = ("fp8", "nvfp4", "mxfp4", "int4")
WEIGHT_GRANULARITIES = ("tensor", "channel", "block", "group")
ACTIVATION_MODES = ("none", "fp8_static", "fp8_token", "fp8_group", "nvfp4")
ALGORITHMS = ("max", "awq", "gptq")
KV_CACHE_DTYPES = (None, "fp8")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How one linear layer is quantized.

    Attributes:
      name: the recipe name users type (``fp8``, ``w4a16_awq``, ...).
      weight_format: element format of the stored weight, one of ``WEIGHT_FORMATS``.
      weight_granularity: scale granularity of the weight (``tensor``, ``channel``, ``block``
        (128x128) or ``group`` (along K, ``group_size`` elements)).
      group_size: elements per scale along K for ``group`` granularity (16 NVFP4, 32 MXFP4,
        32/64/128 INT4), block edge for ``block``; 0 otherwise.
      activation: run-time activation quantization, one of ``ACTIVATION_MODES``.
      algorithm: calibration algorithm that produces the weights: ``max`` (round to nearest with
        max-calibrated static scales), ``awq`` or ``gptq``.
      symmetric: INT4 only; False stores a zero point per group (GPTQ/AutoAWQ asymmetric).
      act_order: INT4 GPTQ only; quantize columns in descending Hessian-diagonal order (g_idx).
    """

    name: str
    weight_format: str
    weight_granularity: str
    group_size: int = 0
    activation: str = "none"
    algorithm: str = "max"
    symmetric: bool = True
    act_order: bool = False

    def __post_init__(self):
        _check_choice("weight_format", self.weight_format, WEIGHT_FORMATS, self.name)
        _check_choice("weight_granularity", self.weight_granularity, WEIGHT_GRANULARITIES, self.name)
        _check_choice("activation", self.activation, ACTIVATION_MODES, self.name)
        _check_choice("algorithm", self.algorithm, ALGORITHMS, self.name)
        if self.weight_granularity in ("group", "block") and self.group_size <= 0:
            raise ValueError(
                f"recipe {self.name!r}: weight_granularity={self.weight_granularity!r} needs a "
                f"positive group_size, got {self.group_size}")
        if self.weight_format == "int4" and self.group_size not in (-1, 32, 64, 128):
            raise ValueError(
                f"recipe {self.name!r}: INT4 group_size must be 32, 64, 128 or -1 (per channel), "
                f"got {self.group_size}")
        if self.act_order and self.algorithm != "gptq":
            raise ValueError(f"recipe {self.name!r}: act_order needs algorithm='gptq', "
                             f"got {self.algorithm!r}")

    @property
    def weight_only(self) -> bool:
        """True when activations stay in the model dtype."""
        return self.activation == "none"

    def replace(self, **changes: Any) -> "Recipe":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Recipe":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Recipe.from_dict: unknown fields {unknown}; known {sorted(known)}")
        return cls(**data)


def _check_choice(field: str, value: Any, choices: Iterable[Any], recipe: str) -> None:
    if value not in choices:
        raise ValueError(f"recipe {recipe!r}: {field}={value!r} is not one of {list(choices)}")


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("fp8", "fp8", "tensor", activation="fp8_static"),
        Recipe("fp8_rowwise", "fp8", "channel", activation="fp8_token"),
        Recipe("fp8_block", "fp8", "block", group_size=128, activation="fp8_group"),
        Recipe("nvfp4", "nvfp4", "group", group_size=16, activation="nvfp4"),
        Recipe("mxfp4", "mxfp4", "group", group_size=32),
        Recipe("w4a16_awq", "int4", "group", group_size=128, algorithm="awq"),
        Recipe("w4a8_awq", "int4", "group", group_size=128, activation="fp8_static",
               algorithm="awq"),
        Recipe("w4a16_gptq", "int4", "group", group_size=128, algorithm="gptq"),
        Recipe("w4a8_gptq", "int4", "group", group_size=128, activation="fp8_static",
               algorithm="gptq"),
    )
}


def get_recipe(name: str | Recipe, **overrides: Any) -> Recipe:
    """The named recipe, with optional field overrides (``get_recipe("w4a16_gptq", group_size=64)``,
    ``get_recipe("nvfp4", activation="none")`` for weight-only NVFP4, ``get_recipe("mxfp4",
    activation="fp8_static")`` for W4A8 MXFP4)."""
    if isinstance(name, Recipe):
        return name.replace(**overrides) if overrides else name
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; supported: {sorted(RECIPES)}")
    recipe = RECIPES[name]
    return recipe.replace(**overrides) if overrides else recipe


# ModelOpt leaves these unquantized by default (its *lm_head*, *router*, *mlp.gate.* patterns);
# embeddings are listed because tied models expose them as the output projection.
DEFAULT_EXCLUSIONS: tuple[str, ...] = (
    r"(^|\.)lm_head$",
    r"(^|\.)embed_tokens$",
    r"(^|\.)mlp\.gate$",
    r"(^|\.)router$",
)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Ordered rules mapping module paths to recipes, plus the KV cache dtype.

    ``rules`` is a tuple of ``(regex, recipe-or-None)``; ``exclusions`` are regexes tried before the
    rules (each excluded module stays in the model dtype). Build the common case with
    :meth:`for_recipe`.
    """

    rules: tuple[tuple[str, Recipe | None], ...]
    exclusions: tuple[str, ...] = DEFAULT_EXCLUSIONS
    kv_cache: str | None = None

    def __post_init__(self):
        _check_choice("kv_cache", self.kv_cache, KV_CACHE_DTYPES, "QuantConfig")
        for pattern, _ in self.rules:
            _compile(pattern)
        for pattern in self.exclusions:
            _compile(pattern)

    @classmethod
    def for_recipe(cls, recipe: str | Recipe, *, kv_cache: str | None = None,
                   exclude: Iterable[str] = (), **overrides: Any) -> "QuantConfig":
        """Every linear layer gets ``recipe`` except the default exclusions and ``exclude``."""
        return cls(rules=((r".*", get_recipe(recipe, **overrides)),),
                   exclusions=DEFAULT_EXCLUSIONS + tuple(exclude), kv_cache=kv_cache)

    def recipe_for(self, path: str) -> Recipe | None:
        """The recipe of the module at dotted ``path``, or None to leave it unquantized."""
        if any(re.search(p, path) for p in self.exclusions):
            return None
        for pattern, recipe in self.rules:
            if re.search(pattern, path):
                return recipe
        return None

    def resolve(self, paths: Iterable[str]) -> tuple[dict[str, Recipe | None], list[str]]:
        """Map every path to its recipe; also return the rule/exclusion patterns that matched no
        path (a typo in a rule is reported, never silently ignored)."""
        paths = list(paths)
        plan = {path: self.recipe_for(path) for path in paths}
        patterns = [p for p, _ in self.rules] + list(self.exclusions)
        unmatched = [p for p in patterns if not any(re.search(p, path) for path in paths)]
        return plan, unmatched

    def to_json(self) -> str:
        return json.dumps({
            "rules": [[p, None if r is None else r.to_dict()] for p, r in self.rules],
            "exclusions": list(self.exclusions),
            "kv_cache": self.kv_cache,
        }, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "QuantConfig":
        data = json.loads(text)
        rules = tuple((p, None if r is None else Recipe.from_dict(r)) for p, r in data["rules"])
        return cls(rules=rules, exclusions=tuple(data["exclusions"]), kv_cache=data["kv_cache"])


def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"invalid module regex {pattern!r}: {err}") from None
