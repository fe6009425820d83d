"""SafetensorsFile reads what the safetensors library writes and refuses malformed headers with clear errors."""
import json
import struct

import ml_dtypes
import pytest
import torch
from safetensors.torch import save_file

from jaxq.io.safetensors_file import SafetensorsFile


def test_reads_what_safetensors_writes(tmp_path):
    tensors = {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(4, 2).to(torch.bfloat16),
        "f8": torch.randn(2, 8).to(torch.float8_e4m3fn),
        "i32": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "u8": torch.arange(5, dtype=torch.uint8),
        "scalar": torch.tensor(0.25),
        "empty": torch.zeros(0, 4),
    }
    save_file(tensors, tmp_path / "t.safetensors", metadata={"format": "pt"})
    f = SafetensorsFile(tmp_path / "t.safetensors")
    assert sorted(f.keys()) == sorted(tensors) and f.metadata == {"format": "pt"}
    as_numpy = {
        torch.bfloat16: lambda t: t.view(torch.int16).numpy().view(ml_dtypes.bfloat16),
        torch.float8_e4m3fn: lambda t: t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn),
    }
    for name, t in tensors.items():
        expected = as_numpy.get(t.dtype, lambda t: t.numpy())(t)
        got = f.read(name)
        assert f.shape(name) == tuple(t.shape) and got.dtype == expected.dtype == f.dtype(name)
        assert got.tobytes() == expected.tobytes(), name


def _raw(path, header, data=b"", header_len=None):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if header_len is None else header_len) + blob + data)
    return path


@pytest.mark.parametrize(
    "header, data, header_len, message",
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 1 << 40, "header length"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, None, "outside the 8-byte"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "needs 12"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None, "overlap"),
        ({"a": {"dtype": "Q4_K", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "unsupported dtype 'Q4_K'"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "invalid shape"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, None, "outside"),
        ([1, 2], b"", None, "not a JSON object"),
    ],
    ids=["huge_header", "past_end", "size_mismatch", "overlap", "dtype", "shape", "reversed", "not_object"],
)
def test_malformed_headers_are_refused(tmp_path, header, data, header_len, message):
    path = _raw(tmp_path / "bad.safetensors", header, data, header_len)
    with pytest.raises(ValueError, match=message) as info:
        SafetensorsFile(path)
    assert str(path) in str(info.value)


def test_not_safetensors(tmp_path):
    (tmp_path / "short").write_bytes(b"abc")
    with pytest.raises(ValueError, match="not a safetensors file"):
        SafetensorsFile(tmp_path / "short")
    (tmp_path / "garbage").write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{]")
    with pytest.raises(ValueError, match="not valid JSON"):
        SafetensorsFile(tmp_path / "garbage")
