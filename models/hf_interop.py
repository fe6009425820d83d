"""What every model family shares with Hugging Face: config.json dicts and the HF-name -> params tables.

Params mirror HF names: `model.layers.3.self_attn.q_proj.weight` lives at
params["model"]["layers_3"]["self_attn"]["q_proj"]["weight"]. Each family lists its tensors explicitly in a
WeightMap (next to the model); `ParamsBuilder` fills a params tree from (name, tensor) pairs one tensor at a
time, checking names and shapes against the module's own `jax.eval_shape` and naming the tensor, the
expected and actual shape and the source file in every error.
"""
import dataclasses
import re
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

Path = tuple[str, ...]


def config_from_hf(cls, hf: Mapping[str, Any], required: tuple[str, ...], **resolved):
    """cls(**fields) from a config.json dict: unknown keys are ignored, missing `required` keys raise.

    `resolved` overrides/adds values the family derived itself (rope parameters, layer types, ...).
    """
    missing = [k for k in required if hf.get(k) is None]
    if missing:
        raise ValueError(f"config.json for {cls.__name__} lacks required field(s) {missing}")
    names = {f.name for f in dataclasses.fields(cls)}
    fields = {k: v for k, v in hf.items() if k in names and v is not None}
    fields.update(resolved)
    return cls(**fields)


@dataclasses.dataclass(frozen=True)
class Transform:
    """A named checkpoint -> param tensor transform: `apply` on the host array, `shape` on its header shape
    (so a wrong shape is reported before the tensor is read)."""

    apply: Callable[[np.ndarray], np.ndarray]
    shape: Callable[[tuple[int, ...]], tuple[int, ...]]


# HF orientation is kept for Linear weights, so the families here need only identity; fused or split
# layouts (and the quantization issue) add entries.
TRANSFORMS: dict[str, Transform] = {"identity": Transform(apply=lambda x: x, shape=tuple)}


@dataclasses.dataclass(frozen=True)
class WeightEntry:
    path: Path
    transform: str = "identity"


def hf_path(hf_name: str) -> Path:
    """The params path HF naming implies: dots split modules, list indices become `<name>_<i>`."""
    return tuple(re.sub(r"(\w+)\.(\d+)(?=\.|$)", r"\1_\2", hf_name).split("."))


@dataclasses.dataclass(frozen=True)
class WeightMap:
    """entries: canonical HF name -> WeightEntry. renames: (regex, replacement) applied first (e.g. the
    text part of a multimodal checkpoint). ignored: regexes of tensors that are known to be harmless to
    drop (rotary inv_freq buffers, a tied lm_head copy, a vision tower); anything else unknown is an error.
    """

    entries: Mapping[str, WeightEntry]
    renames: tuple[tuple[str, str], ...] = ()
    ignored: tuple[str, ...] = ()

    def resolve(self, hf_name: str) -> tuple[str, WeightEntry | None]:
        """(canonical name, entry), entry None for an ignored tensor; KeyError for an unknown one."""
        name = hf_name
        for pattern, replacement in self.renames:
            name = re.sub(pattern, replacement, name)
        if name in self.entries:
            return name, self.entries[name]
        if any(re.search(p, hf_name) for p in self.ignored):
            return name, None
        raise KeyError(name)

    def hf_names(self) -> dict[Path, tuple[str, str]]:
        """The inverse of `entries` for writers: params path -> (canonical HF name, transform name)."""
        return {entry.path: (name, entry.transform) for name, entry in self.entries.items()}


def expected_shapes(module, num_tokens: int = 1) -> dict[Path, tuple[int, ...]]:
    """Param path -> shape from `jax.eval_shape(module.init)`: no memory, so real sizes are cheap."""
    tokens = jnp.zeros((1, num_tokens), jnp.int32)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), tokens))["params"]
    return {path: tuple(leaf.shape) for path, leaf in flax.traverse_util.flatten_dict(shapes).items()}


def default_convert(hf_name: str, array: np.ndarray, dtype: Any) -> jax.Array:
    """Per-tensor conversion hook: put one host tensor on the device, then cast there (no host copy)."""
    del hf_name
    return jax.device_put(array).astype(dtype)


class ParamsBuilder:
    """Fills a params tree tensor by tensor; `finish` fails if any expected tensor never came.

    convert(hf_name, np.ndarray, dtype) -> param is pluggable so quantized checkpoints can turn several
    tensors into one quantized weight later.
    """

    def __init__(self, weight_map: WeightMap, shapes: Mapping[Path, tuple[int, ...]], dtype: Any,
                 convert: Callable[[str, np.ndarray, Any], Any] = default_convert):
        mapped = {e.path for e in weight_map.entries.values()}
        if mapped != set(shapes):  # a family bug, not a checkpoint problem
            raise RuntimeError(
                f"weight map and module disagree: params without an HF name {sorted(set(shapes) - mapped)}, "
                f"HF names without a param {sorted(mapped - set(shapes))}"
            )
        self._map, self._shapes, self._dtype, self._convert = weight_map, shapes, dtype, convert
        self._params: dict[Path, Any] = {}
        self._sources: dict[str, str] = {}

    def add(self, hf_name: str, shape: tuple[int, ...], read: Callable[[], np.ndarray], source: str) -> None:
        """Check hf_name and its shape (from a header, before reading), then read, transform, convert."""
        try:
            name, entry = self._map.resolve(hf_name)
        except KeyError:
            raise ValueError(
                f"unexpected tensor {hf_name!r} (shape {tuple(shape)}) in {source}: the model has no such "
                "parameter; check that config.json's architectures/model_type match these weights"
            ) from None
        if entry is None:
            return
        if name in self._sources:
            raise ValueError(f"tensor {hf_name!r} appears twice: in {self._sources[name]} and in {source}")
        transform = TRANSFORMS[entry.transform]
        want, got = self._shapes[entry.path], transform.shape(tuple(shape))
        if got != want:
            raise ValueError(
                f"tensor {hf_name!r} in {source} has shape {got}, expected {want} for "
                f"params[{']['.join(repr(p) for p in entry.path)}]; check config.json sizes against the weights"
            )
        array = transform.apply(read())
        self._params[entry.path] = self._convert(hf_name, array, self._dtype)
        self._sources[name] = source

    def finish(self, sources: str) -> dict:
        """The nested params dict; ValueError listing every missing tensor (HF names) and where we looked."""
        missing = {n: e for n, e in self._map.entries.items() if e.path not in self._params}
        if missing:
            listed = ", ".join(f"{n} {self._shapes[e.path]}" for n, e in list(missing.items())[:10])
            more = f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""
            raise ValueError(f"{len(missing)} tensor(s) missing from {sources}: {listed}{more}")
        return flax.traverse_util.unflatten_dict(self._params)
