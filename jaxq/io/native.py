"""jaxq's native checkpoint: a LoadedModel saved with orbax, quantized params included, and restored as is.

Directory layout:
  jaxq_model.json   {"format": "jaxq-native", "version", "hf_config", "quantization" (QuantConfig JSON or
                    null), "eos_token_ids", "pad_token_id", "dtype", "source", "structs"}
  params/           orbax StandardCheckpointer tree {"params": ..., "kv_scales": {"k", "v"}} of plain arrays
  tokenizer/        the transformers tokenizer's save_pretrained files (absent when the model has none)

Quantized params are flax struct dataclasses (QuantizedWeight holding an FP8Tensor, NVFP4Tensor, ...).
They are stored as dicts of their array fields (a None field is simply absent), and "structs" maps each
such node's path ("model/layers_0/self_attn/q_proj/weight") to its class name and static fields (the
Recipe as a dict, granularity, block or group size), so restoring rebuilds the same pytree.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
from typing import Any

import flax
import jax
import jax.numpy as jnp

from jaxq.formats import FP8Tensor, Int4Tensor, MXFP4Tensor, NVFP4Tensor
from jaxq.loaded_model import LoadedModel, from_params
from jaxq.nn.quantized_weight import QuantizedWeight
from jaxq.recipes import QuantConfig, Recipe
from models.registry import get_model_family

MANIFEST = "jaxq_model.json"
FORMAT = "jaxq-native"
VERSION = 1
_STRUCTS = {cls.__name__: cls for cls in (QuantizedWeight, FP8Tensor, NVFP4Tensor, MXFP4Tensor, Int4Tensor)}
_SEP = "/"


def is_native(path: str | pathlib.Path) -> bool:
    """True when path is a directory written by `save`."""
    return (pathlib.Path(path) / MANIFEST).is_file()


def save(model: LoadedModel, directory: str | pathlib.Path, overwrite: bool = False) -> pathlib.Path:
    """Write model (params, quantized or not, KV scales, config, quantization, tokenizer) to directory.
    An existing non-empty directory is an error unless overwrite=True. Returns the directory."""
    import orbax.checkpoint as ocp

    directory = pathlib.Path(directory).absolute()
    if directory.exists() and any(directory.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{directory} exists and is not empty; pass overwrite=True to replace it")
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    structs: dict[str, dict] = {}
    arrays = {"params": _encode(model.params, (), structs)}
    if model.kv_scales is not None:
        arrays["kv_scales"] = {"k": model.kv_scales[0], "v": model.kv_scales[1]}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / "params", arrays)
    checkpointer.wait_until_finished()
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(directory / "tokenizer")
    manifest = {
        "format": FORMAT, "version": VERSION, "hf_config": model.hf_config,
        "quantization": _quantization_json(model.quantization),
        "eos_token_ids": list(model.eos_token_ids), "pad_token_id": model.pad_token_id,
        "dtype": jnp.dtype(model.dtype).name, "source": model.source, "structs": structs,
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return directory


def load(directory: str | pathlib.Path, dtype: Any = None) -> LoadedModel:
    """Restore a model written by `save`. dtype: cast the unquantized floating params to it (None keeps the
    saved dtype); quantized weights are restored exactly as saved."""
    import orbax.checkpoint as ocp

    directory = pathlib.Path(directory).absolute()
    manifest = json.loads((directory / MANIFEST).read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{directory / MANIFEST}: format {manifest.get('format')!r} version "
                         f"{manifest.get('version')!r}, expected {FORMAT!r} version {VERSION}")
    arrays = ocp.StandardCheckpointer().restore(directory / "params")
    params = _decode(arrays["params"], manifest["structs"])
    if dtype is not None and jnp.dtype(dtype) != jnp.dtype(manifest["dtype"]):
        params = _cast_unquantized(params, jnp.dtype(dtype))
    hf_config = manifest["hf_config"]
    family = get_model_family(hf_config["architectures"])
    tokenizer = None
    if (directory / "tokenizer").is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer")
    model = from_params(family, family.config_class.from_hf_config(hf_config), params, hf_config,
                        tokenizer=tokenizer, eos_token_ids=manifest["eos_token_ids"],
                        pad_token_id=manifest["pad_token_id"], source=str(directory))
    kv = arrays.get("kv_scales")
    quantization = manifest["quantization"]
    return model.replace(
        kv_scales=None if kv is None else (kv["k"], kv["v"]),
        quantization=None if quantization is None else QuantConfig.from_json(json.dumps(quantization)))


def _quantization_json(quantization) -> dict | None:
    if quantization is None:
        return None
    if not isinstance(quantization, QuantConfig):
        raise TypeError(f"model.quantization is a {type(quantization).__name__}; the native format records a "
                        "jaxq.recipes.QuantConfig or None")
    return json.loads(quantization.to_json())


def _encode(node, path: tuple[str, ...], structs: dict) -> Any:
    """Params -> nested dicts of arrays; each struct node's class and static fields go to structs[path]."""
    if isinstance(node, dict):
        return {k: _encode(v, path + (k,), structs) for k, v in node.items()}
    if isinstance(node, tuple(_STRUCTS.values())):
        static, children = {}, {}
        for field in dataclasses.fields(node):
            value = getattr(node, field.name)
            if not field.metadata.get("pytree_node", True):
                static[field.name] = {"recipe": value.to_dict()} if isinstance(value, Recipe) else value
            elif value is not None:
                children[field.name] = _encode(value, path + (field.name,), structs)
        structs[_SEP.join(path)] = {"type": type(node).__name__, "static": static}
        return children
    if not hasattr(node, "dtype"):
        raise TypeError(f"param {_SEP.join(path)} is a {type(node).__name__}, which the native format cannot "
                        "store")
    return node


def _decode(arrays: dict, structs: dict) -> dict:
    """Inverse of _encode: rebuild the struct nodes deepest first, so parents receive built children."""
    flat = flax.traverse_util.flatten_dict(arrays, sep=_SEP)
    for path in sorted(structs, key=lambda p: -p.count(_SEP)):
        spec = structs[path]
        prefix = path + _SEP
        # deeper struct nodes are already built, so every key left under prefix is a direct field
        children = {k[len(prefix):]: flat.pop(k) for k in [k for k in flat if k.startswith(prefix)]}
        static = {k: Recipe.from_dict(v["recipe"]) if isinstance(v, dict) and "recipe" in v else v
                  for k, v in spec["static"].items()}
        flat[path] = _STRUCTS[spec["type"]](**children, **static)
    return flax.traverse_util.unflatten_dict(flat, sep=_SEP)


def _cast_unquantized(params, dtype):
    def cast(leaf):
        if isinstance(leaf, QuantizedWeight) or not jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf
        return leaf.astype(dtype)

    return jax.tree.map(cast, params, is_leaf=lambda x: isinstance(x, QuantizedWeight))
