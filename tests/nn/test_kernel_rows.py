"""kernel_dispatch.with_kernel_rows: which QuantizedWeights get the Mosaic kernels' scale rows, what the rows
hold, that replace() drops stale ones, and that LoadedModel.run_params builds them once. On a CPU
with_kernel_rows is the identity; here the Hopper check is patched so its selection runs (the rows are plain
jnp). On a GPU, tests/nn/test_qdense_recipes.py checks that prepared weights give the same output."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.formats import FP8Tensor, Int4Tensor
from jaxq.nn import kernel_dispatch
from jaxq.nn.quantized_weight import QuantizedWeight
from jaxq.recipes import get_recipe
from pallas_kernels import _mgpu


def _int4(rng, n, k, group, zero=False, stacked=False):
    lead = (2,) if stacked else ()
    packed = jnp.asarray(rng.integers(0, 256, (*lead, n, k // 2)), jnp.uint8)
    scale = jnp.asarray(rng.uniform(1e-3, 1e-2, (*lead, n, k // group)), jnp.float32)
    z = jnp.asarray(rng.integers(0, 16, (*lead, n, k // group)), jnp.uint8) if zero else None
    return Int4Tensor(packed, scale, group, z)


@pytest.fixture
def hopper(monkeypatch):
    monkeypatch.setattr(_mgpu, "is_hopper", lambda: True)


def test_rows_go_to_the_weights_the_mosaic_kernels_take(hopper):
    rng = np.random.default_rng(0)
    w4a16 = get_recipe("w4a16_awq", group_size=64)
    w4a8 = get_recipe("w4a8_awq")
    params = {
        "sym": QuantizedWeight(w4a16, _int4(rng, 256, 512, 64)),
        "asym": QuantizedWeight(get_recipe("w4a16_gptq", group_size=32, symmetric=False),
                                _int4(rng, 128, 256, 32, zero=True)),
        "w4a8": QuantizedWeight(w4a8, _int4(rng, 256, 512, 128), jnp.float32(0.02),
                                weight_scale_2=jnp.float32(0.1)),
        "odd_n": QuantizedWeight(w4a16, _int4(rng, 200, 512, 64)),             # N off the 128-channel tile
        "odd_k": QuantizedWeight(w4a16, _int4(rng, 256, 192, 64)),             # K off the 128-K step
        "per_channel": QuantizedWeight(get_recipe("w4a16_gptq", weight_granularity="channel", group_size=-1),
                                       _int4(rng, 256, 512, 512)),
        "experts": QuantizedWeight(w4a16, _int4(rng, 256, 512, 64, stacked=True)),
        "w4a8_g64": QuantizedWeight(get_recipe("w4a8_awq", group_size=64), _int4(rng, 256, 512, 64),
                                    jnp.float32(0.02), weight_scale_2=jnp.float32(0.1)),
        "fp8": QuantizedWeight(get_recipe("fp8"), FP8Tensor(jnp.zeros((256, 512), jnp.float8_e4m3fn),
                                                            jnp.float32(1.0), "tensor"), jnp.float32(1.0)),
    }
    out = kernel_dispatch.with_kernel_rows(params)
    prepared = {name for name, w in out.items() if w.kernel_rows is not None}
    assert prepared == {"sym", "asym", "w4a8"}
    (s,) = out["sym"].kernel_rows
    assert s.shape == (8, 256) and s.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(s, np.float32),
                                  np.asarray(params["sym"].weight.scale.astype(jnp.bfloat16), np.float32).T)
    s, z = out["asym"].kernel_rows
    np.testing.assert_array_equal(np.asarray(z, np.float32), np.asarray(params["asym"].weight.zero, np.float32).T - 8)
    (r,) = out["w4a8"].kernel_rows
    np.testing.assert_allclose(np.asarray(r), np.asarray(params["w4a8"].weight.scale).T * np.float32(0.02), rtol=1e-7)
    assert out["sym"].weight is params["sym"].weight                      # the weights themselves are shared


def test_without_a_hopper_gpu_params_come_back_unchanged(monkeypatch):
    monkeypatch.setattr(_mgpu, "is_hopper", lambda: False)        # as on a CPU or a GPU before Hopper
    rng = np.random.default_rng(1)
    params = {"w": QuantizedWeight(get_recipe("w4a16_awq"), _int4(rng, 256, 512, 128))}
    out = kernel_dispatch.with_kernel_rows(params)
    assert out["w"].kernel_rows is None and out["w"] is params["w"]


def test_replace_drops_rows_that_no_longer_match(hopper):
    rng = np.random.default_rng(2)
    w = kernel_dispatch.with_kernel_rows(QuantizedWeight(get_recipe("w4a16_awq"), _int4(rng, 256, 512, 128)))
    assert w.kernel_rows is not None
    assert w.replace(pre_quant_scale=jnp.ones(512)).kernel_rows is not None  # rows do not read it
    assert w.replace(weight=_int4(rng, 256, 512, 128)).kernel_rows is None
    assert w.replace(input_scale=jnp.float32(1.0)).kernel_rows is None
    assert w.replace(weight=w.weight, kernel_rows=w.kernel_rows).kernel_rows is w.kernel_rows


def test_run_params_are_built_once_per_model(hopper, monkeypatch):
    from jaxq.loaded_model import random_model
    calls = []
    real = kernel_dispatch.with_kernel_rows
    monkeypatch.setattr(kernel_dispatch, "with_kernel_rows", lambda p: calls.append(1) or real(p))
    model = random_model(dict(architectures=["LlamaForCausalLM"], vocab_size=64, hidden_size=64,
                              intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=32, max_position_embeddings=64))
    assert model.run_params is model.run_params and calls == [1]
    assert model.replace(source="x").run_params is not None and calls == [1, 1]   # a new model builds its own
    assert model.replace(kernel_rows=False).run_params is model.params and calls == [1, 1]   # opted out


def test_rows_that_do_not_fit_the_weight_name_the_layer(hopper):
    from jaxq.nn.qdense import qmatmul
    rng = np.random.default_rng(3)
    w = kernel_dispatch.with_kernel_rows(QuantizedWeight(get_recipe("w4a16_awq"), _int4(rng, 256, 512, 128)))
    stale = w.replace(kernel_rows=(w.kernel_rows[0][:, :128],))
    with pytest.raises(ValueError, match=r"layer model.layers.0.q_proj: kernel_rows have shapes \[\(4, 128\)\], "
                                         r"expected \(4, 256\)"):
        qmatmul(jnp.ones((2, 512)), stale, "model.layers.0.q_proj")
