"""What every Hugging Face-style export shares: the model's tensors under their HF names, the output
directory, config.json, the tokenizer and generation_config.json.

Names come from the family's weight map (models/<family>.py, HF name -> params path), inverted: the
tensor at params["model"]["layers_0"]["self_attn"]["q_proj"]["weight"] is written as
`model.layers.0.self_attn.q_proj.weight`. A tied lm_head has no params of its own, so none is written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import flax
import jax.numpy as jnp

from jaxq.formats import NVFP4Tensor, pack_nibbles
from jaxq.formats.nvfp4 import BLOCK as NVFP4_BLOCK
from jaxq.io.quantized.plan import linear_shapes
from jaxq.loaded_model import LoadedModel
from jaxq.nn.quantized_weight import QuantizedWeight

log = logging.getLogger(__name__)

_K_PROJ = re.compile(r"^(?P<attn>.*\.layers\.(?P<layer>\d+)\.self_attn)\.k_proj$")


@dataclasses.dataclass(frozen=True)
class ModelTensors:
    """The model's params by HF name, in the weight map's order.

    plain: {HF tensor name: array} of everything that is not a quantized linear weight (norms, embeddings,
      biases, unquantized linears), floating ones in the model dtype. quantized: {HF module name:
      QuantizedWeight}. order: the keys of both in the weight map's order (embeddings, layer by layer, head),
      the order they are written in. linears: every linear module the model calls (quantized or not).
      embeddings: modules holding an embedding table. attention: per layer, the self-attention module name
      (where KV-cache scales live), () for a family without `layers.<i>.self_attn.k_proj`.
    """

    plain: dict[str, Any]
    quantized: dict[str, QuantizedWeight]
    order: tuple[str, ...]
    linears: tuple[str, ...]
    embeddings: tuple[str, ...]
    attention: tuple[str, ...]

    @property
    def unquantized_linears(self) -> list[str]:
        return [m for m in self.linears if m not in self.quantized]


def model_tensors(model: LoadedModel) -> ModelTensors:
    """Every param of model under its HF name (see the module docstring); ValueError for a family whose
    checkpoint names are not the canonical ones (renamed multimodal checkpoints) or need a non-identity
    transform, which this writer cannot invert."""
    weight_map = model.family.weight_map(model.config)
    if weight_map.renames:
        raise ValueError(f"{model.family.name}: its checkpoints rename tensors ({weight_map.renames[0][0]} ...); "
                         "jaxq exports text-only checkpoints with canonical names only")
    names = weight_map.hf_names()
    flat = flax.traverse_util.flatten_dict(model.params)
    plain, quantized, order = {}, {}, []
    for path, (name, transform) in names.items():  # the weight map's order: embeddings, layers, head
        if transform != "identity":
            raise ValueError(f"{name}: loads through transform {transform!r}, which the exporter cannot invert")
        leaf = flat[path]
        if isinstance(leaf, QuantizedWeight):
            quantized[name.removesuffix(".weight")] = leaf
            order.append(name.removesuffix(".weight"))
        else:
            plain[name] = leaf.astype(model.dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf
            order.append(name)
    linears = tuple(linear_shapes(model.family, model.config))
    embeddings = tuple(n.removesuffix(".weight") for n, _ in names.values() if n.endswith("embed_tokens.weight"))
    attention = tuple(m["attn"] for lin in linears if (m := _K_PROJ.match(lin)))
    if len(attention) != model.num_layers:
        attention = ()  # a family without `layers.<i>.self_attn.k_proj`: KV scales cannot be placed
    return ModelTensors(plain, quantized, tuple(order), linears, embeddings, attention)


def kv_scales(model: LoadedModel, tensors: ModelTensors) -> dict[int, tuple[Any, Any]]:
    """{layer: (k_scale, v_scale)} as float32 0-d arrays, {} without KV scales. ValueError when the model's
    QuantConfig asks for an FP8 KV cache that was never calibrated."""
    kv_cache = getattr(model.quantization, "kv_cache", None)
    if model.kv_scales is None:
        if kv_cache == "fp8":
            raise ValueError("the model's QuantConfig has kv_cache='fp8' but model.kv_scales is None; calibrate "
                             "them (jaxq.calibrate_kv_scales, or jaxq.quantize(..., kv_cache='fp8')) first")
        return {}
    if not tensors.attention:
        raise ValueError(f"{model.family.name}: no layers.<i>.self_attn.k_proj modules to attach KV scales to")
    k, v = (jnp.asarray(s, jnp.float32).reshape(-1) for s in model.kv_scales)
    if k.shape != (model.num_layers,) or v.shape != (model.num_layers,):
        raise ValueError(f"model.kv_scales have shapes {k.shape} and {v.shape}, expected ({model.num_layers},)")
    return {i: (k[i], v[i]) for i in range(model.num_layers)}


def nonzero_block_scales(t: NVFP4Tensor) -> NVFP4Tensor:
    """t with every zero E4M3 block scale set to 1.0 and that block's codes to +0: the same values (0 * code is
    0 either way), but every loader and `jaxq check` refuse zero scales. quantize_nvfp4 writes a zero scale
    for a block whose scale underflows E4M3 (amax below ~2e-6 of the tensor's)."""
    zero = t.block_scale.astype(jnp.float32) == 0
    if not bool(jnp.any(zero)):
        return t
    codes = jnp.where(jnp.repeat(zero, NVFP4_BLOCK, axis=-1), 0, t.codes()).astype(jnp.uint8)
    return t.replace(packed=pack_nibbles(codes),
                     block_scale=jnp.where(zero, jnp.ones((), t.block_scale.dtype), t.block_scale))


def prepare_directory(out_dir, overwrite: bool) -> Path:
    """out_dir, created; an existing non-empty directory is an error unless overwrite (then it is replaced)."""
    out = Path(out_dir).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_config(out: Path, model: LoadedModel, quantization_config: dict | None) -> None:
    """config.json: the model's hf_config with its dtype and the format's quantization_config (none: removed)."""
    config = {k: v for k, v in model.hf_config.items() if k != "quantization_config"}
    dtype_keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]  # transformers v5 reads "dtype"
    config.update({k: jnp.dtype(model.dtype).name for k in dtype_keys})
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    write_json(out / "config.json", config)


def write_tokenizer_files(out: Path, model: LoadedModel) -> None:
    """The tokenizer (save_pretrained files) and generation_config.json: copied from a source directory that
    has one, else written from the model's bos / eos / pad ids (jaxq.load reads the eos ids back from it)."""
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(out)
    else:
        log.warning("%s has no tokenizer: the export holds none (prompts must be token ids)", model.source)
    source = Path(model.source) / "generation_config.json"
    if source.is_file():
        shutil.copy(source, out / "generation_config.json")
        return
    eos = list(model.eos_token_ids)
    generation = {"bos_token_id": model.hf_config.get("bos_token_id"),
                  "eos_token_id": eos[0] if len(eos) == 1 else eos, "pad_token_id": model.pad_token_id}
    write_json(out / "generation_config.json", {k: v for k, v in generation.items() if v not in (None, [])})


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
