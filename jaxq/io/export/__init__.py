"""`jaxq.export(model, out_dir, format)`: write a (quantized) LoadedModel as a checkpoint other engines load.

| format               | what it writes                                    | who loads it                      |
|----------------------|---------------------------------------------------|-----------------------------------|
| "modelopt"           | ModelOpt unified HF checkpoint (modelopt.py)      | TensorRT-LLM, vLLM (FP8, NVFP4), jaxq |
| "compressed-tensors" | llm-compressor's format (compressed_tensors.py)   | vLLM, transformers, jaxq          |
| "hf"                 | a plain HF checkpoint of an unquantized model     | transformers, llm-compressor, jaxq |
| "jaxq"               | jaxq's native orbax checkpoint (jaxq.save)        | jaxq                              |

The HF-style formats write config.json (the model's hf_config, its dtype, the format's quantization_config),
safetensors under the model's HF tensor names (unquantized tensors in the model dtype; sharded with an index
above max_shard_bytes; no lm_head for tied embeddings), the tokenizer and generation_config.json. Every
tensor is produced and every scale checked (finite, non-zero) before the first byte is written
(jaxq/io/export/writer.py); `jaxq.load` reads each export back to the same weights (tests/io/test_export*.py).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

from jaxq import __version__
from jaxq.io import native
from jaxq.io.export import common, compressed_tensors, modelopt, writer
from jaxq.loaded_model import LoadedModel

log = logging.getLogger(__name__)

FORMATS = ("modelopt", "compressed-tensors", "hf", "jaxq")
_QUANTIZED_FORMATS = {"modelopt": modelopt, "compressed-tensors": compressed_tensors}


def export(model: LoadedModel, out_dir: str | os.PathLike, format: str = "modelopt", *, overwrite: bool = False,
           max_shard_bytes: int = writer.DEFAULT_SHARD_BYTES, progress: bool = True) -> Path:
    """Write model to out_dir in `format` (table above) and return the directory.

    model: a LoadedModel, quantized by jaxq.quantize or loaded pre-quantized (its QuantizedWeight linears and
      FP8 KV scales are written) or, for "hf" and "jaxq", unquantized.
    out_dir: created; an existing non-empty directory is an error unless overwrite=True (then replaced).
    max_shard_bytes: largest safetensors file (tensor data), 5 GB as transformers; more data gives
      model-0000i-of-0000n.safetensors and model.safetensors.index.json.
    Raises ValueError, before writing anything, naming the layer or tensor when a layer has no layout in the
    format (e.g. asymmetric INT4 to "modelopt", W4A8 or a kept AWQ pre_quant_scale to "compressed-tensors":
    quantize AWQ with AWQConfig(fold="foldable") for it), when fused q/k/v or gate/up
    break TensorRT-LLM's shared-scale rule ("modelopt"), or when a scale is NaN, infinite or zero.
    """
    if not isinstance(model, LoadedModel):
        raise TypeError(f"export needs a LoadedModel (jaxq.load, jaxq.quantize), got {type(model).__name__}")
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; supported: {list(FORMATS)}")
    if format == "jaxq":
        return native.save(model, out_dir, overwrite=overwrite)
    tensors = common.model_tensors(model)
    kv = common.kv_scales(model, tensors)
    layout = _QUANTIZED_FORMATS.get(format)
    if layout is None:
        if tensors.quantized or kv:
            raise ValueError(f"format 'hf' writes unquantized models; {model.source} has "
                             f"{len(tensors.quantized)} quantized linears{' and FP8 KV scales' if kv else ''}: "
                             "use format='modelopt' or 'compressed-tensors'")
        quantization_config, files = None, {}
    else:
        if not tensors.quantized:
            raise ValueError(f"{model.source} has no quantized linear layers; quantize it first "
                             "(jaxq.quantize) or write it with format='hf'")
        quantization_config, files = layout.configs(model, tensors, bool(kv))
    units = _units(model, tensors, kv, layout)
    infos = writer.plan(units, progress)
    out = common.prepare_directory(out_dir, overwrite)
    writer.write(out, units, infos, max_shard_bytes, {"exported_by": f"jaxq {__version__}"}, progress)
    common.write_config(out, model, quantization_config)
    for name, content in files.items():
        common.write_json(out / name, content)
    common.write_tokenizer_files(out, model)
    log.info("exported %s as %s to %s", model.source, format, out)
    return out


def _units(model, tensors: common.ModelTensors, kv: dict, layout) -> list[writer.Unit]:
    """One unit per tensor of the params (a quantized linear: all its tensors), in order, then the KV scales."""
    units = []
    for name in tensors.order:
        if name in tensors.quantized:
            qw = tensors.quantized[name]
            units.append(writer.Unit(name, lambda name=name, qw=qw: layout.linear_tensors(name, qw, model.dtype)))
        else:
            units.append(writer.Unit(name, _const({name: tensors.plain[name]})))
    if kv:
        units.append(writer.Unit("kv cache scales", lambda: {
            name: a for i, (k, v) in kv.items() for name, a in layout.kv_tensors(tensors.attention[i], k, v).items()}))
    return units


def _const(tensors: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    return lambda: tensors
