"""FP4 and FP8 on-disk layouts: ModelOpt, compressed-tensors NVFP4, GPT-OSS MXFP4, FP8 scale shapes."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxq.formats import (compressed_tensors_global_scale, deinterleave_gate_up, fp8_checkpoint_scale,
                          fp8_from_checkpoint, from_compressed_tensors_nvfp4, from_gpt_oss_mxfp4, from_modelopt_mxfp4,
                          from_modelopt_nvfp4, interleave_gate_up, quantize_fp8, quantize_mxfp4, quantize_nvfp4,
                          to_compressed_tensors_nvfp4, to_gpt_oss_mxfp4, to_modelopt_mxfp4, to_modelopt_nvfp4)

from . import np_ref


def _nvfp4_parts(seed, n=8, k=64):
    rng = np.random.default_rng(seed)
    packed = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)
    scale = rng.uniform(0.5, 400, (n, k // 16)).astype(ml_dtypes.float8_e4m3fn)
    return packed, scale


def _e2m1_values(packed):
    return np_ref.E2M1_TABLE[np_ref.unpack_nibbles(packed)]


def test_modelopt_nvfp4_round_trip_and_byte_example():
    packed, scale = _nvfp4_parts(61)
    packed[0, 0] = 0x9F  # k = 0 -> low nibble 0xF = -6.0; k = 1 -> high nibble 0x9 = -0.5
    t = from_modelopt_nvfp4(jnp.asarray(packed), jnp.asarray(scale), jnp.asarray(0.01, jnp.bfloat16))
    assert t.global_scale.dtype == jnp.float32 and t.global_scale.shape == ()
    assert np.asarray(t.codes())[0, :2].tolist() == [15, 9]
    ws2 = np.float32(jnp.asarray(0.01, jnp.bfloat16))
    expected = (_e2m1_values(packed).reshape(8, 4, 16) * np_ref.f32(scale)[..., None] * ws2).reshape(8, 64)
    np.testing.assert_array_equal(np.asarray(t.dequantize()), expected)
    out = to_modelopt_nvfp4(t)
    np.testing.assert_array_equal(np.asarray(out["weight"]), packed)
    np.testing.assert_array_equal(np_ref.bits(out["weight_scale"]), np_ref.bits(scale))


def test_compressed_tensors_nvfp4_reciprocal_global_scale():
    w = np.random.default_rng(62).standard_normal((8, 64)).astype(np.float32)
    amax = np.float32(np.abs(w).max())
    gs = compressed_tensors_global_scale(amax)
    # llm-compressor: 2688 * (1 / amax) (torch's scalar / tensor), not 2688 / amax
    assert np.asarray(gs) == np.float32(2688) * (np.float32(1) / amax)
    t = quantize_nvfp4(jnp.asarray(w))
    out = to_compressed_tensors_nvfp4(t)
    assert out["weight_global_scale"].shape == (1,)
    assert np.asarray(out["weight_global_scale"])[0] == np.float32(1) / np.asarray(t.global_scale)
    back = from_compressed_tensors_nvfp4(out["weight_packed"], out["weight_scale"], out["weight_global_scale"])
    np.testing.assert_allclose(np.asarray(back.global_scale), np.asarray(t.global_scale), rtol=2.5e-7)
    # compressed-tensors divides by the global scale; the multiplier differs at most in the last bit
    packed, scale = np.asarray(out["weight_packed"]), np.asarray(out["weight_scale"])
    ct = (_e2m1_values(packed).reshape(8, 4, 16) * (np_ref.f32(scale) / np.asarray(out["weight_global_scale"]))[..., None])
    np.testing.assert_allclose(np.asarray(back.dequantize()), ct.reshape(8, 64), rtol=3e-7)


def test_modelopt_mxfp4_round_trip():
    t = quantize_mxfp4(jnp.asarray(np.random.default_rng(63).standard_normal((4, 64)), jnp.float32))
    back = from_modelopt_mxfp4(**to_modelopt_mxfp4(t))
    np.testing.assert_array_equal(np.asarray(back.dequantize()), np.asarray(t.dequantize()))


def test_gpt_oss_blocks_byte_example_and_gate_up():
    e, rows, k = 2, 6, 64
    blocks = np.random.default_rng(64).integers(0, 256, (e, rows, k // 32, 16), dtype=np.uint8)
    scales = np.random.default_rng(65).integers(120, 130, (e, rows, k // 32), dtype=np.uint8)
    blocks[0, 0, 0, 0], scales[0, 0, 0] = 0x21, 127  # k = 0 -> code 1 (0.5), k = 1 -> code 2 (1.0), 2**0
    t = from_gpt_oss_mxfp4(jnp.asarray(blocks), jnp.asarray(scales))
    assert t.shape == (e, rows, k) and np.asarray(t.dequantize())[0, 0, :2].tolist() == [0.5, 1.0]
    expected = _e2m1_values(blocks.reshape(e, rows, k // 2)).reshape(e, rows, k // 32, 32)
    expected = expected * np.ldexp(np.float32(1), scales.astype(np.int32) - 127)[..., None]
    np.testing.assert_array_equal(np.asarray(t.dequantize()), expected.reshape(e, rows, k))
    out = to_gpt_oss_mxfp4(t)
    np.testing.assert_array_equal(np.asarray(out["blocks"]), blocks)
    np.testing.assert_array_equal(np.asarray(out["scales"]), scales)
    gate, up = deinterleave_gate_up(t)
    np.testing.assert_array_equal(np.asarray(gate.dequantize()), np.asarray(t.dequantize())[:, 0::2])
    np.testing.assert_array_equal(np.asarray(up.dequantize()), np.asarray(t.dequantize())[:, 1::2])
    merged = interleave_gate_up(gate, up)
    np.testing.assert_array_equal(np.asarray(merged.packed), np.asarray(t.packed))
    np.testing.assert_array_equal(np.asarray(merged.scale), np.asarray(t.scale))


def test_fp4_layout_errors():
    packed, scale = _nvfp4_parts(66)
    with pytest.raises(ValueError, match=r"from_modelopt_nvfp4: weight_scale has shape \(8, 3\), expected \(8, 4\) "
                                         r"\(one scale per 16 elements of K=64\)"):
        from_modelopt_nvfp4(jnp.asarray(packed), jnp.asarray(scale[:, :3]), 1.0)
    with pytest.raises(ValueError, match=r"from_modelopt_nvfp4: weight_scale has dtype uint8, expected float8_e4m3fn"):
        from_modelopt_nvfp4(jnp.asarray(packed), jnp.asarray(scale.view(np.uint8)), 1.0)
    with pytest.raises(ValueError, match=r"from_modelopt_nvfp4: weight_scale_2 has shape \(2,\), expected \(\)"):
        from_modelopt_nvfp4(jnp.asarray(packed), jnp.asarray(scale), jnp.ones(2))
    with pytest.raises(ValueError, match=r"from_compressed_tensors_nvfp4: weight_global_scale has values in \[0.0, 0.0\]"):
        from_compressed_tensors_nvfp4(jnp.asarray(packed), jnp.asarray(scale), jnp.zeros(1))
    with pytest.raises(ValueError, match=r"from_modelopt_mxfp4: weight has K=48, expected a multiple of 32"):
        from_modelopt_mxfp4(jnp.zeros((4, 24), jnp.uint8), jnp.zeros((4, 1), jnp.uint8))
    with pytest.raises(ValueError, match=r"from_gpt_oss_mxfp4: scales has shape \(2, 3\), expected \(2, 2\)"):
        from_gpt_oss_mxfp4(jnp.zeros((2, 2, 16), jnp.uint8), jnp.zeros((2, 3), jnp.uint8))


@pytest.mark.parametrize("granularity,producer,disk_shape", [
    ("tensor", "modelopt", ()), ("tensor", "compressed_tensors", (1,)), ("channel", "modelopt", (200,)),
    ("channel", "compressed_tensors", (200, 1)), ("block", "modelopt", (2, 1, 3, 1)), ("block", "deepseek", (2, 3)),
    ("block", "compressed_tensors", (2, 3)),
])
def test_fp8_checkpoint_scales(granularity, producer, disk_shape):
    w = np.random.default_rng(67).standard_normal((200, 300)).astype(np.float32)
    t = quantize_fp8(jnp.asarray(w), granularity)
    disk = fp8_checkpoint_scale(t, producer)
    assert disk.shape == disk_shape
    back = fp8_from_checkpoint(t.data, disk.astype(jnp.bfloat16) if producer == "compressed_tensors" else disk)
    assert back.granularity == granularity and back.scale.dtype == jnp.float32
    expected = np.asarray(t.scale).astype(ml_dtypes.bfloat16) if producer == "compressed_tensors" else np.asarray(t.scale)
    np.testing.assert_array_equal(np.asarray(back.scale), np_ref.f32(expected))


def test_fp8_checkpoint_errors():
    w = jnp.zeros((200, 300), jnp.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"fp8_from_checkpoint: scale has shape \(2, 2\) for weight \(200, 300\), "
                                         r"expected one of: tensor \(\), tensor \(1,\), channel \(200,\)"):
        fp8_from_checkpoint(w, jnp.ones((2, 2)))
    with pytest.raises(ValueError, match=r"fp8_from_checkpoint: weight has dtype bfloat16, expected float8_e4m3fn"):
        fp8_from_checkpoint(jnp.zeros((4, 4), jnp.bfloat16), jnp.ones(()))
    with pytest.raises(ValueError, match=r"fp8_checkpoint_scale: t.granularity \(DeepSeek\)='channel'"):
        fp8_checkpoint_scale(quantize_fp8(jnp.ones((4, 4)), "channel"), "deepseek")
