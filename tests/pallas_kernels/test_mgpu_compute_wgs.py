"""MgpuW4Config.compute_wgs: the swap-AB Mosaic kernels (W4A16, W4A8, NVFP4, MXFP4) with 4 compute
warpgroups per CTA, each 64 channels of a 256-channel CTA tile. On the CPU: its shape rules, shared-memory
fit and that every kernel lowers with 5 warpgroups; on Hopper: the same bits as with 2 warpgroups (each
channel's K order is the same)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _common as cm
from pallas_kernels import _mgpu, fp4_mgpu
from pallas_kernels import w4a16_mgpu as w4
from pallas_kernels.w4a16_mgpu import MgpuW4Config

from . import np_oracle as npo

KINDS = ["w4a16", "w4a16_asym_g32", "w4a8", "nvfp4", "mxfp4"]


def test_four_warpgroups_take_256_channel_tiles_and_small_token_tiles():
    four = MgpuW4Config(tile_tokens=16, stages=4, compute_wgs=4)
    assert w4.cta_channels(four) == 256 and w4.cta_channels(MgpuW4Config()) == 256 // 2
    assert w4.can_use(16, 768, 1024, 128, four)
    assert not w4.can_use(16, 640, 1024, 128, four)              # 640 channels: not whole 256-channel tiles
    assert not w4.can_use(200, 768, 1024, 128, MgpuW4Config(tile_tokens=128, stages=2, compute_wgs=4))
    assert not w4.can_use(16, 768, 1024, 128, MgpuW4Config(tile_tokens=16, stages=4, compute_wgs=3))


def test_fit_stages_counts_the_wider_tile_and_four_epilogues():
    """Per stage a 256-channel tile doubles the weight and scale buffers; the epilogue holds two pieces per
    warpgroup. The fit stays under the shared memory by the same rule as 2 warpgroups."""
    for t in (8, 16, 32, 64):
        two, four = w4.fit_stages(t, most=64), w4.fit_stages(t, most=64, compute_wgs=4)
        assert 2 <= four < two
        per_stage = t * 256 + 256 * 64 + 2 * 1024
        assert four * per_stage + 4 * 2 * min(32, t) * 64 * 2 + 4608 <= w4.SMEM_BYTES


def _config(kind, tokens, split, wgs):
    """The config of kind's kernel with the most stages its operands fit (fit_stages)."""
    scale_rows = 8 if kind in fp4_mgpu.GROUPS else 4 if kind.endswith("g32") else 1
    stages = w4.fit_stages(tokens, split_k=split, asym="asym" in kind, x_bytes=1 if kind == "w4a8" else 2,
                           scale_rows=scale_rows, compute_wgs=wgs)
    return MgpuW4Config(tile_tokens=tokens, stages=stages, split_k=split, compute_wgs=wgs)


def _kernel(kind, m, n, k, cfg):
    """(jitted fn of the config's kernel, ShapeDtypeStructs of its operands) for kind in KINDS."""
    S = jax.ShapeDtypeStruct
    x = S((m, k), jnp.bfloat16)
    packed = S((n, k // 2), jnp.uint8)
    if kind == "w4a8":
        return (jax.jit(lambda x, p, s: w4.w4a8_matmul_mgpu(x, jnp.float32(0.02), p, s, config=cfg)),
                (S((m, k), jnp.float8_e4m3fn), packed, S((n, k // 128), jnp.float32)))
    if kind in fp4_mgpu.GROUPS:
        dtype = jnp.float8_e4m3fn if kind == "nvfp4" else jnp.uint8
        scale = S((n, k // fp4_mgpu.GROUPS[kind]), dtype)
        if kind == "nvfp4":
            return jax.jit(lambda x, p, s: fp4_mgpu.nvfp4_matmul_mgpu(x, p, s, jnp.float32(0.5), config=cfg)), (
                x, packed, scale)
        return jax.jit(lambda x, p, s: fp4_mgpu.mxfp4_matmul_mgpu(x, p, s, config=cfg)), (x, packed, scale)
    group = 32 if kind.endswith("g32") else 128
    ops = (x, packed, S((n, k // group), jnp.bfloat16))
    if "asym" in kind:
        return jax.jit(lambda x, p, s, z: w4.w4a16_matmul_mgpu(x, p, s, z, config=cfg)), ops + (
            S((n, k // group), jnp.uint8),)
    return jax.jit(lambda x, p, s: w4.w4a16_matmul_mgpu(x, p, s, config=cfg)), ops


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tokens,split", [(16, 2), (64, 1)])
def test_every_kernel_lowers_with_four_compute_warpgroups(monkeypatch, kind, tokens, split):
    """The kernel launches 5 warpgroups (4 compute + the TMA producer) and its pipeline has 4 consumers."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    jax.clear_caches()
    consumers, threads = [], []
    emit, kernel = plgpu.emit_pipeline_warp_specialized, plgpu.kernel
    monkeypatch.setattr(plgpu, "emit_pipeline_warp_specialized",
                        lambda *a, num_compute_wgs, **kw: consumers.append(num_compute_wgs) or emit(
                            *a, num_compute_wgs=num_compute_wgs, **kw))
    monkeypatch.setattr(plgpu, "kernel", lambda *a, num_threads, **kw: threads.append(num_threads) or kernel(
        *a, num_threads=num_threads, **kw))
    fn, ops = _kernel(kind, 100, 512, 2048, _config(kind, tokens, split, 4))
    text = fn.trace(*ops).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 1
    assert threads == [5] and consumers and set(consumers) == {4}


def _run(kind, rng, m, n, k):
    """A function of the config running `kind` on fresh random inputs drawn once from rng."""
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    packed = jnp.asarray(npo.rand_packed(rng, n, k))
    if kind == "w4a8":
        scale = jnp.asarray(rng.uniform(0.005, 0.02, (n, k // 128)), jnp.float32)
        xq = cm.quantize_fp8_static(x, jnp.float32(0.02))
        return lambda cfg: w4.w4a8_matmul_mgpu(xq, jnp.float32(0.02), packed, scale, config=cfg)
    if kind == "nvfp4":
        block = jnp.asarray(rng.uniform(0.01, 4.0, (n, k // 16)), jnp.float32).astype(jnp.float8_e4m3fn)
        return lambda cfg: fp4_mgpu.nvfp4_matmul_mgpu(x, packed, block, jnp.float32(0.5), config=cfg)
    if kind == "mxfp4":
        scale = jnp.asarray(rng.integers(118, 132, (n, k // 32)), jnp.uint8)
        return lambda cfg: fp4_mgpu.mxfp4_matmul_mgpu(x, packed, scale, config=cfg)
    group = 32 if kind.endswith("g32") else 128
    scale = jnp.asarray(rng.uniform(0.005, 0.02, (n, k // group)), jnp.bfloat16)
    zero = jnp.asarray(rng.integers(0, 16, (n, k // group)), jnp.uint8) if "asym" in kind else None
    return lambda cfg: w4.w4a16_matmul_mgpu(x, packed, scale, zero, config=cfg)


@pytest.mark.skipif(jax.default_backend() != "gpu" or not _mgpu.is_hopper(), reason="Mosaic GPU kernels need Hopper")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m,tokens,split", [(5, 8, 4), (40, 16, 2), (64, 64, 1), (300, 16, 1)])
def test_four_compute_warpgroups_give_the_same_bits_on_hopper(kind, m, tokens, split):
    """Per channel the same K order as 2 warpgroups: bit-identical outputs, from one tile per CTA to 19 token
    tiles x 3 channel tiles (M=300: CTAs that run several tiles)."""
    run = _run(kind, np.random.default_rng(sum(map(ord, kind)) + m), m, 768, 2048)
    outs = [np.asarray(run(_config(kind, tokens, split, wgs)), np.float32) for wgs in (2, 4)]
    np.testing.assert_array_equal(outs[1], outs[0])
    assert np.abs(outs[0]).max() > 0 and np.isfinite(outs[0]).all() and outs[0].shape == (m, 768)
