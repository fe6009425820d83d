"""Raw safetensors files written and edited byte by byte (the helpers the checkpoint tests share), and the
header rules jaxq checks before reading: offsets tile the data section exactly, JSON sizes are bounded."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest

from jaxq.io.hf_checkpoint import read_json
from jaxq.io.safetensors_file import SafetensorsFile

DTYPE_NAMES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16",
               np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3", np.dtype(np.uint8): "U8", np.dtype(np.int32): "I32",
               np.dtype(np.int64): "I64"}


def write_safetensors(path, tensors: dict) -> None:
    """An independent safetensors writer: 8-byte little-endian header length, JSON header, tensors packed in
    order (numpy arrays; bf16 / e4m3 as ml_dtypes)."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        data = array.tobytes()
        header[name] = {"dtype": DTYPE_NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    write_raw(path, header, b"".join(blobs))


def read_raw(path) -> tuple[dict, bytes]:
    """(header dict with __metadata__, data section bytes) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_raw(path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors pads the header to 8 bytes
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def test_writer_round_trips_through_the_reader(tmp_path):
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(5, ml_dtypes.bfloat16),
               "c": np.array([1, 2], np.int32)}
    write_safetensors(tmp_path / "t.safetensors", tensors)
    f = SafetensorsFile(tmp_path / "t.safetensors")
    for name, array in tensors.items():
        assert f.read(name).tobytes() == array.tobytes() and f.dtype_name(name) == DTYPE_NAMES[array.dtype]


@pytest.mark.parametrize("edit, message", [
    (lambda h, d: (h, d + b"\0" * 8), r"cover bytes \[0, 32\) of a 40-byte data section"),
    (lambda h, d: ({**h, "b": {**h["b"], "data_offsets": [20, 36]}}, d[:16] + b"\0" * 4 + d[16:]),
     r"tensor 'b' starts at byte 20 .* 'a' ends at 16"),
], ids=["trailing_bytes", "gap"])
def test_offsets_must_tile_the_data_section(tmp_path, edit, message):
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {"a": np.zeros(4, np.float32), "b": np.zeros(4, np.float32)})
    write_raw(path, *edit(*read_raw(path)))
    with pytest.raises(ValueError, match=message):
        SafetensorsFile(path)


def test_json_files_are_bounded_before_reading(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"pad": "x" * 100}))
    with pytest.raises(ValueError, match=r"above the 64-byte bound"):
        read_json(tmp_path / "config.json", max_bytes=64)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json is not valid JSON"):
        read_json(tmp_path / "bad.json")
