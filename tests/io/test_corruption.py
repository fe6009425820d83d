"""A real fixture copied to tmp_path and corrupted one way at a time: `jaxq check` reports a problem naming the
tensor (or file, or config entry) and jaxq.load refuses with the same message (a CheckpointError raised before
any weight is converted, never an error from inside jax)."""

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

import jaxq
from jaxq.io.check import CheckpointError

from .test_check_headers import read_raw, write_raw
from tests.shared_paths import FIXTURES, requires_fixtures

pytestmark = requires_fixtures
Q = "model.layers.0.self_attn.q_proj"


def _copy(tmp_path, name="modelopt-fp8") -> Path:
    path = tmp_path / name
    shutil.copytree(FIXTURES / name, path)
    return path


def _edit(path: Path, edit) -> None:
    """edit(header, data: bytearray) on model.safetensors in place."""
    header, data = read_raw(path / "model.safetensors")
    data = bytearray(data)
    edit(header, data)
    write_raw(path / "model.safetensors", header, bytes(data))


def _drop(name):
    """Remove a tensor and its bytes, shifting the later offsets so the file stays well formed."""
    def edit(header, data):
        begin, end = header.pop(name)["data_offsets"]
        del data[begin:end]
        for info in header.values():
            if isinstance(info, dict) and "data_offsets" in info and info["data_offsets"][0] >= end:
                info["data_offsets"] = [o - (end - begin) for o in info["data_offsets"]]
    return edit


def _set_f32(name, value):
    def edit(header, data):
        begin, _ = header[name]["data_offsets"]
        data[begin:begin + 4] = struct.pack("<f", value)
    return edit


def _set(name, key, value):
    def edit(header, data):
        header[name][key] = value
    return edit


def _assert_refused(path, *parts):
    """check() names every part in one problem, and load refuses with a message that has them too."""
    problems = jaxq.check(path)
    assert any(all(p in str(problem) for p in parts) for problem in problems), problems
    with pytest.raises(CheckpointError) as info:
        jaxq.load(path)
    assert all(p in str(info.value) for p in parts)


def test_the_uncorrupted_copy_is_clean(tmp_path):
    assert jaxq.check(_copy(tmp_path)) == []


def test_deleted_scale(tmp_path):
    path = _copy(tmp_path)
    _edit(path, _drop(f"{Q}.weight_scale"))
    _assert_refused(path, f"{Q}.weight_scale", "missing", "weight_scale")


def test_deleted_kv_scale(tmp_path):
    path = _copy(tmp_path)
    _edit(path, _drop("model.layers.1.self_attn.v_proj.v_scale"))
    _assert_refused(path, "layer 1 v_scale", "missing")


def test_offsets_past_the_end_of_the_file(tmp_path):
    path = _copy(tmp_path)
    size = (path / "model.safetensors").stat().st_size
    _edit(path, _set(f"{Q}.weight", "data_offsets", [size, size + 256 * 256]))
    _assert_refused(path, f"'{Q}.weight'", "outside")


def test_pickle_file_next_to_safetensors(tmp_path):
    path = _copy(tmp_path)
    (path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")  # never opened, let alone unpickled
    _assert_refused(path, "pytorch_model.bin", "pickle", "safetensors")


@pytest.mark.parametrize("value, word", [(float("nan"), "NaN"), (0.0, "zero")])
def test_scale_nan_or_zero(tmp_path, value, word):
    path = _copy(tmp_path)
    _edit(path, _set_f32(f"{Q}.weight_scale", value))
    _edit(path, _set_f32("model.layers.1.mlp.up_proj.input_scale", value))
    problems = [str(p) for p in jaxq.check(path)]
    for name in (f"{Q}.weight_scale", "model.layers.1.mlp.up_proj.input_scale"):  # every offending tensor
        assert any(name in p and word in p for p in problems), problems
    _assert_refused(path, f"{Q}.weight_scale", word)


def test_truncated_file(tmp_path):
    path = _copy(tmp_path)
    with open(path / "model.safetensors", "r+b") as f:
        f.truncate((path / "model.safetensors").stat().st_size - 1000)
    header, _ = read_raw(FIXTURES / "modelopt-fp8" / "model.safetensors")
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    _assert_refused(path, f"'{last}'", "outside")


def test_changed_shape(tmp_path):
    path = _copy(tmp_path)
    _edit(path, _set("model.layers.0.self_attn.k_proj.weight", "shape", [256, 128]))  # same bytes
    _assert_refused(path, "model.layers.0.self_attn.k_proj.weight", "[256, 128]", "expected [128, 256]")


def test_group_scale_with_the_wrong_shape(tmp_path):
    path = _copy(tmp_path, "modelopt-w4a8-awq")
    _edit(path, _set("model.layers.0.mlp.up_proj.weight_scale", "shape", [256, 4]))  # 512 x 2 groups of 128
    _assert_refused(path, "model.layers.0.mlp.up_proj.weight_scale", "[256, 4]", "expected [512, 2]", "G = 128")


def test_renamed_exclude_entry(tmp_path):
    path = _copy(tmp_path)
    config = json.loads((path / "hf_quant_config.json").read_text())
    config["quantization"]["exclude_modules"] = ["lm_heads", "model.embed_tokens"]
    (path / "hf_quant_config.json").write_text(json.dumps(config))
    _assert_refused(path, "exclude_modules", "'lm_heads' matches no module")
    # ...and lm_head, no longer excluded, is a bf16 weight where FP8 is declared
    assert any("lm_head.weight" in str(p) and "F8_E4M3" in str(p) for p in jaxq.check(path))


def test_weight_with_a_stray_quantization_tensor(tmp_path):
    path = _copy(tmp_path)
    _edit(path, _set("model.layers.0.self_attn.k_proj.k_scale", "dtype", "I32"))
    _assert_refused(path, "model.layers.0.self_attn.k_proj.k_scale", "expected one F32 value")
    path = _copy(tmp_path / "second")
    header, data = read_raw(path / "model.safetensors")
    header["lm_head.weight_scale"] = {"dtype": "F32", "shape": [], "data_offsets": [len(data), len(data) + 4]}
    write_raw(path / "model.safetensors", header, data + np.float32(1).tobytes())
    _assert_refused(path, "lm_head.weight_scale", "leaves lm_head unquantized", "'lm_head'")
