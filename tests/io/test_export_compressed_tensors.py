"""jaxq's compressed-tensors exports decompress with the compressed-tensors package itself (llm-compressor's
and vLLM's decompressor) to jaxq's own dequantized weights: INT4 symmetric / asymmetric / act-order / per
channel, FP8 per tensor / channel / block, NVFP4, and AWQ-calibrated INT4 / NVFP4 quantized with
AWQConfig(fold="foldable") (no pre_quant_scale), which also load back to the in-memory model's logits."""

import json
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq.calib import AWQConfig
from jaxq.formats import quantize_int4
from jaxq.io.export.compressed_tensors import AWQ_FOLD
from jaxq.nn.quantized_weight import QuantizedWeight
from jaxq.recipes import get_recipe

# torch and compressed-tensors are in the test extra: a missing one must fail, not skip.
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationScheme  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tests.shared_paths import FIXTURES, requires_fixtures

pytestmark = requires_fixtures
RTN = dict(algorithm="max")
# recipe, and the bound on |decompressed - jaxq| relative to max |W| (0: bit for bit)
CASES = {
    "int4_sym": (get_recipe("w4a16_gptq", **RTN, group_size=64), 0.0),
    "int4_asym": (get_recipe("w4a16_gptq", **RTN, symmetric=False), 0.0),
    "int4_per_channel": (get_recipe("w4a16_awq", **RTN, weight_granularity="channel", group_size=-1), 0.0),
    "fp8": (get_recipe("fp8"), 0.0),
    "fp8_rowwise": (get_recipe("fp8_rowwise"), 0.0),
    "fp8_block": (get_recipe("fp8_block"), 0.0),
    # compressed-tensors decompresses NVFP4 in bf16 (unpack_fp4_from_uint8's default dtype), dividing by the
    # reciprocal global scale: within two bf16 roundings of jaxq's float32 e2m1 * scale * global_scale
    "nvfp4": (get_recipe("nvfp4", activation="none"), 2**-7),
    "int4_awq_sym": (get_recipe("w4a16_awq", group_size=64), 0.0),
    "int4_awq_asym": (get_recipe("w4a16_awq", group_size=64, symmetric=False), 0.0),
    "nvfp4_awq": (get_recipe("nvfp4", algorithm="awq", activation="none"), 2**-7),
}
INT4_AWQ = {name: recipe for name, (recipe, _) in CASES.items() if recipe.algorithm == "awq" and
            recipe.weight_format == "int4"}


@pytest.fixture(scope="module")
def base():
    return jaxq.load(FIXTURES / "base")


def quantize(base, recipe, tokens=None):
    """base quantized with `recipe`, AWQ recipes with the fold compressed-tensors can store."""
    if tokens is None:
        tokens = np.load(FIXTURES / "base" / "reference_logits.npz")["input_ids"].astype(np.int32)
    return jaxq.quantize(base, recipe, calib_data=tokens, calib_size=2, calib_seq=64, awq=AWQConfig(fold=AWQ_FOLD),
                         progress=False)


def decompressed(directory: Path) -> dict[str, np.ndarray]:
    """{module: float32 weight} as compressed-tensors' own compressor for each config group decompresses it."""
    config = json.loads((directory / "config.json").read_text())["quantization_config"]
    tensors = load_file(directory / "model.safetensors")
    groups = list(config["config_groups"].values())
    modules = sorted({n.rpartition(".")[0] for n in tensors if n.endswith(("weight_scale", "weight_packed"))})
    out = {}
    for module in modules:  # a group names its modules, or all of them ("Linear") when it is the only one
        group = next(g for g in groups if module in g["targets"] or g["targets"] == ["Linear"])
        compressor = BaseCompressor.get_value_from_registry(group["format"])
        local = {n[len(module) + 1:]: t for n, t in tensors.items() if n.rpartition(".")[0] == module}
        out[module] = compressor.decompress(local, QuantizationScheme.model_validate(group))["weight"].float().numpy()
    return out


def jaxq_weights(model) -> dict[str, np.ndarray]:
    flat = flax.traverse_util.flatten_dict(model.params)
    return {".".join(p[:-1]).replace("layers_", "layers."): np.asarray(w.weight.dequantize(jnp.float32))
            for p, w in flat.items() if isinstance(w, QuantizedWeight)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_compressed_tensors_decompresses_to_jaxq_weights(base, name, tmp_path):
    recipe, bound = CASES[name]
    q = quantize(base, recipe)
    jaxq.export(q, tmp_path / "ct", format="compressed-tensors", progress=False)
    got, want = decompressed(tmp_path / "ct"), jaxq_weights(q)
    assert sorted(got) == sorted(want) and len(want) == 14
    for module, w in want.items():
        err = np.max(np.abs(got[module] - w)) / np.max(np.abs(w))
        assert err <= bound, f"{module}: |compressed-tensors - jaxq| / max|W| = {err}"


def test_act_order_g_idx(base, tmp_path):
    """GPTQ act-order (weight_g_idx, actorder "group"): here one layer gets a permuted g_idx. compressed-tensors
    0.19 no longer reads actorder "group" (its QuantizationArgs refuse it, and its decompressor ignores g_idx), so
    this checks jaxq's own reading: check passes and the logits are the in-memory model's."""
    q = quantize(base, get_recipe("w4a16_gptq", **RTN, group_size=64))
    layer = q.params["model"]["layers_0"]["mlp"]["down_proj"]
    k = layer["weight"].shape[-1]
    g_idx = (np.random.RandomState(0).permutation(k) // 64).astype(np.int32)
    w = np.asarray(layer["weight"].weight.dequantize(jnp.float32))
    layer["weight"] = layer["weight"].replace(weight=quantize_int4(w, 64, scheme="gptq", g_idx=g_idx),
                                              recipe=layer["weight"].recipe.replace(algorithm="gptq", act_order=True))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj.*act-order g_idx.*compressed-tensors"):
        jaxq.export(q, tmp_path / "mo", format="modelopt", progress=False)
    jaxq.export(q, tmp_path / "ct", format="compressed-tensors", progress=False)
    assert jaxq.check(tmp_path / "ct") == []
    tokens = np.load(FIXTURES / "base" / "reference_logits.npz")["input_ids"].astype(np.int32)
    np.testing.assert_array_equal(np.asarray(jaxq.logits(jaxq.load(tmp_path / "ct"), tokens)),
                                  np.asarray(jaxq.logits(q, tokens)))


@pytest.mark.parametrize("name", sorted(INT4_AWQ))
def test_awq_model_exports_and_loads_back(base, name, tmp_path):
    """INT4 AWQ on random calibration tokens, fold "foldable": on this GQA model o_proj is not smoothed, nothing
    keeps a pre_quant_scale, and the export loads back to the in-memory model's logits bit for bit."""
    rng = np.random.default_rng(606)
    calib, tokens = (rng.integers(0, base.config.vocab_size, (n, 64)).astype(np.int32) for n in (2, 3))
    q = quantize(base, INT4_AWQ[name], calib)
    weights = [w for w in jax.tree.leaves(q.params, is_leaf=lambda x: isinstance(x, QuantizedWeight))
               if isinstance(w, QuantizedWeight)]
    assert len(weights) == 14 and all(w.pre_quant_scale is None for w in weights)
    jaxq.export(q, tmp_path / "ct", format="compressed-tensors", progress=False)
    assert jaxq.check(tmp_path / "ct") == []
    loaded = jaxq.load(tmp_path / "ct")
    np.testing.assert_array_equal(np.asarray(jaxq.logits(loaded, tokens)), np.asarray(jaxq.logits(q, tokens)))
