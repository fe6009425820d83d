"""The real ModelOpt / llm-compressor checkpoints in ../shared/fixtures (fixtures/README.md): jaxq's
quantizers reproduce the producers' bytes from the base weights, and every layout round-trips the files."""

import json
import struct

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxq.formats import (compressed_tensors_global_scale, fp8_from_checkpoint, from_compressed_tensors_int4,
                          from_compressed_tensors_nvfp4, from_modelopt_int4, from_modelopt_nvfp4, quantize_fp8,
                          quantize_nvfp4, to_compressed_tensors_int4, to_modelopt_int4)

from . import np_ref
from tests.shared_paths import FIXTURES, requires_fixtures

pytestmark = requires_fixtures

_DTYPES = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F32": np.float32, "U8": np.uint8,
           "I32": np.int32, "I64": np.int64}
# Fused groups share one global amax in ModelOpt's NVFP4 export (and in llm-compressor's global scale).
GROUPS = [("self_attn", ("q_proj", "k_proj", "v_proj")), ("self_attn", ("o_proj",)),
          ("mlp", ("gate_proj", "up_proj")), ("mlp", ("down_proj",))]
LINEARS = [f"model.layers.{i}.{m}.{p}" for i in range(2) for m, ps in GROUPS for p in ps]


def read_safetensors(name):
    """Minimal reader: 8-byte header length, JSON header, raw little-endian data."""
    raw = (FIXTURES / name / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    data = memoryview(raw)[8 + n:]
    return {k: np.frombuffer(data[v["data_offsets"][0]:v["data_offsets"][1]], _DTYPES[v["dtype"]]).reshape(v["shape"])
            for k, v in header.items()}


@pytest.fixture(scope="module")
def base():
    return read_safetensors("base")


def test_nvfp4_quantizer_reproduces_modelopt_bytes(base):
    sd = read_safetensors("modelopt-nvfp4")
    for layer in range(2):
        for module, projs in GROUPS:
            names = [f"model.layers.{layer}.{module}.{p}" for p in projs]
            amax = max(np.abs(np_ref.f32(base[f"{n}.weight"])).max() for n in names)
            for n in names:
                t = quantize_nvfp4(jnp.asarray(base[f"{n}.weight"]), amax)
                ref = from_modelopt_nvfp4(*(jnp.asarray(sd[f"{n}.{s}"]) for s in ("weight", "weight_scale", "weight_scale_2")))
                np.testing.assert_array_equal(np.asarray(t.packed), np.asarray(ref.packed), err_msg=n)
                np.testing.assert_array_equal(np_ref.bits(t.block_scale), np_ref.bits(ref.block_scale), err_msg=n)
                assert np.asarray(t.global_scale) == np.asarray(ref.global_scale), n


@pytest.mark.parametrize("fixture,granularity", [("modelopt-fp8-pcpt", "channel"),
                                                 ("modelopt-fp8-2d-blockwise-wo", "block")])
def test_fp8_quantizer_reproduces_modelopt_bytes(base, fixture, granularity):
    sd = read_safetensors(fixture)
    for n in LINEARS:
        ref = fp8_from_checkpoint(jnp.asarray(sd[f"{n}.weight"]), jnp.asarray(sd[f"{n}.weight_scale"]))
        t = quantize_fp8(jnp.asarray(base[f"{n}.weight"]), granularity)
        assert ref.granularity == granularity
        np.testing.assert_array_equal(np_ref.bits(t.data), np_ref.bits(ref.data), err_msg=n)
        np.testing.assert_array_equal(np.asarray(t.scale), np.asarray(ref.scale), err_msg=n)


def test_compressed_tensors_nvfp4_global_scale_and_dequant(base):
    sd = read_safetensors("llmc-nvfp4a16")
    for module, projs in GROUPS:
        names = [f"model.layers.0.{module}.{p}" for p in projs]
        amax = max(np.abs(np_ref.f32(base[f"{n}.weight"])).max() for n in names)
        for n in names:
            gs = sd[f"{n}.weight_global_scale"]
            assert np.asarray(compressed_tensors_global_scale(amax)) == gs[0], n
            t = from_compressed_tensors_nvfp4(*(jnp.asarray(sd[f"{n}.{s}"]) for s in
                                                ("weight_packed", "weight_scale", "weight_global_scale")))
            packed, scale = sd[f"{n}.weight_packed"], np_ref.f32(sd[f"{n}.weight_scale"])
            values = np_ref.E2M1_TABLE[np_ref.unpack_nibbles(packed)].reshape(*scale.shape, 16)
            np.testing.assert_allclose(np.asarray(t.dequantize()), (values * (scale / gs)[..., None]).reshape(packed.shape[0], -1),
                                       rtol=3e-7, err_msg=n)


def test_modelopt_int4_files_round_trip():
    sd = read_safetensors("modelopt-int4-awq")
    for n in LINEARS:
        weight, scale = sd[f"{n}.weight"], sd[f"{n}.weight_scale"]
        t = from_modelopt_int4(jnp.asarray(weight), jnp.asarray(scale))
        lo, hi = (weight & 0xF).astype(np.int8), (weight >> 4).astype(np.int8)
        q = np.stack([lo, hi], 1).reshape(-1, weight.shape[1])
        q = np.where(q >= 8, q - 16, q).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(t.dequantize()), q * np.repeat(scale, 128, axis=1), err_msg=n)
        np.testing.assert_array_equal(np.asarray(to_modelopt_int4(t)["weight"]), weight, err_msg=n)


@pytest.mark.parametrize("fixture", ["llmc-w4a16-gptq", "llmc-w4a16-awq"])
def test_compressed_tensors_int4_files_round_trip(fixture):
    sd = read_safetensors(fixture)
    for n in LINEARS:
        parts = {s: sd[f"{n}.{s}"] for s in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
                 if f"{n}.{s}" in sd}
        t = from_compressed_tensors_int4(**{k: jnp.asarray(v) for k, v in parts.items()})
        # check_fixtures.py's reading: value j of a word at bits 4j, minus 8; zero points along the output dim
        words = parts["weight_packed"].view(np.uint32)
        q = np.stack([(words >> (4 * j)) & 0xF for j in range(8)], -1).reshape(words.shape[0], -1).astype(np.float32) - 8
        zp = np.zeros(parts["weight_scale"].shape, np.float32)
        if "weight_zero_point" in parts:
            zw = parts["weight_zero_point"].view(np.uint32)
            zp = np.stack([(zw >> (4 * j)) & 0xF for j in range(8)], 1).reshape(-1, zw.shape[1]).astype(np.float32) - 8
        g = np.arange(q.shape[1]) // 128
        expected = (q - zp[:, g]) * np_ref.f32(parts["weight_scale"])[:, g]
        np.testing.assert_array_equal(np.asarray(t.dequantize()), expected, err_msg=n)
        out = to_compressed_tensors_int4(t)
        for name in ("weight_packed", "weight_zero_point"):
            if name in parts:
                np.testing.assert_array_equal(np.asarray(out[name]), parts[name], err_msg=f"{n}.{name}")
        assert np.asarray(out["weight_shape"]).tolist() == parts["weight_shape"].tolist()
