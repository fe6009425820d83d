"""dense_group / qmatmul_group: layers that share x (q, k, v; gate, up) as one grouped GEMM where
kernel_dispatch.select_group allows it, else as separate calls, with each layer's params, names and bias kept.

On the CPU the group's selection runs with the GPU backend named and the Hopper check patched (the plan is
pure shape logic); the plumbing runs with a stand-in group function. On a GPU the grouped Mosaic kernel is
checked against the separate calls."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.formats import FP8Tensor, Int4Tensor
from jaxq.nn import kernel_dispatch
from jaxq.nn.qdense import QDense, dense_group, qmatmul, quantized_matmul_reference
from jaxq.nn.quantized_weight import QuantizedWeight
from jaxq.recipes import get_recipe
from pallas_kernels import _mgpu


def _w4a16(rng, n, k, group=128, zero=False, pre_quant_scale=None):
    packed = jnp.asarray(rng.integers(0, 256, (n, k // 2)), jnp.uint8)
    scale = jnp.asarray(rng.uniform(1e-3, 1e-2, (n, k // group)), jnp.bfloat16)
    z = jnp.asarray(rng.integers(0, 16, (n, k // group)), jnp.uint8) if zero else None
    recipe = get_recipe("w4a16_gptq", group_size=group, symmetric=not zero)
    return QuantizedWeight(recipe, Int4Tensor(packed, scale, group, z), pre_quant_scale=pre_quant_scale)


def _w4a8(rng, n, k, input_scale, group=128):
    packed = jnp.asarray(rng.integers(0, 256, (n, k // 2)), jnp.uint8)
    scale = jnp.asarray(rng.uniform(1e-3, 1e-2, (n, k // group)), jnp.float32)
    return QuantizedWeight(get_recipe("w4a8_awq", group_size=group), Int4Tensor(packed, scale, group),
                           jnp.float32(input_scale), weight_scale_2=jnp.float32(0.1))


@pytest.fixture
def hopper(monkeypatch):
    monkeypatch.setattr(_mgpu, "is_hopper", lambda: True)


def test_select_group_takes_alike_w4a16_weights(hopper):
    rng = np.random.default_rng(0)
    qkv = [_w4a16(rng, 512, 1024), _w4a16(rng, 128, 1024), _w4a16(rng, 128, 1024)]
    x16 = jnp.ones((16, 1024), jnp.bfloat16)
    assert kernel_dispatch.select_group(x16, qkv, backend="gpu") is not None
    assert kernel_dispatch.select_group(x16[:1], qkv, backend="gpu") is not None          # the grouped GEMV
    asym = [_w4a16(rng, 256, 1024, zero=True), _w4a16(rng, 256, 1024, zero=True)]
    assert kernel_dispatch.select_group(x16, asym, backend="gpu") is not None
    fp8 = QuantizedWeight(get_recipe("fp8"), FP8Tensor(jnp.zeros((128, 1024), jnp.float8_e4m3fn),
                                                       jnp.float32(1.0), "tensor"), jnp.float32(1.0))
    apart = {
        "one token, q off the GEMV's channel block": (x16[:1], [_w4a16(rng, 104, 1024)] + qkv[1:]),
        "a CPU backend": (x16, qkv),
        "one weight": (x16, qkv[:1]),
        "an FP8 weight": (x16, qkv[:2] + [fp8]),
        "a group of 64 beside 128": (x16, qkv[:2] + [_w4a16(rng, 128, 1024, group=64)]),
        "zeros on one weight only": (x16, qkv[:2] + [_w4a16(rng, 128, 1024, zero=True)]),
        "N off the 128-channel tile": (x16, qkv[:2] + [_w4a16(rng, 192, 1024)]),
        "AWQ smoothing": (x16, qkv[:2] + [_w4a16(rng, 128, 1024, pre_quant_scale=jnp.ones((1024,)))]),
        "a plain array": (x16, qkv[:2] + [jnp.ones((128, 1024), jnp.bfloat16)]),
    }
    for why, (x, weights) in apart.items():
        backend = "cpu" if why == "a CPU backend" else "gpu"
        assert kernel_dispatch.select_group(x, weights, backend=backend) is None, why


def test_select_group_takes_w4a8_weights_of_different_input_scales(hopper):
    rng = np.random.default_rng(5)
    qkv = [_w4a8(rng, 512, 1024, 0.02), _w4a8(rng, 128, 1024, 0.03), _w4a8(rng, 128, 1024, 0.05)]
    x16 = jnp.ones((16, 1024), jnp.bfloat16)
    assert kernel_dispatch.select_group(x16, qkv, backend="gpu") is not None
    assert kernel_dispatch.select_group(x16[:1], qkv, backend="gpu") is not None   # one token: the word GEMV
    apart = {
        "W4A8 beside W4A16": (x16, qkv[:2] + [_w4a16(rng, 128, 1024)]),
        "groups of 64 (the FP8 kernel takes 128)": (x16, [_w4a8(rng, n, 1024, 0.02, group=64) for n in (256, 128)]),
    }
    for why, (x, weights) in apart.items():
        assert kernel_dispatch.select_group(x, weights, backend="gpu") is None, why


class _Pair(nn.Module):
    @nn.compact
    def __call__(self, x):
        dense = lambda n, name: QDense(n, use_bias=True, dtype=jnp.float32, name=name)  # noqa: E731
        return dense_group([dense(256, "gate_proj"), dense(128, "up_proj")], x)


def _pair_params(rng):
    return {"gate_proj": {"weight": _w4a16(rng, 256, 512), "bias": jnp.asarray(rng.normal(size=256), jnp.float32)},
            "up_proj": {"weight": _w4a16(rng, 128, 512), "bias": jnp.asarray(rng.normal(size=128), jnp.float32)}}


def test_dense_group_splits_the_grouped_product_and_adds_each_bias(monkeypatch):
    """A stand-in group function (the reference per weight, side by side) must give each layer exactly its
    own QDense output; it is called once, on x flattened to [M, K]."""
    rng = np.random.default_rng(1)
    params = _pair_params(rng)
    x = jnp.asarray(rng.normal(size=(2, 3, 512)), jnp.float32)
    calls = []

    def group(x2, weights):
        calls.append((x2.shape, [w.shape for w in weights]))
        return jnp.concatenate([quantized_matmul_reference(x2, w) for w in weights], axis=-1)

    monkeypatch.setattr(kernel_dispatch, "select_group", lambda x2, weights: group)
    gate, up = _Pair().apply({"params": params}, x)
    assert calls == [((6, 512), [(256, 512), (128, 512)])]
    for got, name in ((gate, "gate_proj"), (up, "up_proj")):
        want = QDense(got.shape[-1], use_bias=True, dtype=jnp.float32).apply({"params": params[name]}, x)
        assert got.shape == (2, 3, got.shape[-1])
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_dense_group_without_a_group_kernel_is_the_separate_layers():
    rng = np.random.default_rng(2)
    params = _pair_params(rng)
    x = jnp.asarray(rng.normal(size=(4, 512)), jnp.float32)
    gate, up = _Pair().apply({"params": params}, x)
    np.testing.assert_array_equal(np.asarray(gate), np.asarray(qmatmul(x, params["gate_proj"]["weight"])
                                                              + params["gate_proj"]["bias"]))
    np.testing.assert_array_equal(np.asarray(up), np.asarray(qmatmul(x, params["up_proj"]["weight"])
                                                            + params["up_proj"]["bias"]))


def test_dense_group_names_the_layer_whose_weight_does_not_fit(monkeypatch):
    rng = np.random.default_rng(3)
    params = _pair_params(rng)
    params["up_proj"]["weight"] = _w4a16(rng, 128, 1024)                    # K 1024 against x's 512
    monkeypatch.setattr(kernel_dispatch, "select_group", lambda x2, weights: lambda *_: None)
    with pytest.raises(ValueError, match="layer up_proj: input has K=512"):
        _Pair().apply({"params": params}, jnp.ones((4, 512), jnp.float32))


@pytest.mark.skipif(jax.default_backend() != "gpu" or not _mgpu.is_hopper(), reason="the grouped kernel needs Hopper")
@pytest.mark.parametrize("kind,m", [(kind, m) for kind in ("sym", "asym", "w4a8") for m in (1, 16, 40, 300)])
def test_the_grouped_kernel_equals_the_separate_calls_on_hopper(kind, m):
    """q, k, v of unequal widths in one launch against each weight's own kernel call (W4A8: each with its own
    input scale): equal up to the K split's summation order (the grouped plan may split K differently),
    |diff| <= 1e-2 |y| + 1e-2 rms(y)."""
    rng = np.random.default_rng(4 + m)
    if kind == "w4a8":
        weights = [_w4a8(rng, n, 1024, s) for n, s in ((512, 0.02), (128, 0.03), (256, 0.05))]
    else:
        weights = [_w4a16(rng, n, 1024, zero=kind == "asym") for n in (512, 128, 256)]
    x = jnp.asarray(rng.normal(size=(m, 1024)), jnp.bfloat16)
    group = kernel_dispatch.select_group(x, weights)
    assert group is not None
    got = np.asarray(jax.jit(group)(x, weights), np.float32)
    want = np.concatenate([np.asarray(jax.jit(qmatmul)(x, w), np.float32) for w in weights], axis=-1)
    assert got.shape == want.shape == (m, 896)
    bound = 1e-2 * np.abs(want) + 1e-2 * np.sqrt(np.mean(want ** 2))
    assert (np.abs(got - want) <= bound).all(), np.abs(got - want).max()
