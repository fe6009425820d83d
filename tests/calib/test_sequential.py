"""Layer-by-layer calibration on a tiny random Llama: each layer sees exactly the inputs the whole model gives
it, GPTQ and AWQ land closer to the unquantized logits than round to nearest, memory is reported, and bad
calibration statistics fall back (AWQ, GPTQ) or are refused (static scales), naming the layer."""
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq.calib.observers import record_inputs
from jaxq.calib.sequential import run_sequential
from jaxq.loaded_model import random_model
from jaxq.nn.quantized_weight import QuantizedWeight
from jaxq.recipes import get_recipe

TINY = dict(architectures=["LlamaForCausalLM"], vocab_size=256, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            tie_word_embeddings=False)
TOKENS = np.random.RandomState(0).randint(0, 256, (8, 64)).astype(np.int32)
KW = dict(calib_data=TOKENS, calib_size=8, calib_seq=64, group_size=32, progress=False)


@pytest.fixture(scope="module")
def tiny():
    """float32 weights; a few embedding channels 20x larger, the outlier channels AWQ exists for."""
    model = random_model(TINY, "float32", seed=1)
    emb = model.params["model"]["embed_tokens"]["weight"]
    params = flax.core.copy(model.params, {})
    params["model"]["embed_tokens"]["weight"] = emb.at[:, ::8].multiply(20.0)
    return model.replace(params=params)


@pytest.fixture(scope="module")
def reference(tiny):
    return jaxq.logits(tiny, TOKENS[:2])


def rel_err(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


GEMMA = dict(architectures=["Gemma3ForCausalLM"], vocab_size=256, hidden_size=64, intermediate_size=128,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16,
             query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention"])


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_each_layer_sees_the_inputs_the_whole_model_gives_it(tiny, arch):
    """Gemma 3 too: scaled embeddings, local and global RoPE, a sliding window shorter than the samples."""
    model = tiny if arch == "llama" else random_model(GEMMA, "float32", seed=2)
    inputs: dict = {}
    with nn.intercept_methods(record_inputs(inputs)):
        model.module.apply({"params": model.params}, jnp.asarray(TOKENS))
    seen = []

    def identity(i, params, stats):
        seen.append(i)
        for name in ("self_attn.q_proj", "mlp.down_proj"):
            x = inputs[f"model.layers.{i}.{name}"][0].reshape(-1, stats[name].amax.shape[0])
            assert stats[name].count == TOKENS.size
            np.testing.assert_allclose(stats[name].amax, jnp.max(jnp.abs(x), 0), rtol=1e-5)
            np.testing.assert_allclose(stats[name].second_moment, x.T @ x / len(x), rtol=1e-4, atol=1e-5)
        return params

    layers = run_sequential(model, TOKENS, identity, lambda i: {"self_attn.q_proj": True, "mlp.down_proj": True},
                            propagate="float", batch_size=3)
    assert seen == [0, 1] and len(layers) == 2


@pytest.mark.parametrize("recipe", ["w4a16_gptq", "w4a8_awq"])
def test_calibrated_quantization_beats_round_to_nearest(tiny, reference, recipe):
    q, report = jaxq.quantize(tiny, recipe, return_report=True, **KW)
    rtn = jaxq.quantize(tiny, get_recipe(recipe, algorithm="max"), **KW)
    got = jaxq.logits(q, TOKENS[:2])
    assert bool(jnp.all(jnp.isfinite(got)))
    assert rel_err(got, reference) < 0.9 * rel_err(jaxq.logits(rtn, TOKENS[:2]), reference)
    assert report.calibration.startswith("8 x 64 tokens, layer by layer, quantized")
    assert report.host_peak_rise is not None and "x the bf16 model" in str(report)
    qw = q.params["model"]["layers_1"]["self_attn"]["q_proj"]["weight"]
    assert isinstance(qw, QuantizedWeight) and qw.weight.group_size == 32
    if "awq" in recipe:  # ModelOpt's convention: q/k/v smoothing folded into the norm, o_proj keeps its own
        assert qw.pre_quant_scale is None
        assert q.params["model"]["layers_1"]["self_attn"]["o_proj"]["weight"].pre_quant_scale is not None
        assert not np.allclose(q.params["model"]["layers_1"]["input_layernorm"]["weight"],
                               tiny.params["model"]["layers_1"]["input_layernorm"]["weight"])


def test_non_finite_calibration_falls_back_or_is_refused_naming_the_layer(tiny, caplog):
    params = flax.core.copy(tiny.params, {})
    down = params["model"]["layers_0"]["mlp"]["down_proj"]["weight"]
    params["model"]["layers_0"]["mlp"]["down_proj"]["weight"] = down.at[0, 0].set(jnp.inf)
    broken = tiny.replace(params=params)
    keep = [r"layers\.0\.mlp\.down_proj"]
    for recipe, algorithm in (("w4a16_gptq", "GPTQ"), ("w4a16_awq", "AWQ")):
        q, report = jaxq.quantize(broken, recipe, exclude=keep, return_report=True, **KW)
        assert any("model.layers.1.self_attn.q_proj" in n and "rounded to nearest" in n for n in report.notes)
        qw = q.params["model"]["layers_1"]["self_attn"]["q_proj"]["weight"]
        assert np.all(np.isfinite(np.asarray(qw.weight.scale))), algorithm
    with pytest.raises(ValueError, match=r"layer model\.layers\.1\.self_attn\.q_proj: its calibration input has"):
        jaxq.quantize(broken, "fp8", exclude=keep, **dict(KW, group_size=None))
