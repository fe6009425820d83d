"""MgpuW4Config.overlap (pallas_kernels/_mgpu.py's in_flight): each K-step's wgmmas run on while the next
step decodes. On the CPU: what the kernels trace (the waits and the delayed buffer release) and the configs
it refuses; on Hopper: the same bits as without it, over tiles that share a CTA."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _mgpu, fp4_mgpu
from pallas_kernels import w4a16_mgpu as w4
from pallas_kernels.w4a16_mgpu import MgpuW4Config

from . import np_oracle as npo

on_hopper = pytest.mark.skipif(jax.default_backend() != "gpu" or not _mgpu.is_hopper(),
                               reason="Mosaic GPU kernels need Hopper")


@pytest.fixture
def traced(monkeypatch):
    """What later traces emit: {'waits': [allowed pending groups of each plgpu.wgmma_wait], 'delays':
    [delay_release of each pipeline's in_specs]}. Jit caches are cleared first so kernels trace again."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    jax.clear_caches()
    seen = {"waits": [], "delays": []}
    wait, emit = plgpu.wgmma_wait, plgpu.emit_pipeline_warp_specialized

    def recording_wait(n):
        seen["waits"].append(n)
        return wait(n)

    def recording_emit(*args, in_specs, **kwargs):
        seen["delays"].append(sorted({s.delay_release for s in in_specs}))
        return emit(*args, in_specs=in_specs, **kwargs)

    monkeypatch.setattr(plgpu, "wgmma_wait", recording_wait)
    monkeypatch.setattr(plgpu, "emit_pipeline_warp_specialized", recording_emit)
    return seen


def _w4a16(m, n, k, group, cfg):
    ops = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((n, k // 2), jnp.uint8),
           jax.ShapeDtypeStruct((n, k // group), jnp.bfloat16))
    return jax.jit(lambda x, p, s: w4.w4a16_matmul_mgpu(x, p, s, config=cfg)), ops


def _fp4(fmt, m, n, k, cfg):
    scale = jnp.float8_e4m3fn if fmt == "nvfp4" else jnp.uint8
    ops = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((n, k // 2), jnp.uint8),
           jax.ShapeDtypeStruct((n, k // fp4_mgpu.GROUPS[fmt]), scale))
    if fmt == "nvfp4":
        return jax.jit(lambda x, p, s: fp4_mgpu.nvfp4_matmul_mgpu(x, p, s, jnp.float32(1.0), config=cfg)), ops
    return jax.jit(lambda x, p, s: fp4_mgpu.mxfp4_matmul_mgpu(x, p, s, config=cfg)), ops


@pytest.mark.parametrize("kernel,groups_per_step", [("w4a16_g128", 1), ("w4a16_g32", 4), ("nvfp4", 1),
                                                    ("mxfp4", 1)])
@pytest.mark.parametrize("overlap", [False, True])
def test_overlap_leaves_each_steps_wgmmas_in_flight_and_drains_the_last(traced, kernel, groups_per_step,
                                                                        overlap):
    """Without overlap every step waits for all its wgmmas (wait 0) and buffers are released at once; with
    it a step waits only for the previous step's groups (wait = the wgmmas it issued), its buffers are
    released a step late, and a conditional wait 0 drains the tile's last step. Both lower for CUDA."""
    cfg = MgpuW4Config(tile_tokens=16, stages=4, overlap=overlap)
    if kernel.startswith("w4a16"):
        fn, ops = _w4a16(200, 512, 1024, int(kernel.split("_g")[1]), cfg)
    else:
        fn, ops = _fp4(kernel, 200, 512, 1024, cfg)
    text = fn.trace(*ops).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 1
    assert traced["waits"] == ([groups_per_step, 0] if overlap else [0])
    assert traced["delays"] and all(d == [int(overlap)] for d in traced["delays"])


def test_overlap_is_refused_where_it_cannot_apply():
    """Pallas' pipelines of pipelines take no delayed release, and W4A8 promotes each step's fresh
    accumulator (nothing left in flight)."""
    both = MgpuW4Config(tile_tokens=16, overlap=True, chain_tiles=True)
    assert not w4.can_use(64, 512, 1024, 128, both)
    assert w4.can_use(64, 512, 1024, 128, dataclasses.replace(both, chain_tiles=False))
    xq = jnp.zeros((64, 1024), jnp.float8_e4m3fn)
    packed, ws = jnp.zeros((512, 512), jnp.uint8), jnp.ones((512, 8), jnp.float32)
    with pytest.raises(ValueError, match="no overlap"):
        w4.w4a8_matmul_mgpu(xq, jnp.float32(1.0), packed, ws, config=MgpuW4Config(tile_tokens=16, overlap=True))


def _run(kernel, rng, m, n, k):
    """A function of the config that runs `kernel` on fresh random inputs drawn once from rng."""
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    packed = jnp.asarray(npo.rand_packed(rng, n, k))
    if kernel.startswith("w4a16"):
        group = int(kernel.split("_g")[1])
        scale = jnp.asarray(rng.uniform(0.005, 0.02, (n, k // group)), jnp.bfloat16)
        zero = jnp.asarray(rng.integers(0, 16, (n, k // group)), jnp.uint8) if "asym" in kernel else None
        return lambda cfg: w4.w4a16_matmul_mgpu(x, packed, scale, zero, config=cfg)
    if kernel == "nvfp4":
        block = jnp.asarray(rng.uniform(0.01, 4.0, (n, k // 16)), jnp.float32).astype(jnp.float8_e4m3fn)
        return lambda cfg: fp4_mgpu.nvfp4_matmul_mgpu(x, packed, block, jnp.float32(0.5), config=cfg)
    scale = jnp.asarray(rng.integers(118, 132, (n, k // 32)), jnp.uint8)
    return lambda cfg: fp4_mgpu.mxfp4_matmul_mgpu(x, packed, scale, config=cfg)


@on_hopper
@pytest.mark.parametrize("kernel", ["w4a16_g128", "w4a16_g32", "w4a16_asym_g128", "nvfp4", "mxfp4"])
@pytest.mark.parametrize("m,tokens", [(2, 8), (64, 64), (300, 16)])
def test_overlap_gives_the_same_bits_on_hopper(kernel, m, tokens):
    """overlap changes when a step waits, not the arithmetic: bit-identical outputs with and without it,
    on one tile per CTA (M=2, 64) and on 19 token tiles x 8 channel tiles, more than the SMs (M=300), where
    a CTA's next tile reloads the buffers of its last step."""
    run = _run(kernel, np.random.default_rng(sum(map(ord, kernel)) + m), m, 1024, 1024)
    outs = [np.asarray(run(MgpuW4Config(tile_tokens=tokens, stages=4, overlap=o)), np.float32)
            for o in (False, True)]
    np.testing.assert_array_equal(outs[1], outs[0])
    assert np.abs(outs[0]).max() > 0 and np.isfinite(outs[0]).all() and outs[0].shape == (m, 1024)
