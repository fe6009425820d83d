"""dispatch: the planned path per (recipe, M bucket) and every path of quantized_matmul against the
recipe's reference (interpret mode for the Pallas kernels, XLA for the others)."""
import itertools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pallas_kernels import dispatch, w4a8, w4a8_fp4, w4a16
from pallas_kernels import _common as cm
from pallas_kernels import packed4, w4a16_gemv
from pallas_kernels.w4a16_gemv import GemvConfig

from . import np_oracle as npo


def test_plan_buckets():
    assert dispatch.m_bucket(1) == 1 and dispatch.m_bucket(17) == 64 and dispatch.m_bucket(10**6) == 4096
    wide, small = dispatch.plan("w4a16", 1, 28672, 4096), dispatch.plan("w4a16", 1, 4096, 4096)
    deep = dispatch.plan("w4a16", 1, 8192, 8192)
    assert wide.path == small.path == deep.path == "gemv"                        # W4A16 M=1: word GEMV
    assert wide.config.split_k == small.config.split_k == 1                      # enough programs already
    assert deep.config.split_k == 1                                              # 512 programs, aiming at 512
    assert dispatch.plan("w4a16", 1, 4096, 14336).config.split_k == 2               # 256 programs: split in two
    assert dispatch.plan("w4a16", 1, 4096, 4096, group=16).path == "pallas"       # GEMV needs G >= 32
    assert dispatch.plan("w4a16", 2, 4096, 4096, mosaic=False).config.block_m == 16  # MMA + split-K
    small_m = dispatch.plan("w4a16", 2, 4096, 4096)                              # Mosaic GPU from M=2
    assert small_m.path == "mgpu" and small_m.config.tile_tokens == 16 and small_m.config.split_k == 4
    assert dispatch.plan("w4a16", 64, 28672, 4096).config.split_k == 1           # 224 channel tiles: no split
    assert dispatch.plan("w4a16", 256, 28672, 4096).config.tile_tokens == 256    # 224 tiles: 85 % of 2 waves
    assert dispatch.plan("w4a16", 128, 28672, 4096).config.tile_tokens == 128    # 256 only from 129 tokens
    narrow = [dispatch.plan("w4a16", 256, n, 4096).config for n in (6144, 4096)]   # t128; split below 66 tiles
    assert [(c.tile_tokens, c.split_k) for c in narrow] == [(128, 1), (128, 2)]
    assert dispatch.plan("w4a16", 1024, 6144, 4096).config.tile_tokens == 128    # t256: last wave 45 % full
    assert dispatch.plan("w4a16", 4096, 4096, 4096).config.tile_tokens == 256
    tail = dispatch.plan("w4a16", 256, 10240, 8192).config                       # 160 tiles: 61 % of 2 waves
    assert (tail.tile_tokens, tail.split_k) == (128, 2)
    for group in (64, 32):                            # W4A16's smaller groups: the same tiles, one wgmma each
        small_group = dispatch.plan("w4a16", 64, 4096, 4096, group=group)
        assert small_group.path == "mgpu" and small_group.config == dispatch.plan("w4a16", 64, 4096, 4096).config
        assert dispatch.plan("w4a8", 64, 4096, 4096, group=group).path == "pallas"  # W4A8's FP8 kernel: 128
    assert dispatch.plan("w4a16", 64, 4096, 4096, group=16).path == "pallas"      # no Mosaic kernel for G=16
    assert dispatch.plan("w4a16", 64, 4096 + 64, 4096).path == "pallas"           # N off the 128 channels
    assert dispatch.plan("w4a8", 1, 28672, 4096).path == "gemv"                  # W4A8 M=1: word GEMV
    fp8_mma = [dispatch.plan("w4a8", m, 6144, 4096) for m in (2, 64, 256, 4096)]  # FP8 tensor-core variant
    assert all(p.path == "mgpu" for p in fp8_mma)
    assert [(p.config.tile_tokens, p.config.split_k) for p in fp8_mma] == [(16, 2), (64, 2), (128, 1), (128, 1)]
    # small token tiles: the K split that balances the waves (48 tiles: 2; 80: 4; a wave or more: none)
    assert [dispatch.plan("w4a16", 64, n, k).config.split_k for n, k in
            ((6144, 4096), (10240, 8192), (4096, 4096), (28672, 4096))] == [2, 4, 4, 1]
    assert dispatch.plan("w4a8", 16, 28672, 4096, mosaic=False).path == "pallas"  # elsewhere: packed-4
    assert dispatch.plan("w4a8", 4096, 4096, 4096, mosaic=False).path == "xla_dequant"
    assert dispatch.plan("nvfp4", 1, 28672, 4096).path == "gemv"                 # FP4 word GEMV
    fp4_small, fp4_deep = dispatch.plan("mxfp4", 1, 4096, 4096).config, dispatch.plan("nvfp4", 1, 4096, 14336).config
    assert (fp4_small.block_n, fp4_small.split_k, fp4_small.prefetch) == (16, 1, False)   # the wide tile
    assert (fp4_deep.block_n, fp4_deep.split_k, fp4_deep.prefetch) == (32, 4, True)       # 128 programs, aim 512
    assert dispatch.plan("fp8_block", 1024, 4096, 4096).path == "mgpu"           # Mosaic GPU at large M
    assert dispatch.plan("fp8_block", 256, 4096, 4096).config.wg_dim == "n"
    down, qkv = dispatch.plan("fp8_block", 256, 4096, 14336).config, dispatch.plan("fp8_block", 256, 6144, 4096).config
    assert (down.split_k, down.stages) == (2, dispatch.FP8_SPLIT_STAGES)  # 64 CTA tiles: K split in two
    assert (qkv.split_k, qkv.stages) == (1, 4)                               # 96 tiles: a split adds a wave
    assert dispatch.plan("fp8_block", 1024, 4096 + 64, 4096).path == "pallas"    # N off the CTA tile
    assert dispatch.plan("fp8_block", 64, 4096, 4096).path == "pallas"
    assert dispatch.plan("w4a16", 4096, 4096, 4096, mosaic=False).path == "xla_dequant"
    assert dispatch.plan("fp8_rowwise", 16, 4096, 4096).path == "xla"
    assert dispatch.plan("w4a16", 16, 4096, 4096, group=32, mosaic=False).config.block_k == 32  # bk <= G
    for recipe in dispatch.W4A8_FP4:                  # the packed-4 tiles, valid for the block-MMA mode
        fmt = w4a8_fp4.MXFP4_FP8 if recipe == "w4a8_mxfp4" else w4a8_fp4.NVFP4_FP8
        for m in (1, 16, 64):                         # below each recipe's crossover (XLA_DEQUANT_FROM)
            for n in (4096, 28672):
                p = dispatch.plan(recipe, m, n, 4096)
                packed4_m = m < dispatch.XLA_DEQUANT_FROM[recipe]
                assert p.path == ("pallas" if packed4_m else "xla_dequant"), (recipe, m, n, p)
                assert not packed4_m or packed4.config_is_valid(fmt, p.config), (recipe, m, n, p)
        assert dispatch.plan(recipe, 4096, 4096, 4096).path == "xla_dequant"
    # the FP4 crossovers measured on the H200 (runs 76, 85): on Hopper the Mosaic kernel from M=2; off its
    # grid packed-4, then dequantise-then-dot from M=256; W4A8 x NVFP4 dequantises from M=2
    paths = {r: [dispatch.plan(r, m, 6144, 4096).path for m in (1, 2, 16, 64, 256, 1024, 4096)]
             for r in ("nvfp4", "mxfp4", "w4a8_mxfp4", "w4a8_nvfp4")}
    assert paths["nvfp4"] == paths["mxfp4"] == ["gemv"] + ["mgpu"] * 6
    assert dispatch.plan("mxfp4", 100, 6144, 4096, mosaic=False).path == "xla_dequant"
    assert dispatch.plan("nvfp4", 256, 6144 + 64, 4096).path == "xla_dequant"    # N off the 128-channel tile
    assert dispatch.plan("mxfp4", 64, 6144, 4096 + 32).path == "pallas"          # K off the 128-K step
    assert dispatch.plan("nvfp4", 16, 6144 + 64, 4096).path == "pallas"
    assert paths["w4a8_mxfp4"] == ["pallas"] * 4 + ["xla_dequant"] * 3
    assert paths["w4a8_nvfp4"] == ["pallas"] + ["xla_dequant"] * 6


def _weights(recipe, rng, n, k):
    packed = npo.rand_packed(rng, n, k)
    if recipe == "w4a16":
        return {"packed": packed, "scale": rng.uniform(0.01, 0.02, (n, k // 128)).astype(ml_dtypes.bfloat16),
                "zero": rng.integers(4, 12, (n, k // 128)).astype(np.uint8)}
    if recipe == "nvfp4":
        return {"packed": packed, "block_scale": npo.e4m3(rng.uniform(1, 400, (n, k // 16))),
                "global_scale": np.float32(1e-4)}
    if recipe == "mxfp4":
        return {"packed": packed, "scale": rng.integers(115, 125, (n, k // 32)).astype(np.uint8)}
    if recipe == "w4a8":
        return {"packed": packed, "weight_scale": rng.uniform(0.01, 0.02, (n, k // 128)).astype(np.float32),
                "input_scale": np.float32(4 / 448)}
    if recipe in dispatch.W4A8_FP4:
        return {**_weights(recipe[5:], rng, n, k), "input_scale": np.float32(4 / 448)}
    wq = npo.e4m3(rng.standard_normal((n, k)) * 64)
    if recipe == "fp8_block":
        return {"wq": wq, "w_scale": rng.uniform(1e-4, 4e-4, (-(-n // 128), -(-k // 128))).astype(np.float32)}
    if recipe == "fp8":
        return {"wq": wq, "w_scale": np.float32(3e-4), "input_scale": np.float32(4 / 448)}
    return {"wq": wq, "w_scale": rng.uniform(1e-4, 4e-4, (n,)).astype(np.float32)}


# Every recipe on its planned path at M=1, and on 'xla_dequant' at M=3 where it has one (FP8 per-tensor and
# rowwise have only the XLA path); the 'mgpu' plans in interpret mode.
PATH_CASES = [(r, 1, None) for r in dispatch.RECIPES] + [
    (r, 3, "xla_dequant") for r in dispatch.RECIPES if r not in ("fp8", "fp8_rowwise")] + [
    ("fp8_block", 3, "mgpu"),                         # interpret mode: the Triton kernel stands in
    ("w4a8", 1, "pallas"),                            # the packed-4 kernel (planned before the word GEMV)
    ("w4a16", 3, "mgpu"),                             # interpret mode: the packed-4 plan stands in
    ("w4a8", 3, "mgpu"),
    ("nvfp4", 3, "mgpu"),                             # interpret mode: replanned without the Mosaic kernel
    ("mxfp4", 3, "mgpu")]


def test_mosaic_tiles_chain_where_every_sm_gets_three():
    """chain_tiles from 3 CTA tiles per SM (396 on 132 SMs): W4A8 8b.gate_up at 256 tokens (t128: 448 tiles)
    and every 8B layer at 4096; not W4A16 there (t256: 224 tiles), 8b.qkv at 256 (96 tiles) or gate_up at
    16 (224); FP8 block likewise (8b.gate_up at 256: 448 CTA tiles of 64 x 256; 8b.qkv: 96)."""
    chain = lambda recipe, m, n, k=4096: dispatch.plan(recipe, m, n, k).config.chain_tiles  # noqa: E731
    assert chain("w4a8", 256, 28672) and chain("fp8_block", 256, 28672) and not chain("w4a16", 256, 28672)
    assert all(chain(r, 4096, n, k) for r in ("w4a16", "w4a8", "fp8_block")
               for n, k in ((6144, 4096), (4096, 14336), (28672, 4096)))
    assert not any(chain(r, 256, 6144) for r in ("w4a16", "w4a8", "fp8_block"))
    assert not chain("w4a16", 16, 28672) and not chain("fp8_block", 256, 4096, 14336)
    assert dispatch.chained(396) and not dispatch.chained(395)


@pytest.mark.parametrize("recipe,m,path", PATH_CASES)
def test_quantized_matmul_paths(recipe, m, path):
    rng = npo.rng_for("dispatch", recipe, m)
    n, k = 136, 256
    x = npo.rand_x(rng, m, k)
    w = {name: jnp.asarray(v) for name, v in _weights(recipe, rng, n, k).items()}
    override = dispatch.Plan(path) if path else None
    out = dispatch.quantized_matmul(x, recipe, w, plan_override=override, interpret=True)
    npo.check_close(out, dispatch.reference_matmul(x, recipe, w), 1e-2)
    prepared = dispatch.with_step_rows(recipe, w)     # scale rows built once: the same result on every path
    assert ("mgpu_rows" in prepared) == (recipe in ("w4a16", "w4a8"))
    if "mgpu_rows" in prepared:
        again = dispatch.quantized_matmul(x, recipe, prepared, plan_override=override, interpret=True)
        np.testing.assert_array_equal(np.asarray(again, np.float32), np.asarray(out, np.float32))


@pytest.mark.parametrize("recipe", dispatch.W4A8_FP4)
@pytest.mark.parametrize("path", [None, "xla_dequant"])
def test_w4a8_fp4_takes_fp8_codes(recipe, path):
    """Given E4M3 codes, the W4A8_FP4 recipes use them as they are (input_scale their multiplier) and
    return out_dtype."""
    # on the CPU device: the 1e-4 bound needs f32 sums, which interpret mode's FP8 dots on a GPU do not keep
    # (1.4e-4 off on an H100, run 37)
    with jax.default_device(jax.devices("cpu")[0]):
        rng = npo.rng_for("dispatch_codes", recipe, path)
        n, k = 40, 256
        xq = npo.rand_e4m3_x(rng, 3, k)
        w = {name: jnp.asarray(v) for name, v in _weights(recipe, rng, n, k).items()}
        override = dispatch.Plan(path) if path else None
        out = dispatch.quantized_matmul(xq, recipe, w, plan_override=override, out_dtype=jnp.float32, interpret=True)
        assert out.dtype == jnp.float32
        sx = w["input_scale"]
        if recipe == "w4a8_mxfp4":
            ref = w4a8_fp4.mxfp4_fp8_matmul_reference(xq, sx, w["packed"], w["scale"], jnp.float32)
        else:
            ref = w4a8_fp4.nvfp4_fp8_matmul_reference(xq, sx, w["packed"], w["block_scale"], w["global_scale"],
                                                      jnp.float32)
        npo.check_close(out, ref, 1e-4)                   # exact products, f32 sums: only summation order differs


def test_gemv_path_gathers_act_order_activations():
    """W4A16 at M=1 with a GPTQ act-order permutation goes through the GEMV with x permuted once."""
    rng = npo.rng_for("dispatch_gemv_perm")
    n, k, group = 40, 256, 64
    x = npo.rand_x(rng, 1, k)
    packed = npo.rand_packed(rng, n, k)
    scale = rng.uniform(0.01, 0.03, (n, k // group)).astype(np.float32)
    zero = rng.integers(4, 12, (n, k // group)).astype(np.float32)
    g_idx = rng.permutation(np.arange(k) // group).astype(np.int32)
    packed_p, scale_p, zero_p, perm = w4a16.prepare_act_order(packed, scale, zero, g_idx)
    w = {"packed": packed_p, "scale": jnp.asarray(scale_p), "zero": jnp.asarray(zero_p), "perm": perm}
    assert dispatch.plan("w4a16", 1, n, k, group).path == "gemv"
    out = dispatch.quantized_matmul(x, "w4a16", w, interpret=True)
    npo.check_close(out, w4a16.w4a16_matmul_reference(x, packed, scale, zero, g_idx=g_idx), 1e-2)


def test_group_plan_runs_one_token_on_the_gemv_of_the_summed_width():
    qkv = dispatch.group_plan("w4a16", 1, (4096, 1024, 1024), 4096)
    wide = GemvConfig(block_n=16, block_k=1024, split_k=1, unroll=1, num_warps=4, prefetch=True)  # no split-K sum
    assert qkv == dispatch.Plan("gemv", wide) and dispatch.plan("w4a16", 1, 6144, 4096).config.block_n == 16
    assert dispatch.group_plan("w4a16", 1, (8192, 1024, 1024), 8192) == qkv         # 70B: wide, not deep
    assert dispatch.group_plan("w4a16", 1, (4096, 1024, 1024), 4096, mosaic=False) == qkv   # Triton: any GPU
    assert dispatch.group_plan("w4a16", 1, (100, 64, 64), 1024) is None       # q off the small tile's 16 channels
    assert dispatch.group_plan("w4a16", 1, (4096, 1024, 1024), 4096, group=16) is None   # GEMV needs G >= 32
    assert dispatch.group_plan("w4a8", 1, (4096, 1024), 4096) == dispatch.group_plan("w4a16", 1, (4096, 1024), 4096)
    assert dispatch.group_plan("w4a8", 16, (4096, 1024), 4096).path == "mgpu"    # W4A8 groups from M=2
    assert dispatch.group_plan("w4a8", 16, (4096, 1024), 4096, group=64) is None  # its FP8 kernel: G = 128
    assert dispatch.group_plan("w4a16", 1, (4096,), 4096) is None
    assert dispatch.group_plan("w4a16", 16, (4096, 1024, 1024), 4096).path == "mgpu"
    assert dispatch.group_plan("w4a16", 16, (4096, 1024, 1024), 4096, mosaic=False) is None


@pytest.mark.parametrize("asym", [False, True])
def test_quantized_matmul_group_on_the_gemv_equals_each_weights_reference(asym):
    """One token over q, k, v of unequal widths (the last ragged) in one interpret-mode GEMV launch: each
    output slice equals that weight's W4A16 reference."""
    rng = npo.rng_for(f"dispatch_group_gemv_{asym}")
    k, group, ns = 512, 64, (256, 128, 72)
    x = npo.rand_x(rng, 1, k)
    weights = []
    for n in ns:
        w = {"packed": jnp.asarray(npo.rand_packed(rng, n, k)),
             "scale": jnp.asarray(rng.uniform(0.01, 0.03, (n, k // group)).astype(np.float32))}
        w["zero"] = jnp.asarray(rng.integers(4, 12, (n, k // group)).astype(np.float32)) if asym else None
        weights.append(w)
    p = dispatch.group_plan("w4a16", 1, ns, k, group)
    assert p is not None and p.path == "gemv"
    out = dispatch.quantized_matmul_group(jnp.asarray(x), "w4a16", tuple(weights), p, interpret=True)
    ref = np.concatenate([np.asarray(w4a16.w4a16_matmul_reference(x, w["packed"], w["scale"], w["zero"]),
                                     np.float32) for w in weights], axis=-1)
    npo.check_close(out, ref, 1e-2)


@pytest.mark.parametrize("mosaic", [True, False])
def test_every_shape_gets_a_plan_on_hopper_and_off_it(mosaic):
    """plan and group_plan return a plan for every recipe, M bucket and shape, and never a Mosaic GPU plan
    for shapes its kernels refuse: K off the 128 grid (SmolLM2's 576: the K split's choice raised on an
    empty list of splits, so W4A16 / W4A8 at 2-127 tokens failed on Hopper) or N under one 128-channel tile
    (a 256-token tile's wave fill divided by zero tiles)."""
    for recipe in dispatch.RECIPES:
        groups = (128, 64, 32) if recipe in ("w4a16", "w4a8") else (128,)
        for m, n, k, group in itertools.product((1, 2, 16, 40, 129, 300, 1024), (72, 576, 4096), (192, 576, 4096),
                                                groups):
            if k % group:
                continue
            p = dispatch.plan(recipe, m, n, k, group=group, mosaic=mosaic)
            assert p.path in ("gemv", "mgpu", "pallas", "xla", "xla_dequant"), (recipe, m, n, k, group, p)
            mosaic_ok = mosaic or recipe == "fp8_block"    # mosaic=False: W4A16 / W4A8 without their kernel
            assert p.path != "mgpu" or (mosaic_ok and k % 128 == 0 and n % 128 == 0), (recipe, m, n, k, group, p)
            if recipe in ("w4a16", "w4a8"):
                g = dispatch.group_plan(recipe, m, (n, n), k, group=group, mosaic=mosaic)
                assert g is None or g.path in ("gemv", "mgpu"), (recipe, m, n, k, group, g)


def test_a_w4a8_group_on_the_gemv_gives_each_weight_its_own_codes():
    """One token over three W4A8 weights with different input scales in one interpret-mode GEMV launch (x
    quantized to one row of E4M3 codes per weight, each weight's input_scale after its sum): each output slice
    equals that weight's own W4A8 GEMV, up to the f32 summation order of the two tilings, and the W4A8
    reference. (Each weight's codes are made outside the GEMV's jit: inside one jit on the CPU, XLA may drop
    the e4m3 rounding between the quantize and an interpret-mode kernel, since it allows excess precision.)"""
    with jax.default_device(jax.devices("cpu")[0]):                   # f32 sums in interpret mode (see above)
        rng = npo.rng_for("dispatch_group_gemv_w4a8")
        k, ns = 512, (256, 128, 72)
        x = jnp.asarray(npo.rand_x(rng, 1, k))
        weights = tuple({"packed": jnp.asarray(npo.rand_packed(rng, n, k)),
                         "weight_scale": jnp.asarray(rng.uniform(0.01, 0.03, (n, k // 128)).astype(np.float32)),
                         "input_scale": jnp.float32(s)} for n, s in zip(ns, (0.004, 0.01, 0.03)))
        p = dispatch.group_plan("w4a8", 1, ns, k)
        assert p is not None and p.path == "gemv"
        out = np.asarray(dispatch.quantized_matmul_group(x, "w4a8", weights, p, interpret=True), np.float32)
        alone = np.concatenate([np.asarray(w4a16_gemv.w4a16_gemv(
            cm.quantize_fp8_static(x, w["input_scale"]), w["packed"], w["weight_scale"], post_scale=w["input_scale"],
            out_dtype=x.dtype, interpret=True), np.float32) for w in weights], axis=-1)
        ref = np.concatenate([np.asarray(w4a8.w4a8_matmul_reference(x, w["packed"], w["weight_scale"],
                                                                    w["input_scale"]), np.float32)
                              for w in weights], axis=-1)
        assert out.shape == (1, sum(ns))
        npo.check_close(out, alone, 1e-2)          # bf16 outputs: one rounding of f32 sums in either order
        npo.check_close(out, ref, 1e-2)
