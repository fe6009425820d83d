"""Which quantized format a checkpoint directory holds, from its JSON configs only.

| where | value | Scheme |
|---|---|---|
| hf_quant_config.json | producer.name "modelopt" (authoritative, as TensorRT-LLM treats it) | ModelOptScheme |
| config.json quantization_config.quant_method | "modelopt" (ModelOpt's flat config) | ModelOptScheme |
| | "compressed-tensors" | CompressedTensorsScheme |
| | "awq" | AutoAWQScheme |
| | "gptq" | GPTQScheme |
| | "fp8" | FP8Scheme (DeepSeek blocks, or per tensor with static activations) |
| | "mxfp4" | GptOssScheme |
| quantize_config.json (AutoGPTQ), no quantization_config | quant_method "gptq" or absent | GPTQScheme |

Anything else, and any combination a format does not support, raises ValueError naming the file, field and
value, and what jaxq loads instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from jaxq.io.hf_checkpoint import read_json
from jaxq.io.quantized.autoawq import AutoAWQScheme
from jaxq.io.quantized.compressed_tensors import CompressedTensorsScheme
from jaxq.io.quantized.deepseek_fp8 import FP8Scheme
from jaxq.io.quantized.gpt_oss import GptOssScheme
from jaxq.io.quantized.gptq import GPTQScheme
from jaxq.io.quantized.modelopt import scheme_from_config
from jaxq.io.quantized.scheme import Scheme

_METHODS = {
    "compressed-tensors": CompressedTensorsScheme,
    "awq": AutoAWQScheme,
    "gptq": GPTQScheme,
    "fp8": FP8Scheme,
    "mxfp4": GptOssScheme,
}


def detect(root: str | Path, hf_config: Mapping[str, Any]) -> Scheme | None:
    """The Scheme of the checkpoint at root (hf_config: its config.json), None when it is not quantized."""
    root = Path(root)
    qc = hf_config.get("quantization_config")
    if qc is not None and not isinstance(qc, Mapping):
        raise ValueError(f"{root / 'config.json'} quantization_config is {qc!r}, expected an object")
    if (root / "hf_quant_config.json").exists():
        return _modelopt(root / "hf_quant_config.json", qc)
    if qc is None:
        if (root / "quantize_config.json").exists():
            config = _object(root / "quantize_config.json")
            if config.get("quant_method", "gptq") != "gptq":
                raise ValueError(f"{root / 'quantize_config.json'} quant_method is {config['quant_method']!r}; "
                                 "jaxq reads AutoGPTQ's quantize_config.json (quant_method 'gptq') only")
            return GPTQScheme(config, "quantize_config.json")
        return None
    method = qc.get("quant_method")
    if isinstance(method, str) and method.startswith("modelopt"):
        return scheme_from_config(qc, "config.json quantization_config")
    if method not in _METHODS:
        raise ValueError(f"config.json quantization_config.quant_method is {method!r}; jaxq loads "
                         f"{['modelopt'] + sorted(_METHODS)}. Dequantize the checkpoint to bf16 (or re-quantize "
                         "it with jaxq.quantize) to load it")
    return _METHODS[method](qc)


def _object(path: Path) -> Mapping[str, Any]:
    config = read_json(path)
    if not isinstance(config, Mapping):
        raise ValueError(f"{path} is not a JSON object")
    return config


def _modelopt(path: Path, inline: Mapping[str, Any] | None) -> Scheme:
    """hf_quant_config.json's nested config; config.json's inline copy, if any, must name the same algo."""
    config = _object(path)
    producer = (config.get("producer") or {}).get("name")
    if producer != "modelopt":
        raise ValueError(f"{path} producer.name is {producer!r}; jaxq reads hf_quant_config.json written by "
                         "ModelOpt ('modelopt')")
    quantization = config.get("quantization")
    if not isinstance(quantization, Mapping):
        raise ValueError(f"{path} has no 'quantization' object (got {quantization!r})")
    if inline is not None:
        method, algo = inline.get("quant_method"), inline.get("quant_algo")
        if not (isinstance(method, str) and method.startswith("modelopt")) or \
                str(algo).upper() != str(quantization.get("quant_algo")).upper():
            raise ValueError(f"config.json quantization_config (quant_method {method!r}, quant_algo {algo!r}) "
                             f"disagrees with {path.name} (quant_algo {quantization.get('quant_algo')!r}); "
                             "re-export the checkpoint so the two agree")
    return scheme_from_config(quantization, f"{path.name} quantization")
