"""qmatmul / QDense on every recipe against an independent NumPy fake quant of the stored tensors.

The references below use NumPy + ml_dtypes only (tests/formats/np_ref.py: casts, nibble unpacking) and
start from random *stored* tensors (codes and scales as a checkpoint holds them), so they check the
numerics a loader relies on, not a quantizer. Activation fake quant must match bit for bit; the matmul
within float32 summation error.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxq.formats import FP8Tensor, Int4Tensor, MXFP4Tensor, NVFP4Tensor
from jaxq.nn import kernel_dispatch
from jaxq.nn.activation_quant import fake_quant_activation
from jaxq.nn.qdense import QDense, module_name, qmatmul, quantized_matmul_reference
from jaxq.nn.quantized_weight import QuantizedWeight
from jaxq.recipes import get_recipe
from tests.formats.np_ref import E2M1_TABLE, e2m1_even, e4m3, pack_nibbles

F32 = np.float32


# ------------------------------------------------------------------ NumPy activation fake quant
def np_fp8_static(x, scale):
    """ModelOpt: amax = scale * 448 (<= 2**-24 -> 1), s = 448 / amax, e4m3(clip(x * s)) * (1 / s)."""
    amax = F32(scale) * F32(448)
    amax = F32(1) if amax <= F32(2.0**-24) else amax
    s = F32(448) / amax
    return e4m3(x.astype(F32) * s).astype(F32) * (F32(1) / s)


def np_fp8_token(x):
    scale = np.maximum(np.abs(x).max(-1, keepdims=True).astype(F32) / F32(448), np.finfo(F32).eps).astype(F32)
    return e4m3(x / scale).astype(F32) * scale


def np_fp8_group(x, b=128):
    k = x.shape[-1]
    pad = -k % b
    xp = np.concatenate([x, np.zeros(x.shape[:-1] + (pad,), F32)], -1).reshape(*x.shape[:-1], -1, b)
    s = (np.maximum(np.abs(xp).max(-1, keepdims=True), F32(1e-4)) / F32(448)).astype(F32)
    return (e4m3(xp / s).astype(F32) * s).reshape(*x.shape[:-1], -1)[..., :k]


def np_nvfp4_act(x, input_scale):
    gs = F32(F32(input_scale) * F32(2688)) / F32(2688)
    gs = gs if gs > 0 else F32(1e-12)
    xb = x.reshape(*x.shape[:-1], -1, 16)
    bmax = np.abs(xb).max(-1, keepdims=True)
    sc = e4m3(np.minimum(bmax / (F32(6) * gs), F32(448))).astype(F32) * gs
    sc = np.where(sc >= F32(1e-5), sc, F32(1)).astype(F32)
    return (E2M1_TABLE[e2m1_even(xb / sc)] * sc).reshape(x.shape)


def np_activation(x, mode, input_scale=None):
    return {"none": lambda: x, "fp8_static": lambda: np_fp8_static(x, input_scale),
            "fp8_token": lambda: np_fp8_token(x), "fp8_group": lambda: np_fp8_group(x),
            "nvfp4": lambda: np_nvfp4_act(x, input_scale)}[mode]()


# ------------------------------------------------------------------ random stored weights + NumPy dequant
def rand_e4m3(rng, shape, scale=100.0):
    return (rng.randn(*shape) * scale).clip(-448, 448).astype(ml_dtypes.float8_e4m3fn)


def make_weight(kind, rng, n, k, group=64):
    """(jaxq weight array, NumPy float32 dequantized W [N, K]) from random stored tensors."""
    if kind.startswith("fp8"):
        data = rand_e4m3(rng, (n, k))
        gran = kind.split("_")[1]
        if gran == "tensor":
            scale = np.asarray(rng.uniform(1e-3, 1e-2), F32)
            w = data.astype(F32) * scale
        elif gran == "channel":
            scale = rng.uniform(1e-3, 1e-2, n).astype(F32)
            w = data.astype(F32) * scale[:, None]
        else:
            scale = rng.uniform(1e-3, 1e-2, (-(-n // 128), -(-k // 128))).astype(F32)
            w = data.astype(F32) * np.repeat(np.repeat(scale, 128, 0), 128, 1)[:n, :k]
        return FP8Tensor(jnp.asarray(data), jnp.asarray(scale), gran), w
    codes = rng.randint(0, 16, (n, k)).astype(np.uint8)
    packed = jnp.asarray(pack_nibbles(codes))
    if kind == "nvfp4":
        bs = rand_e4m3(rng, (n, k // 16), 50.0)
        bs = np.abs(bs.astype(F32)).clip(0.5, 448).astype(ml_dtypes.float8_e4m3fn)
        gs = np.asarray(rng.uniform(1e-4, 1e-3), F32)
        w = (E2M1_TABLE[codes].reshape(n, -1, 16) * bs.astype(F32)[..., None]).reshape(n, k) * gs
        return NVFP4Tensor(packed, jnp.asarray(bs), jnp.asarray(gs)), w
    if kind == "mxfp4":
        e = rng.randint(120, 127, (n, k // 32)).astype(np.uint8)
        w = E2M1_TABLE[codes] * np.ldexp(F32(1), np.repeat(e.astype(np.int32) - 127, 32, 1)).astype(F32)
        return MXFP4Tensor(packed, jnp.asarray(e)), w
    scale = rng.uniform(1e-3, 1e-2, (n, k // group)).astype(F32)
    groups = np.arange(k) // group
    if kind == "int4_actorder":
        groups = rng.permutation(groups)
    zero = None if kind == "int4" else rng.randint(0, 16, (n, k // group)).astype(np.uint8)
    z = F32(8) if zero is None else zero[:, groups].astype(F32)
    w = (codes.astype(F32) - z) * scale[:, groups]
    g_idx = jnp.asarray(groups, jnp.int32) if kind == "int4_actorder" else None
    return Int4Tensor(packed, jnp.asarray(scale), group, None if zero is None else jnp.asarray(zero), g_idx), w


# (recipe, overrides, weight kind, K, has input_scale, has weight_scale_2, has pre_quant_scale)
CASES = {
    "fp8": ("fp8", {}, "fp8_tensor", 200, True, False, False),
    "fp8_rowwise": ("fp8_rowwise", {}, "fp8_channel", 200, False, False, False),
    "fp8_block": ("fp8_block", {}, "fp8_block", 200, False, False, False),
    "fp8_block_wo": ("fp8_block", {"activation": "none"}, "fp8_block", 136, False, False, False),
    "nvfp4": ("nvfp4", {}, "nvfp4", 48, True, False, False),
    "nvfp4_wo": ("nvfp4", {"activation": "none"}, "nvfp4", 48, False, False, False),
    "mxfp4": ("mxfp4", {}, "mxfp4", 96, False, False, False),
    "mxfp4_fp8": ("mxfp4", {"activation": "fp8_static"}, "mxfp4", 96, True, False, False),
    "nvfp4_fp8": ("nvfp4", {"activation": "fp8_static"}, "nvfp4", 48, True, False, True),
    # K = 256: on a Hopper GPU from M=2 these run the FP4 Mosaic kernel (fp4_mgpu.py) through QDense
    "nvfp4_wo_k256": ("nvfp4", {"activation": "none"}, "nvfp4", 256, False, False, False),
    "mxfp4_k256": ("mxfp4", {}, "mxfp4", 256, False, False, False),
    "w4a16_awq": ("w4a16_awq", {"group_size": 64}, "int4", 192, False, False, True),
    # K = 256 (a multiple of 128): on a Hopper GPU these two run the Mosaic kernel with groups of 64, with
    # zeros and with act-order; K = 192 above keeps the packed-4 kernel's unaligned-K path covered
    "w4a16_gptq": ("w4a16_gptq", {"group_size": 64, "symmetric": False}, "int4_zero", 256, False, False, False),
    "w4a16_gptq_actorder": ("w4a16_gptq", {"group_size": 64, "act_order": True}, "int4_actorder", 256,
                            False, False, False),
    "w4a8_awq": ("w4a8_awq", {"group_size": 64}, "int4", 192, True, True, True),
    "w4a8_gptq": ("w4a8_gptq", {"group_size": 64}, "int4", 192, True, True, False),
}


def build_case(name, rng, n=72):
    recipe_name, overrides, kind, k, has_in, has_ws2, has_pqs = CASES[name]
    recipe = get_recipe(recipe_name, **overrides)
    weight, w = make_weight(kind, rng, n, k, recipe.group_size if kind.startswith("int4") else 64)
    in_scale = F32(rng.uniform(1.0, 3.0) / (2688 if recipe.activation == "nvfp4" else 448)) if has_in else None
    ws2 = F32(np.abs(w).max() / 448 * 1.1) if has_ws2 else None
    pqs = rng.uniform(0.5, 2.0, k).astype(F32) if has_pqs else None
    qw = QuantizedWeight(recipe, weight, None if in_scale is None else jnp.asarray(in_scale),
                         None if pqs is None else jnp.asarray(pqs), None if ws2 is None else jnp.asarray(ws2))
    w_ref = w if ws2 is None else np_fp8_static(w, ws2)
    return qw, w_ref, recipe, in_scale, pqs


def np_reference(x, qw_parts):
    w_ref, recipe, in_scale, pqs = qw_parts
    x1 = x.astype(F32) if pqs is None else x.astype(F32) * pqs
    x_hat = np_activation(x1, recipe.activation, in_scale)
    return x_hat, x_hat.astype(np.float64) @ w_ref.astype(np.float64).T


def assert_close_f32(y, x_hat, w, y_ref):
    """|y - y_ref| within float32 summation error: 8 sqrt(K) eps32 * (|x_hat| @ |W|^T)."""
    bound = 8 * np.sqrt(w.shape[1]) * 2.0**-24 * (np.abs(x_hat).astype(np.float64) @ np.abs(w).T) + 1e-30
    err = np.abs(np.asarray(y, np.float64) - y_ref)
    assert np.all(err <= bound), f"max err/bound {np.max(err / bound):.3g}"


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("m", [1, 7, 33])
def test_qmatmul_matches_numpy_fake_quant(name, m):
    rng = np.random.RandomState(hash((name, m)) % 2**31)
    qw, w_ref, recipe, in_scale, pqs = build_case(name, rng)
    x = (rng.randn(m, qw.shape[1]) * rng.uniform(0.5, 3, (m, 1))).astype(F32)
    x[0, :5] = 0.0  # zeros and a near-empty block exercise the scale floors
    x_hat_ref, y_ref = np_reference(x, (w_ref, recipe, in_scale, pqs))

    x1 = x if pqs is None else x * pqs
    x_hat = fake_quant_activation(jnp.asarray(x1), recipe.activation, qw.input_scale)
    np.testing.assert_array_equal(np.asarray(x_hat), x_hat_ref)  # bit-exact activation fake quant

    y = quantized_matmul_reference(jnp.asarray(x), qw)
    assert y.dtype == jnp.float32 and y.shape == (m, qw.shape[0])
    assert_close_f32(y, x_hat_ref, w_ref, y_ref)
    if kernel_dispatch.select_kernel(jnp.asarray(x), qw) is None:  # always on a CPU
        np.testing.assert_array_equal(np.asarray(qmatmul(jnp.asarray(x), qw)), np.asarray(y))


@pytest.mark.parametrize("name", ["fp8_block", "nvfp4", "w4a8_awq"])
def test_qdense_bf16_batched_and_jitted(name):
    rng = np.random.RandomState(3)
    qw, w_ref, recipe, in_scale, pqs = build_case(name, rng)
    x = jnp.asarray(rng.randn(2, 5, qw.shape[1]), jnp.bfloat16)  # [B, T, K]: unaligned M = 10
    if kernel_dispatch.select_kernel(x.reshape(10, -1), qw) is not None:
        pytest.skip("a kernel claims this call; test_kernels_match_the_reference covers it")
    y = jax.jit(lambda p, x: QDense(qw.shape[0]).apply({"params": {"weight": p}}, x))(qw, x)
    assert y.dtype == jnp.bfloat16 and y.shape == (2, 5, qw.shape[0])
    xf = np.asarray(x.astype(jnp.float32)).reshape(10, -1)
    _, y_ref = np_reference(xf, (w_ref, recipe, in_scale, pqs))
    ref_bf16 = np.asarray(jnp.asarray(y_ref, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32))
    got = np.asarray(y.astype(jnp.float32)).reshape(10, -1)
    # one bf16 rounding of the float32 result; a rounding boundary may flip by one bf16 ulp
    np.testing.assert_allclose(got, ref_bf16, rtol=2.0**-7, atol=1e-6)


def test_errors_name_the_layer():
    rng = np.random.RandomState(4)
    qw, *_ = build_case("fp8", rng)

    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x):
            return QDense(qw.shape[0], name="q_proj")(x)

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Layer(name="layers_3")(x)

    params = lambda w: {"params": {"layers_3": {"q_proj": {"weight": w}}}}
    layer = Model()
    with pytest.raises(ValueError, match=r"layer layers.3.q_proj: input has K=64 features.*expects K=200"):
        layer.apply(params(qw), jnp.ones((2, 64)))
    with pytest.raises(ValueError, match=r"layer layers.3.q_proj: recipe 'fp8'.*input_scale is None"):
        layer.apply(params(qw.replace(input_scale=None)), jnp.ones((2, 200)))
    with pytest.raises(ValueError, match=r"pre_quant_scale has shape \(3,\), expected \(200,\)"):
        qmatmul(jnp.ones((2, 200)), qw.replace(pre_quant_scale=jnp.ones(3)), "x")


def test_module_name_is_the_hf_dotted_path():
    assert module_name(("model", "layers_12", "mlp", "up_proj")) == "model.layers.12.mlp.up_proj"


def test_nvfp4_activations_need_k_multiple_of_16():
    rng = np.random.RandomState(5)
    weight, _ = make_weight("fp8_tensor", rng, 8, 40)
    qw = QuantizedWeight(get_recipe("fp8", activation="nvfp4"), weight, input_scale=jnp.float32(1e-3))
    with pytest.raises(ValueError, match=r"K=40, expected a multiple of 16"):
        qmatmul(jnp.ones((2, 40)), qw)


def test_kernel_registry_selects_by_backend_recipe_and_m():
    rng = np.random.RandomState(6)
    qw, *_ = build_case("w4a16_awq", rng)
    backend = jax.default_backend()
    calls = []

    def fake(x, w):
        calls.append(x.shape[0])
        return jnp.zeros((x.shape[0], w.shape[0]), x.dtype)

    kernel_dispatch.register_kernel("test_fake", lambda w: w.recipe.name == "w4a16_awq", fake,
                                    backend=backend, min_m=2, max_m=16)
    try:
        x = jnp.ones((4, 3, qw.shape[1]))
        assert float(jnp.abs(qmatmul(x, qw)).sum()) == 0.0 and calls == [12]  # M = 12: the fake kernel
        assert float(jnp.abs(qmatmul(x[:1, :1], qw)).sum()) > 0               # M = 1 < min_m: reference
        assert float(jnp.abs(qmatmul(jnp.ones((20, qw.shape[1])), qw)).sum()) > 0  # M > max_m
        other, *_ = build_case("fp8", rng)                                  # not claimed by the fake
        chosen = kernel_dispatch.select_kernel(jnp.ones((4, other.shape[1])), other, backend)
        assert chosen is None or chosen.name != "test_fake"             # (a GPU's own FP8 kernel may claim it)
    finally:
        kernel_dispatch.unregister_kernel("test_fake")
    if backend == "cpu":  # built-in kernels are GPU-only: the CPU always runs the reference
        assert kernel_dispatch.select_kernel(jnp.ones((4, qw.shape[1]), jnp.bfloat16), qw) is None


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the built-in kernels are registered for GPUs")
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("m", [1, 40, 100, 300])
def test_kernels_match_the_reference(name, m):
    """On a GPU, qmatmul's kernel (where one claims the call) vs the reference, both on bf16 x, within
    |y - ref| <= 1e-2 |ref| + 1e-2 rms(ref) (f32 summation order, bf16 output rounding) plus, on the paths
    that feed the MMA bf16-rounded weights (pallas_kernels.dispatch's 'xla_dequant', and W4A16's Mosaic
    kernel, which also rounds the scales to bf16), 2**-8 (|x| @ |W|^T): each weight off by at most 2**-8 of
    itself. That term matters where an output cancels (|y| << |x| @ |W|^T). W4A8's kernel keeps the INT4
    weights exact (jaxq/nn/kernel_dispatch.py): its reference is the one without the FP8 weight stage."""
    from pallas_kernels.dispatch import plan

    rng = np.random.RandomState(7)
    qw, _, _, _, pqs = build_case(name, rng, n=256)
    x = jnp.asarray(rng.randn(m, qw.shape[1]), jnp.bfloat16)
    kernel = kernel_dispatch.select_kernel(x, qw)
    if kernel is None:
        pytest.skip("no kernel claims this call")
    got = np.asarray(jax.jit(qmatmul)(x, qw), np.float32)
    exact_int4 = qw.replace(weight_scale_2=None) if kernel.name == "pallas_w4a8" else qw
    ref = np.asarray(quantized_matmul_reference(x, exact_int4), np.float32)
    rms = np.sqrt(np.mean(ref**2))
    recipe = {"pallas_w4a16": "w4a16", "pallas_w4a8": "w4a8", "pallas_fp4": type(qw.weight).__name__[:5].lower()}
    group = qw.weight.group_size if isinstance(qw.weight, Int4Tensor) else 128
    path = plan(recipe[kernel.name], m, *qw.shape, group).path if kernel.name in recipe else "pallas"
    tol = 1e-2 * np.abs(ref) + 1e-2 * rms
    if path == "xla_dequant" or (kernel.name == "pallas_w4a16" and path == "mgpu"):
        x_in = np.asarray(x, np.float32) * (1.0 if pqs is None else pqs)
        tol = tol + 2.0**-8 * (np.abs(x_in) @ np.abs(np.asarray(qw.weight.dequantize(), np.float32)).T)
    err = np.abs(got - ref)
    worst = np.unravel_index(np.argmax(err - tol), got.shape)
    assert np.all(err <= tol), (kernel.name, path, float(np.max(err) / rms),
                                f"worst (row, channel) {worst}: got {got[worst]}, ref {ref[worst]}, "
                                f"bound {tol[worst]}, out of bound {int(np.sum(err > tol))}")
    prepared = kernel_dispatch.with_kernel_rows(qw)   # the Mosaic kernels' scale rows built beforehand
    if prepared.kernel_rows is not None:
        np.testing.assert_array_equal(np.asarray(jax.jit(qmatmul)(x, prepared), np.float32), got)
