"""The experimental Mosaic GPU W4A16 kernel (pallas_kernels/w4a16_mgpu.py) on the CPU: its weight
conversion, shape rules and errors, and that it lowers for CUDA to one Mosaic GPU kernel issuing bf16
wgmma. Its numbers are checked on a GPU by benchmarks/gemm_probe.py --parts w4mgpu."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _common as cm
from pallas_kernels import w4a16_mgpu as w4
from pallas_kernels.w4a16_mgpu import MgpuW4Config

from . import np_oracle as npo


def test_as_int4_holds_the_signed_codes_in_order():
    packed = npo.rand_packed(npo.rng_for("w4a16_mgpu_int4"), 24, 256)
    q = w4.as_int4(jnp.asarray(packed))
    assert q.dtype == jnp.int4 and q.shape == (24, 256)
    expected = np.asarray(cm.unpack_nibbles(jnp.asarray(packed)), np.int32) - 8
    np.testing.assert_array_equal(np.asarray(q.astype(jnp.int32)), expected)


def test_shape_rules():
    assert w4.can_use(100, 512, 1024, 128)
    assert not w4.can_use(100, 512, 1024, 64)                       # one group per 128-K step
    assert not w4.can_use(100, 384, 1024, 128)                      # N off the 2 x 128 CTA tile
    assert w4.can_use(100, 384, 1024, 128, MgpuW4Config(tile_n=64))


def _operands(m, n, k, scale_cols=None):
    return (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((n, k // 2), jnp.uint8),
            jax.ShapeDtypeStruct((n, scale_cols or k // 128), jnp.bfloat16))


def test_lowers_to_a_mosaic_gpu_kernel_with_bf16_wgmma():
    text = w4.w4a16_matmul_mgpu.trace(*_operands(200, 512, 1024)).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 1
    assert "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16" in text


def test_bad_shapes_name_what_is_wrong():
    with pytest.raises(ValueError, match=r"scale \(512, 4\)"):
        w4.w4a16_matmul_mgpu.trace(*_operands(64, 512, 1024, scale_cols=4))
