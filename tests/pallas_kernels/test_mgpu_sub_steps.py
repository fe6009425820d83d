"""MgpuW4Config.sub_steps: the swap-AB Mosaic kernels (W4A16, NVFP4, MXFP4, W4A8) with two or four 128-K
sub-steps per pipeline step, all decoded before the step's first wgmma. On the CPU: its shape rules,
shared-memory fit and what each step traces; on Hopper: the same bits as one sub-step per pipeline step (the
same wgmmas into the same accumulator, or W4A8's fresh accumulators promoted, in the same order)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _mgpu, fp4_mgpu
from pallas_kernels import w4a16_mgpu as w4
from pallas_kernels.w4a16_mgpu import MgpuW4Config

from . import np_oracle as npo

KINDS = ["w4a16", "w4a16_asym", "w4a16_g32", "nvfp4", "mxfp4", "w4a8"]


def test_sub_steps_need_whole_sets_of_k_steps_per_split():
    two, four = (MgpuW4Config(tile_tokens=16, stages=4, sub_steps=s) for s in (2, 4))
    assert w4.can_use(16, 512, 1024, 128, two) and w4.can_use(16, 512, 1024, 128, four)
    assert not w4.can_use(16, 512, 1152, 128, two)              # 9 K-steps do not pair
    assert w4.can_use(16, 512, 1280, 128, two) and not w4.can_use(16, 512, 1280, 128, four)   # 10: pairs, not fours
    split = MgpuW4Config(tile_tokens=16, stages=4, sub_steps=2, split_k=2)
    assert w4.can_use(16, 512, 1536, 128, split) and not w4.can_use(16, 512, 1280, 128, split)   # 5 per split
    assert not w4.can_use(16, 512, 1536, 128, MgpuW4Config(tile_tokens=16, stages=4, sub_steps=3))
    xq = jnp.zeros((16, 1536), jnp.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"sub_steps\) == 0"):
        w4.w4a8_matmul_mgpu(xq, jnp.float32(1.0), jnp.zeros((512, 768), jnp.uint8),
                            jnp.ones((512, 12), jnp.float32), config=dataclasses.replace(four, split_k=2))


@pytest.mark.parametrize("subs", [2, 4])
def test_fit_stages_holds_every_sub_step_of_a_stage(subs):
    """A stage of S sub-steps takes S times the buffers: 1 / S of the stages (rounded down) fit."""
    for t in (16, 64, 128):
        assert w4.fit_stages(t, most=64, sub_steps=subs) == w4.fit_stages(t, most=64) // subs >= 1


def _config(kind, tokens, split, subs, chain=False):
    scale_rows = 8 if kind in fp4_mgpu.GROUPS else 4 if kind.endswith("g32") else 1
    stages = w4.fit_stages(tokens, split_k=split, asym="asym" in kind, scale_rows=scale_rows, sub_steps=subs,
                           x_bytes=1 if kind == "w4a8" else 2)
    return MgpuW4Config(tile_tokens=tokens, stages=stages, split_k=split, sub_steps=subs, chain_tiles=chain)


def _run(kind, rng, m, n, k):
    """A function of the config running `kind` on fresh random inputs drawn once from rng."""
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    packed = jnp.asarray(npo.rand_packed(rng, n, k))
    if kind == "nvfp4":
        block = jnp.asarray(rng.uniform(0.01, 4.0, (n, k // 16)), jnp.float32).astype(jnp.float8_e4m3fn)
        return lambda cfg: fp4_mgpu.nvfp4_matmul_mgpu(x, packed, block, jnp.float32(0.5), config=cfg)
    if kind == "w4a8":
        xq = x.astype(jnp.float8_e4m3fn)
        weight_scale = jnp.asarray(rng.uniform(0.005, 0.02, (n, k // 128)), jnp.float32)
        return lambda cfg: w4.w4a8_matmul_mgpu(xq, jnp.float32(0.7), packed, weight_scale, config=cfg)
    if kind == "mxfp4":
        scale = jnp.asarray(rng.integers(118, 132, (n, k // 32)), jnp.uint8)
        return lambda cfg: fp4_mgpu.mxfp4_matmul_mgpu(x, packed, scale, config=cfg)
    group = 32 if kind.endswith("g32") else 128
    scale = jnp.asarray(rng.uniform(0.005, 0.02, (n, k // group)), jnp.bfloat16)
    zero = jnp.asarray(rng.integers(0, 16, (n, k // group)), jnp.uint8) if "asym" in kind else None
    return lambda cfg: w4.w4a16_matmul_mgpu(x, packed, scale, zero, config=cfg)


def _run_group(rng, m, ns, k, zero):
    """A function of the config running a grouped W4A16 launch (widths ns, asymmetric with zero) on fresh
    random inputs drawn once from rng; its output as float32 numpy."""
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    packed = tuple(jnp.asarray(npo.rand_packed(rng, n, k)) for n in ns)
    scale = tuple(jnp.asarray(rng.uniform(0.005, 0.02, (n, k // 128)), jnp.bfloat16) for n in ns)
    zeros = tuple(jnp.asarray(rng.integers(0, 16, (n, k // 128)), jnp.uint8) for n in ns) if zero else None
    return lambda cfg: np.asarray(w4.w4a16_matmul_mgpu_group(x, packed, scale, zeros, config=cfg), np.float32)


@pytest.mark.parametrize("subs", [2, 4])
@pytest.mark.parametrize("kind,wgmmas", [("w4a16", 1), ("w4a16_asym", 1), ("w4a16_g32", 4), ("nvfp4", 1),
                                         ("mxfp4", 1), ("w4a8", 1)])
def test_a_step_decodes_every_sub_step_then_issues_their_wgmmas(monkeypatch, kind, wgmmas, subs):
    """Per pipeline step: `subs` tiles loaded from shared memory, then every wgmma (`wgmmas` per sub-step: one
    per group slice), none in between the loads; it lowers for CUDA to one Mosaic GPU kernel."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    jax.clear_caches()
    events = []
    load, wgmma = plgpu.load, plgpu.wgmma

    def recording_load(ref, idx, *a, layout=None, **kw):
        if layout in (plgpu.Layout.WGMMA_UPCAST_4X, plgpu.Layout.WGMMA_8BIT):
            events.append("tile")
        return load(ref, idx, *a, layout=layout, **kw)

    monkeypatch.setattr(plgpu, "load", recording_load)
    monkeypatch.setattr(plgpu, "wgmma", lambda acc, a, b: events.append("wgmma") or wgmma(acc, a, b))
    run = _run(kind, np.random.default_rng(3), 100, 512, 2048)
    cfg = _config(kind, 16, 2, subs)
    text = jax.jit(run, static_argnums=0).trace(cfg).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 1
    assert events == ["tile"] * subs + ["wgmma"] * (wgmmas * subs)


@pytest.mark.parametrize("subs,order", [(1, ["scale", "wgmma"] * 4), (2, ["scale"] * 8 + ["wgmma"] * 8)])
def test_one_sub_step_keeps_each_group_wgmma_next_to_its_scaling(monkeypatch, subs, order):
    """Groups of 32: with one sub-step each slice's wgmma follows its scaling (the order measured before
    sub-steps existed); with two, every slice of both tiles is scaled before the first wgmma."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    jax.clear_caches()
    events = []
    row, wgmma = w4.per_channel_row, plgpu.wgmma
    monkeypatch.setattr(w4, "per_channel_row", lambda *a: events.append("scale") or row(*a))
    monkeypatch.setattr(plgpu, "wgmma", lambda acc, a, b: events.append("wgmma") or wgmma(acc, a, b))
    run = _run("w4a16_g32", np.random.default_rng(5), 100, 512, 2048)
    jax.jit(run, static_argnums=0).trace(_config("w4a16_g32", 16, 2, subs)).lower(lowering_platforms=("cuda",))
    assert events == order


@pytest.mark.skipif(jax.default_backend() != "gpu" or not _mgpu.is_hopper(), reason="Mosaic GPU kernels need Hopper")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m,tokens,split,chain", [(5, 8, 4, False), (64, 64, 1, False), (300, 16, 1, False),
                                                  (300, 128, 2, False), (2040, 16, 1, True)])
def test_sub_steps_give_the_same_bits_on_hopper(kind, m, tokens, split, chain):
    """Bit-identical outputs with one, two and (where two stages of them fit) four sub-steps per pipeline step,
    from one tile per CTA to CTAs that run several (M=300 on 16-token tiles: 19 x 6 tiles), and chained (2040
    tokens: 128 x 6 tiles)."""
    run = _run(kind, np.random.default_rng(sum(map(ord, kind)) + m), m, 768, 2048)
    fitting = [cfg for cfg in (_config(kind, tokens, split, subs, chain) for subs in (1, 2, 4)) if cfg.stages >= 2]
    assert [cfg.sub_steps for cfg in fitting][:2] == [1, 2]
    outs = [np.asarray(run(cfg), np.float32) for cfg in fitting]
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])
    assert np.abs(outs[0]).max() > 0 and np.isfinite(outs[0]).all() and outs[0].shape == (m, 768)


@pytest.mark.skipif(jax.default_backend() != "gpu" or not _mgpu.is_hopper(), reason="Mosaic GPU kernels need Hopper")
@pytest.mark.parametrize("zero", [False, True])
def test_a_group_of_weights_gives_the_same_bits_with_sub_steps_on_hopper(zero):
    """A grouped launch (q, k, v widths) with two and four sub-steps equals the same launch with one, bit for
    bit."""
    run = _run_group(np.random.default_rng(29 + zero), 40, (512, 128, 256), 2048, zero)
    outs = [run(_config("w4a16_asym" if zero else "w4a16", 16, 2, subs)) for subs in (1, 2, 4)]
    np.testing.assert_array_equal(outs[1], outs[0])
    np.testing.assert_array_equal(outs[2], outs[0])
    assert np.abs(outs[0]).max() > 0 and outs[0].shape == (40, 896)


def test_the_plan_takes_sub_steps_below_128_token_tiles():
    """dispatch plans four sub-steps for 16-token tiles of W4A16 / FP4 where a split's K-steps come in fours,
    two for other tiles under 128 (and W4A8's) where they pair, one from 128-token tiles; every planned
    config fits the kernel."""
    from pallas_kernels import dispatch
    for m, n, k, want, want_fp8 in ((16, 4096, 4096, 4, 2), (64, 4096, 14336, 2, 2), (256, 4096, 4096, 1, 1),
                                    (16, 4096, 1152, 1, 1), (16, 14336, 1280, 2, 2)):
        for recipe in ("w4a16", "nvfp4", "mxfp4", "w4a8"):
            p = dispatch.plan(recipe, m, n, k, mosaic=True)
            if p.path != "mgpu":
                continue
            assert p.config.sub_steps == (want_fp8 if recipe == "w4a8" else want), (recipe, m, k, p.config)
            usable = (fp4_mgpu.can_use(recipe, m, n, k, p.config) if recipe in fp4_mgpu.GROUPS
                      else w4.can_use(m, n, k, 128, p.config))
            assert usable and p.config.stages >= 3, (recipe, m, k, p.config)


@pytest.mark.skipif(jax.default_backend() != "gpu" or not _mgpu.is_hopper(), reason="Mosaic GPU kernels need Hopper")
@pytest.mark.parametrize("kind", ["w4a16", "w4a16_asym", "w4a16_g32"])
@pytest.mark.parametrize("m,tokens,split,subs", [(5, 16, 2, 2), (64, 64, 1, 1), (300, 16, 1, 2), (300, 128, 2, 1)])
def test_128_channels_per_warpgroup_give_the_same_bits_on_hopper(kind, m, tokens, split, subs):
    """wg_channels 128 (256-channel CTA tiles, two 64-row wgmmas per slice) equals 64, bit for bit."""
    run = _run(kind, np.random.default_rng(sum(map(ord, kind)) + m), m, 768 + 256, 2048)
    base = _config(kind, tokens, split, subs)
    scale_rows = 4 if kind.endswith("g32") else 1
    wide = dataclasses.replace(base, wg_channels=128, stages=w4.fit_stages(
        tokens, split_k=split, asym="asym" in kind, scale_rows=scale_rows, sub_steps=subs, wg_channels=128))
    outs = [np.asarray(run(cfg), np.float32) for cfg in (base, wide)]
    np.testing.assert_array_equal(outs[1], outs[0])
    assert np.abs(outs[0]).max() > 0 and np.isfinite(outs[0]).all()


@pytest.mark.skipif(jax.default_backend() != "gpu" or not _mgpu.is_hopper(), reason="Mosaic GPU kernels need Hopper")
@pytest.mark.parametrize("zero", [False, True])
def test_a_group_of_weights_on_128_channel_warpgroups_gives_the_same_bits_on_hopper(zero):
    """A grouped launch (gate / up-like widths, each a multiple of 256) with wg_channels 128 equals the same
    launch with 64, bit for bit."""
    run = _run_group(np.random.default_rng(31 + zero), 40, (1024, 256, 512), 2048, zero)
    base = _config("w4a16_asym" if zero else "w4a16", 16, 1, 2)
    wide = dataclasses.replace(base, wg_channels=128, stages=w4.fit_stages(16, sub_steps=2, wg_channels=128))
    outs = [run(cfg) for cfg in (base, wide)]
    np.testing.assert_array_equal(outs[1], outs[0])
    assert np.abs(outs[0]).max() > 0 and outs[0].shape == (40, 1792)


def test_a_128_channel_warpgroup_decodes_and_multiplies_128_rows(monkeypatch):
    """wg_channels 128: each warpgroup loads a [128, 128] INT4 tile per sub-step and issues one wgmma of 128
    rows per group slice (two 64-row instructions), into a [128, tokens] accumulator; it lowers for CUDA."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    jax.clear_caches()
    shapes = []
    wgmma = plgpu.wgmma
    monkeypatch.setattr(plgpu, "wgmma", lambda acc, a, b: shapes.append((acc.shape, a.shape)) or wgmma(acc, a, b))
    run = _run("w4a16_g32", np.random.default_rng(7), 40, 1024, 2048)
    cfg = MgpuW4Config(tile_tokens=16, stages=w4.fit_stages(16, scale_rows=4, sub_steps=2, wg_channels=128),
                       sub_steps=2, wg_channels=128)
    text = jax.jit(run, static_argnums=0).trace(cfg).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 1
    assert shapes == [((128, 16), (128, 32))] * 8


def test_wide_warpgroups_need_256_channel_weights():
    wide = MgpuW4Config(tile_tokens=16, stages=4, sub_steps=2, wg_channels=128)
    assert w4.can_use(16, 1024, 1024, 128, wide) and not w4.can_use(16, 1152, 1024, 128, wide)
    assert not w4.can_use(16, 1024, 1024, 128, dataclasses.replace(wide, wg_channels=96))
    assert not fp4_mgpu.can_use("nvfp4", 16, 1024, 1024, wide)
    xq = jnp.zeros((16, 1024), jnp.float8_e4m3fn)
    with pytest.raises(ValueError, match="wg_channels 64"):
        w4.w4a8_matmul_mgpu(xq, jnp.float32(1.0), jnp.zeros((512, 512), jnp.uint8), jnp.ones((512, 8), jnp.float32),
                            config=wide)
    x = jnp.zeros((16, 1024), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"weight 0: .*packed \(1152, 512\).*N % 256 == 0"):
        w4.w4a16_matmul_mgpu(x, jnp.zeros((1152, 512), jnp.uint8), jnp.ones((1152, 8), jnp.bfloat16), config=wide)
    with pytest.raises(ValueError, match="mxfp4_matmul_mgpu: .*wg_channels 64"):
        fp4_mgpu.mxfp4_matmul_mgpu(x, jnp.zeros((1024, 512), jnp.uint8), jnp.full((1024, 32), 127, jnp.uint8),
                                   config=wide)


def test_the_plan_widens_warpgroups_on_the_gate_up_layers_only():
    """W4A16 under 128-token tiles takes 128-channel warpgroups with two sub-steps where its 256-channel tiles
    fill 80 % of the SMs (Llama 8B / 70B gate_up); narrower layers, 128-token tiles, FP4, W4A8 and grouped
    launches keep 64 (grouped W4A8 also one sub-step)."""
    from pallas_kernels import dispatch
    for m in (2, 16, 64):
        for n, k in ((28672, 4096), (57344, 8192)):
            cfg = dispatch.plan("w4a16", m, n, k, mosaic=True).config
            assert (cfg.wg_channels, cfg.sub_steps, cfg.split_k) == (128, 2, 1), (m, n, cfg)
            assert w4.can_use(m, n, k, 128, cfg) and cfg.stages >= 2
            for recipe in ("nvfp4", "mxfp4", "w4a8"):
                assert dispatch.plan(recipe, m, n, k, mosaic=True).config.wg_channels == 64, (recipe, m, n)
            grouped = dispatch.group_plan("w4a16", m, (n // 2, n // 2), k)
            assert grouped.config.wg_channels == 64 and grouped.config.sub_steps == (4 if m <= 16 else 2)
        for n, k in ((10240, 8192), (6144, 4096), (4096, 14336)):
            assert dispatch.plan("w4a16", m, n, k, mosaic=True).config.wg_channels == 64, (m, n)
        assert dispatch.group_plan("w4a8", m, (4096, 1024, 1024), 4096).config.sub_steps == 1
    assert dispatch.plan("w4a16", 256, 28672, 4096, mosaic=True).config.wg_channels == 64
