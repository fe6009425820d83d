"""jaxq.export: every recipe x format that has a layout round-trips (jaxq check passes, jaxq.load gives the
in-memory quantized model's logits bit for bit, KV scales as calibrated); the combinations without a layout
raise naming the layer before anything is written.

The model is the fixtures' tiny Llama (../shared/fixtures/base: same sizes as the producers' fixtures, a real
tokenizer), quantized by jaxq.quantize: round to nearest ("_rtn"), AWQ (pre_quant_scale on o_proj/down_proj,
the rest folded into the norms) and GPTQ.
"""


import jax
import numpy as np
import pytest

import jaxq
from jaxq.formats import exact_divide
from jaxq.io.export.compressed_tensors import invertible_reciprocal
from jaxq.nn.quantized_weight import QuantizedWeight
from jaxq.recipes import get_recipe
from tests.shared_paths import FIXTURES, requires_fixtures

pytestmark = requires_fixtures

RTN = dict(algorithm="max")
Q = r"self_attn\.q_proj: .*"
PQS = r"self_attn\.o_proj: .*a pre_quant_scale"  # AWQ keeps o_proj's smoothing apart (GQA: no v_proj fold)
# name -> (recipe, kv_cache, {format: regex of the refusal (layer 0's module and why)}; absent: round-trips)
CASES = {
    "fp8": (get_recipe("fp8"), "fp8", {}),
    "fp8_rowwise": (get_recipe("fp8_rowwise"), None, {}),
    "fp8_block": (get_recipe("fp8_block"), None, {}),
    "nvfp4": (get_recipe("nvfp4"), "fp8", {}),
    "nvfp4_weight_only": (get_recipe("nvfp4", activation="none"), None, {}),
    "nvfp4_awq": (get_recipe("nvfp4", algorithm="awq"), "fp8", {"compressed-tensors": PQS}),
    "mxfp4": (get_recipe("mxfp4"), None, {"compressed-tensors": Q + "MXFP4Tensor weights"}),
    "mxfp4_w4a8": (get_recipe("mxfp4", activation="fp8_static"), None, {"compressed-tensors": Q + "MXFP4Tensor"}),
    "w4a16_awq_rtn": (get_recipe("w4a16_awq", **RTN), None, {}),
    "w4a16_awq": (get_recipe("w4a16_awq"), None, {"compressed-tensors": PQS}),
    "w4a8_awq_rtn": (get_recipe("w4a8_awq", **RTN), "fp8", {"compressed-tensors": Q + "activation 'fp8_static'"}),
    "w4a16_gptq_rtn": (get_recipe("w4a16_gptq", **RTN, group_size=64), None, {}),
    "w4a16_gptq": (get_recipe("w4a16_gptq"), None, {}),
    "w4a16_gptq_asym_rtn": (get_recipe("w4a16_gptq", **RTN, symmetric=False), None,
                            {"modelopt": Q + "zero points .*format='compressed-tensors'"}),
    "w4a8_gptq_rtn": (get_recipe("w4a8_gptq", **RTN), None, {"compressed-tensors": Q + "activation 'fp8_static'"}),
}
FORMATS = ("modelopt", "compressed-tensors")
MATRIX = [(name, fmt) for name in CASES for fmt in FORMATS]


@pytest.fixture(scope="module")
def base():
    return jaxq.load(FIXTURES / "base")


@pytest.fixture(scope="module")
def tokens():
    return np.load(FIXTURES / "base" / "reference_logits.npz")["input_ids"].astype(np.int32)


_QUANTIZED = {}


def quantized(base, tokens, name):
    if name not in _QUANTIZED:
        recipe, kv, _ = CASES[name]
        _QUANTIZED[name] = jaxq.quantize(base, recipe, calib_data=tokens, calib_size=2, calib_seq=64, kv_cache=kv,
                                         progress=False)
    return _QUANTIZED[name]


def logits(model, tokens):
    return np.asarray(jaxq.logits(model, tokens))


def assert_same_logits(got, want, tokens):
    np.testing.assert_array_equal(logits(got, tokens), logits(want, tokens))


@pytest.mark.parametrize("name,fmt", MATRIX, ids=[f"{n}-{f}" for n, f in MATRIX])
def test_export_round_trips_or_refuses(base, tokens, name, fmt, tmp_path):
    q = quantized(base, tokens, name)
    refusal = CASES[name][2].get(fmt)
    out = tmp_path / "out"
    if refusal is not None:
        with pytest.raises(ValueError, match=rf"layer model\.layers\.0\.{refusal}"):
            jaxq.export(q, out, format=fmt, progress=False)
        assert not out.exists()
        return
    jaxq.export(q, out, format=fmt, progress=False)
    assert jaxq.check(out) == []
    loaded = jaxq.load(out)
    assert_same_logits(loaded, as_loaded(q, name, fmt), tokens)
    if q.kv_scales is not None:
        for got, expected in zip(loaded.kv_scales, q.kv_scales):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    assert loaded.tokenizer is not None and loaded.eos_token_ids == base.eos_token_ids


def as_loaded(model, name, fmt):
    """What the checkpoint holds by definition of its format, where that is not the in-memory model itself:
    ModelOpt's fp8_pb_wo is weight-only (jaxq.load runs it without the 1x128 activations), and compressed-tensors
    stores NVFP4 global scales as reciprocals (1 / (1 / s) is s bit for bit only when some float32 reciprocal
    inverts exactly, else one ulp off; on this model one layer's input_scale has none)."""
    def swap(qw):
        if not isinstance(qw, QuantizedWeight):
            return qw
        if fmt == "modelopt" and name == "fp8_block":
            return qw.replace(recipe=qw.recipe.replace(activation="none"))
        if fmt == "compressed-tensors" and qw.recipe.weight_format == "nvfp4":
            round_trip = lambda s: None if s is None else exact_divide(1.0, invertible_reciprocal(s))
            return qw.replace(weight=qw.weight.replace(global_scale=round_trip(qw.weight.global_scale)),
                              input_scale=round_trip(qw.input_scale))
        return qw

    return model.replace(params=jax.tree.map(swap, model.params, is_leaf=lambda x: isinstance(x, QuantizedWeight)))
