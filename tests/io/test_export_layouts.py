"""jaxq.export writes what the real producers write: re-exporting a producer's fixture reproduces its tensors
(names, dtypes, shapes, bytes) and its JSON configs; a fresh jaxq.quantize export of the fixtures' base model
has the producers' tensor names, dtypes and shapes and JSON configs."""

import json
from pathlib import Path

import numpy as np
import pytest

import jaxq
from jaxq.io.safetensors_file import SafetensorsFile
from jaxq.recipes import get_recipe
from tests.shared_paths import FIXTURES, requires_fixtures

pytestmark = requires_fixtures
FORMAT = {"modelopt": "modelopt", "llmc": "compressed-tensors"}
REEXPORTED = ["modelopt-fp8", "modelopt-fp8-pcpt", "modelopt-fp8-2d-blockwise-wo", "modelopt-nvfp4",
              "modelopt-int4-awq", "modelopt-w4a8-awq", "llmc-w4a16-gptq", "llmc-w4a16-awq", "llmc-fp8-dynamic"]
# ModelOpt fixture -> the jaxq recipe (and KV cache) ModelOpt's config corresponds to
FRESH = {
    "modelopt-fp8": (get_recipe("fp8"), "fp8"),
    "modelopt-fp8-pcpt": (get_recipe("fp8_rowwise"), "fp8"),
    "modelopt-fp8-2d-blockwise-wo": (get_recipe("fp8_block", activation="none"), None),
    "modelopt-nvfp4": (get_recipe("nvfp4"), "fp8"),
    "modelopt-int4-awq": (get_recipe("w4a16_awq", algorithm="max"), None),
    "modelopt-w4a8-awq": (get_recipe("w4a8_awq", algorithm="max"), "fp8"),
}


def tensors(directory: Path) -> dict[str, SafetensorsFile]:
    files = [SafetensorsFile(p) for p in sorted(directory.glob("*.safetensors"))]
    return {name: f for f in files for name in f.keys()}


def quantization_config(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())["quantization_config"]


def without_actorder(config: dict) -> dict:
    """llm-compressor records GPTQ's within-solver ordering ("static"); jaxq has no such notion (None)."""
    config = json.loads(json.dumps(config))
    for group in config.get("config_groups", {}).values():
        group.get("weights", {}).pop("actorder", None)
    return config


@pytest.mark.parametrize("name", REEXPORTED)
def test_reexported_fixture_is_the_producers_checkpoint(name, tmp_path):
    out = jaxq.export(jaxq.load(FIXTURES / name), tmp_path / name, format=FORMAT[name.split("-")[0]],
                      progress=False)
    got, want = tensors(out), tensors(FIXTURES / name)
    assert sorted(got) == sorted(want)
    for n, f in want.items():
        assert got[n].shape(n) == f.shape(n), n
        if got[n].dtype_name(n) == f.dtype_name(n):
            np.testing.assert_array_equal(got[n].read(n).reshape(-1).view(np.uint8),
                                          f.read(n).reshape(-1).view(np.uint8), err_msg=n)
        else:  # FP8Tensor keeps float32 scales: llm-compressor's bf16 channel scales come back upcast, exactly
            assert (got[n].dtype_name(n), f.dtype_name(n)) == ("F32", "BF16"), n
            np.testing.assert_array_equal(got[n].read(n), f.read(n).astype(np.float32), err_msg=n)
    if name.startswith("modelopt"):
        for file in ("hf_quant_config.json", "config.json"):
            got_json, want_json = (json.loads((d / file).read_text()) for d in (out, FIXTURES / name))
            if file == "config.json":
                got_json, want_json = got_json["quantization_config"], want_json["quantization_config"]
            assert got_json == want_json, file
    else:
        assert without_actorder(quantization_config(out)) == without_actorder(quantization_config(FIXTURES / name))
    assert jaxq.check(out) == []


@pytest.fixture(scope="module")
def base():
    return jaxq.load(FIXTURES / "base")


@pytest.mark.parametrize("name", sorted(FRESH))
def test_fresh_modelopt_export_has_the_fixture_layout(base, name, tmp_path):
    recipe, kv = FRESH[name]
    tokens = np.load(FIXTURES / "base" / "reference_logits.npz")["input_ids"].astype(np.int32)
    q = jaxq.quantize(base, recipe, calib_data=tokens, calib_size=2, calib_seq=64, kv_cache=kv, progress=False)
    out = jaxq.export(q, tmp_path / name, format="modelopt", progress=False)
    got, want = tensors(out), tensors(FIXTURES / name)
    assert {n: (f.dtype_name(n), f.shape(n)) for n, f in got.items()} == \
           {n: (f.dtype_name(n), f.shape(n)) for n, f in want.items()}
    assert json.loads((out / "hf_quant_config.json").read_text()) == \
           json.loads((FIXTURES / name / "hf_quant_config.json").read_text())
    assert quantization_config(out) == quantization_config(FIXTURES / name)
    for file in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / file).exists(), file
