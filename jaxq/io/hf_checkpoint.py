"""Load an unquantized Hugging Face checkpoint directory (config.json + safetensors) into jaxq params.

Single files (model.safetensors) and sharded ones (model.safetensors.index.json) are read tensor by tensor:
each is checked against the family's WeightMap and the module's eval_shape before it is read, put on the
device and cast there, so the host never holds a second copy of the model. Pickle checkpoints (.bin, .pt,
.pth) are refused: unpickling runs arbitrary code.
"""
import json
import os
from pathlib import Path
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from jaxq.io.safetensors_file import SafetensorsFile
from models.hf_interop import ParamsBuilder, default_convert, expected_shapes
from models.registry import ModelFamily, get_model_family

_INDEX = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _safetensors_files(root: Path) -> list[Path]:
    index = root / _INDEX
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map")
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
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in _PICKLE_SUFFIXES)
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
        if root.suffix in _PICKLE_SUFFIXES:
            raise ValueError(f"{root} is a pickle file; jaxq reads safetensors checkpoint directories only")
        raise ValueError(f"{root} is a file; pass the checkpoint directory that holds config.json")
    config_file = root / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found: pass a Hugging Face checkpoint directory")
    return json.loads(config_file.read_text())


def load_hf_params(
    path: str | os.PathLike,
    dtype: Any = jnp.bfloat16,
    convert: Callable[[str, np.ndarray, Any], Any] = default_convert,
) -> tuple[ModelFamily, Any, dict]:
    """(family, config, params) from a Hugging Face checkpoint directory.

    dtype: the params' dtype (and so, with the module's dtype=None, the compute dtype).
    convert(hf_name, host array, dtype) -> param: the per-tensor conversion hook (default: device_put, cast).
    Errors name the tensor, the expected and actual shape and the file; tensors the model does not have
    are errors unless known to be harmless (rotary inv_freq, a tied lm_head copy, a vision tower).
    """
    root = Path(path)
    hf = read_hf_config(root)
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?")
        raise ValueError(
            f"{root} is a quantized checkpoint (quant_method {method!r}); load_hf_params reads unquantized "
            "checkpoints only (quantized checkpoint loading is not implemented yet)"
        )
    family = get_model_family(hf.get("architectures") or [])
    config = family.config_class.from_hf_config(hf)
    files = _safetensors_files(root)
    builder = ParamsBuilder(
        family.weight_map(config), expected_shapes(family.module_class(config)), jnp.dtype(dtype), convert
    )
    for file in files:
        st = SafetensorsFile(file)
        for name in st.keys():
            builder.add(name, st.shape(name), lambda st=st, name=name: st.read(name), str(file))
    params = builder.finish(", ".join(str(f) for f in files))
    return family, config, params
