"""Streaming, sharded safetensors writer for exporters.

A checkpoint is a sequence of `Unit`s (one module's tensors each: a quantized linear's weight and scales, a
norm, the KV scales). `plan` produces every unit once to learn each tensor's dtype and shape and to refuse
bad scales before anything is written; `write` produces them again, one unit at a time, and streams the bytes
into shards, so the host holds one module's tensors at a time, never a second copy of the model.

On disk: model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json
({"metadata": {"total_size"}, "weight_map": {tensor: file}}) when the data exceeds max_shard_bytes, as
transformers writes them. Each file: 8-byte little-endian header length, the JSON header ({name: {dtype,
shape, data_offsets}}, "__metadata__": {"format": "pt", ...}) padded with spaces to a multiple of 8, then the
tensors back to back, in header order (what jaxq.io.safetensors_file reads and validates).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np

from jaxq.io.quantized.scheme import e8m0_finite, finite_nonzero
from jaxq.io.safetensors_file import DTYPES

log = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size "5GB"
INDEX = "model.safetensors.index.json"
# Tensor roles that are dequantization multipliers: they must be finite and non-zero on disk (jaxq check and
# every loader rely on it). A U8 weight_scale is MXFP4's E8M0 exponent byte (255 = NaN).
SCALE_ROLES = ("weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale", "weight_global_scale",
               "input_global_scale", "k_scale", "v_scale")
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class Unit:
    """The tensors of one module: produce() -> {checkpoint tensor name: array} (jax or numpy), called twice."""

    module: str
    produce: Callable[[], Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def plan(units: list[Unit], progress: bool = True) -> list[list[TensorInfo]]:
    """Per unit, its tensors' dtypes and shapes; ValueError naming every bad scale before anything is written."""
    from tqdm.auto import tqdm

    infos, problems = [], []
    for unit in tqdm(units, desc="export: check", unit="module", disable=not progress):
        infos.append([])
        for name, array in unit.produce().items():
            dtype = np.dtype(array.dtype)
            if dtype not in _DTYPE_NAMES:
                raise ValueError(f"{unit.module}: tensor {name} has dtype {dtype}, which safetensors cannot store")
            if name.rpartition(".")[2] in SCALE_ROLES:
                bad = (e8m0_finite if dtype == np.uint8 else finite_nonzero)(np.asarray(jax.device_get(array)))
                if bad:
                    problems.append(f"{name} {bad}")
            infos[-1].append(TensorInfo(name, _DTYPE_NAMES[dtype], tuple(array.shape),
                                        math.prod(array.shape) * dtype.itemsize))
    if problems:
        raise ValueError(f"refusing to export {len(problems)} bad scale tensor(s) (nothing was written):\n  "
                         + "\n  ".join(problems) + "\nre-quantize or re-calibrate those layers")
    return infos


def write(directory: Path, units: list[Unit], infos: list[list[TensorInfo]],
          max_shard_bytes: int = DEFAULT_SHARD_BYTES, metadata: Mapping[str, str] | None = None,
          progress: bool = True) -> list[Path]:
    """Write the planned tensors (shards of at most max_shard_bytes of data; a larger tensor gets its own).
    Returns the files written."""
    from tqdm.auto import tqdm

    flat = [info for unit_infos in infos for info in unit_infos]
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for info in flat:
        if shards[-1] and size + info.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    shard_of = {info.name: i for i, shard in enumerate(shards) for info in shard}
    header_meta = {"format": "pt", **(metadata or {})}
    files = [directory / n for n in names]
    handles: dict[int, Any] = {}
    bar = tqdm(total=sum(i.nbytes for i in flat), desc="export: write", unit="B", unit_scale=True,
               disable=not progress)
    try:
        for unit, unit_infos in zip(units, infos):
            tensors = unit.produce()
            for info in unit_infos:
                i = shard_of[info.name]
                if i not in handles:  # shards are filled in order: the previous one is complete
                    for done in list(handles):
                        handles.pop(done).close()
                    handles[i] = open(files[i], "wb")
                    handles[i].write(_header(shards[i], header_meta))
                array = np.asarray(jax.device_get(tensors[info.name]), order="C")
                if (array.dtype, array.shape) != (DTYPES[info.dtype], info.shape):
                    raise RuntimeError(f"{unit.module}: tensor {info.name} changed between planning and writing")
                handles[i].write(memoryview(array.reshape(-1).view(np.uint8)))
                bar.update(info.nbytes)
    finally:
        for handle in handles.values():
            handle.close()
        bar.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(i.nbytes for i in flat)},
                 "weight_map": {info.name: names[shard_of[info.name]] for info in flat}}
        (directory / INDEX).write_text(json.dumps(index, indent=2))
        files.append(directory / INDEX)
    log.info("wrote %d tensors (%.1f MB) to %d safetensors file(s) in %s", len(flat),
             sum(i.nbytes for i in flat) / 1e6, len(shards), directory)
    return files


def _header(shard: list[TensorInfo], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for info in shard:
        header[info.name] = {"dtype": info.dtype, "shape": list(info.shape),
                             "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the safetensors library aligns the data section to 8 bytes
    return len(text).to_bytes(8, "little") + text
