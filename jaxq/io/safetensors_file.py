"""A bounded, validating safetensors reader that reads one tensor at a time.

Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets: [begin,
end]}, "__metadata__": {str: str}}, then the data section; offsets are relative to the data section. The
whole header is validated (size bound, dtypes, shapes, offsets inside the file and tiling the data section
exactly, as the safetensors library requires) before any tensor is read, so a corrupt or hostile file fails
with a message instead of a huge allocation.
"""
import json
import math
import os

import ml_dtypes
import numpy as np

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own bound

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class SafetensorsFile:
    """Header of one .safetensors file, validated on open; `read(name)` returns one tensor as numpy.

    Usage: `f = SafetensorsFile(path); for name in f.keys(): f.shape(name), f.dtype(name), f.read(name)`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError(f"{self.path}: not a safetensors file ({size} bytes, shorter than its 8-byte header length)")
            header_len = int.from_bytes(prefix, "little")
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise ValueError(
                    f"{self.path}: header length {header_len} exceeds the file ({size} bytes) or the "
                    f"{MAX_HEADER_BYTES}-byte bound; the file is truncated or not safetensors"
                )
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{self.path}: header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        self._tensors = {name: self._validate(name, info, size - self._data_start) for name, info in header.items()}
        spans = sorted((t[2], t[3], n) for n, t in self._tensors.items() if t[3] > t[2])
        for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
            if begin < end:
                raise ValueError(f"{self.path}: tensors {a!r} and {b!r} overlap in the data section")
            if begin > end:
                raise ValueError(f"{self.path}: tensor {b!r} starts at byte {begin} of the data section but {a!r} "
                                 f"ends at {end}; the offsets must tile the data section without gaps")
        data_end = spans[-1][1] if spans else 0
        if spans and spans[0][0] != 0 or data_end != size - self._data_start:
            raise ValueError(f"{self.path}: the tensors cover bytes [{spans[0][0] if spans else 0}, {data_end}) of a "
                             f"{size - self._data_start}-byte data section; the offsets must tile it exactly (the "
                             "file is truncated, padded or was edited)")

    def _validate(self, name, info, data_size) -> tuple[np.dtype, tuple[int, ...], int, int]:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(info, dict) or info.get("dtype") not in DTYPES:
            dtype = info.get("dtype") if isinstance(info, dict) else info
            raise ValueError(f"{where} has unsupported dtype {dtype!r}; supported: {sorted(DTYPES)}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"{where} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ValueError(f"{where} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        dtype = DTYPES[info["dtype"]]
        nbytes = math.prod(shape) * dtype.itemsize
        if not 0 <= begin <= end <= data_size:
            raise ValueError(f"{where}: data_offsets {offsets} fall outside the {data_size}-byte data section")
        if end - begin != nbytes:
            raise ValueError(f"{where}: data_offsets span {end - begin} bytes but {info['dtype']}{shape} needs {nbytes}")
        return dtype, tuple(shape), begin, end

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensors[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._tensors[name][0]

    def dtype_name(self, name: str) -> str:
        """The safetensors dtype string ("F8_E4M3", "BF16", ...)."""
        return _DTYPE_NAMES[self._tensors[name][0]]

    def read(self, name: str) -> np.ndarray:
        """The tensor as a fresh numpy array (one tensor's worth of host memory; nothing is kept)."""
        dtype, shape, begin, end = self._tensors[name]
        out = np.empty(shape, dtype)
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != end - begin:
                raise ValueError(f"{self.path}: tensor {name!r} is truncated")
        return out
