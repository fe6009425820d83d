"""Load an unquantized Hugging Face checkpoint directory (config.json + safetensors) into jaxq params.

Single files (model.safetensors) and sharded ones (model.safetensors.index.json) are read tensor by tensor:
each is checked against the family's WeightMap and the module's eval_shape before it is read, put on the
device and cast there, so the host never holds a second copy of the model. Pickle checkpoints (.bin, .pt,
.pth) are refused: unpickling runs arbitrary code. JSON files are size-checked before they are read.

Quantized checkpoints plug in a ModuleConverter (jaxq.io.quantized.plan.CheckpointPlan): it claims the
tensors of each quantized linear and turns them, one module at a time, into the param that replaces its
weight; every other tensor takes the path above unchanged.
"""
import functools
import json
import os
from pathlib import Path
from typing import Any, Callable, Protocol

import jax.numpy as jnp
import numpy as np

from jaxq.io.safetensors_file import SafetensorsFile
from models.hf_interop import ParamsBuilder, default_convert, expected_shapes
from models.registry import ModelFamily, get_model_family

_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Far above any real config or shard index (DeepSeek-V3's index is 9 MB), far below a memory problem.
MAX_JSON_BYTES = 64 * 1024 * 1024


class ModuleConverter(Protocol):
    """Turns the checkpoint tensors of whole modules (a quantized linear's weight and scales) into params."""

    def module_of(self, name: str) -> str | None:
        """The module whose tensors include checkpoint tensor `name` when this converter consumes it, else None."""

    def convert(self, module: str, read: Callable[[str], np.ndarray], dtype: Any) -> dict[str, Any]:
        """{HF param name: finished param} for one module; read(name) returns any checkpoint tensor."""


def read_json(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """A JSON file, refused (ValueError) before reading when larger than max_bytes, or when not valid JSON."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{path} is {size} bytes, above the {max_bytes}-byte bound for JSON files; it is not a "
                         "checkpoint config")
    try:
        return json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def safetensors_files(root: Path) -> list[Path]:
    """The checkpoint's safetensors files: the shards its index lists, else model.safetensors, else every
    *.safetensors. A directory with only pickle weights is refused with how to convert them."""
    index = root / _INDEX
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        files = [root / name for name in dict.fromkeys(weight_map.values())]
        absent = [str(f) for f in files if not f.exists()]
        if absent:
            raise FileNotFoundError(f"{index} lists shard(s) that do not exist: {absent}")
        return files
    if (root / "model.safetensors").exists():  # preferred over other *.safetensors (e.g. Mistral's consolidated)
        return [root / "model.safetensors"]
    files = sorted(root.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{root} holds only pickle weights {pickles}; jaxq reads safetensors only (unpickling runs code). "
            "Convert once with transformers: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir) "
            "(safetensors is its default), then load out_dir"
        )
    raise FileNotFoundError(f"no model.safetensors, {_INDEX} or *.safetensors in {root}")


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """config.json of a checkpoint directory as a dict."""
    root = Path(path)
    if root.is_file():
        if root.suffix in PICKLE_SUFFIXES:
            raise ValueError(f"{root} is a pickle file; jaxq reads safetensors checkpoint directories only")
        raise ValueError(f"{root} is a file; pass the checkpoint directory that holds config.json")
    config_file = root / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found: pass a Hugging Face checkpoint directory")
    config = read_json(config_file)
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} is not a JSON object")
    return config


def load_hf_params(
    path: str | os.PathLike,
    dtype: Any = jnp.bfloat16,
    convert: Callable[[str, np.ndarray, Any], Any] = default_convert,
    modules: ModuleConverter | None = None,
) -> tuple[ModelFamily, Any, dict]:
    """(family, config, params) from a Hugging Face checkpoint directory.

    dtype: the params' dtype (and so, with the module's dtype=None, the compute dtype).
    convert(hf_name, host array, dtype) -> param: the per-tensor conversion hook (default: device_put, cast).
    modules: the per-module conversion of a quantized checkpoint (jaxq.load builds it after checking the
      checkpoint, see jaxq.io.check); without it a checkpoint with a quantization_config is refused.
    Errors name the tensor, the expected and actual shape and the file; tensors the model does not have
    are errors unless known to be harmless (rotary inv_freq, a tied lm_head copy, a vision tower).
    """
    root = Path(path)
    hf = read_hf_config(root)
    if hf.get("quantization_config") and modules is None:
        method = hf["quantization_config"].get("quant_method", "?")
        raise ValueError(
            f"{root} is a quantized checkpoint (quant_method {method!r}); load it with jaxq.load, which checks "
            "it and converts its quantized layers"
        )
    family = get_model_family(hf.get("architectures") or [])
    config = family.config_class.from_hf_config(hf)
    files = [SafetensorsFile(f) for f in safetensors_files(root)]
    if modules is not None:  # the converter's params are finished; only raw host arrays take `convert`
        convert = functools.partial(_convert_host_arrays, convert)
    builder = ParamsBuilder(
        family.weight_map(config), expected_shapes(family.module_class(config)), jnp.dtype(dtype), convert
    )
    where = {name: st for st in files for name in st.keys()}
    done: set[str] = set()
    for st in files:
        for name in st.keys():
            module = None if modules is None else modules.module_of(name)
            if module is None:
                builder.add(name, st.shape(name), lambda st=st, name=name: st.read(name), st.path)
            elif module not in done:  # the whole module at once, its tensors read from whichever shard
                done.add(module)
                for param_name, value in modules.convert(module, lambda n: where[n].read(n), dtype).items():
                    builder.add(param_name, value.shape, lambda value=value: value, st.path)
    params = builder.finish(", ".join(st.path for st in files))
    return family, config, params


def _convert_host_arrays(convert, hf_name: str, x, dtype):
    return convert(hf_name, x, dtype) if isinstance(x, np.ndarray) else x
