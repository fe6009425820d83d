"""The Mosaic GPU W4A16 kernel (pallas_kernels/w4a16_mgpu.py) on the CPU: its weight views, shape and
shared-memory rules, errors, and that it lowers for CUDA to one Mosaic GPU kernel issuing bf16 wgmma with
the token tile as wgmma's N. Its numbers are checked on a GPU by
benchmarks/gemm_probe.py --parts w4mgpu and benchmarks/gemm.py --steps check."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _common as cm
from pallas_kernels import _mgpu
from pallas_kernels import w4a16_mgpu as w4
from pallas_kernels.w4a16_mgpu import MgpuW4Config

from . import np_oracle as npo


def test_as_int4_holds_the_signed_codes_in_order():
    packed = npo.rand_packed(npo.rng_for("w4a16_mgpu_int4"), 24, 256)
    q = w4.as_int4(jnp.asarray(packed))
    assert q.dtype == jnp.int4 and q.shape == (24, 256)
    expected = np.asarray(cm.unpack_nibbles(jnp.asarray(packed)), np.int32) - 8
    np.testing.assert_array_equal(np.asarray(q.astype(jnp.int32)), expected)


def test_the_int4_view_of_the_canonical_bytes_flips_to_the_codes():
    """The kernel reads uint8 weights through bits_as_int4 and flips bit 3 of each nibble: q = u ^ 8 read
    as signed equals u - 8 for every code."""
    packed = npo.rand_packed(npo.rng_for("w4a16_mgpu_bits"), 16, 128)
    bits = w4.bits_as_int4(jnp.asarray(packed))
    flipped = np.asarray((bits ^ jnp.int4(-8)).astype(jnp.int32))
    np.testing.assert_array_equal(flipped, np.asarray(w4.as_int4(jnp.asarray(packed)).astype(jnp.int32)))


def test_shape_rules():
    assert w4.can_use(100, 512, 1024, 128)
    assert w4.can_use(3, 384, 1024, 128, MgpuW4Config(tile_tokens=16))
    assert w4.can_use(100, 512, 1024, 64) and w4.can_use(100, 512, 1024, 32)    # one wgmma per group
    assert not w4.can_use(100, 512, 1024, 16)
    assert not w4.can_use(100, 448, 1024, 128)                      # N off the 128-channel CTA tile
    assert not w4.can_use(100, 512, 1152, 128, MgpuW4Config(split_k=2))  # 9 K-steps do not split in two
    assert not w4.can_use(100, 512, 1024, 128, MgpuW4Config(tile_tokens=512))   # wgmma N <= 256


def test_fit_stages_stays_under_the_shared_memory_measured_on_the_gpu():
    """Configs that overflowed on the H100 (232448 bytes): asym t64 with 8 stages (233600), t128 split 2 with
    5 stages (239696); ones that ran: sym t128 5 stages, t256 2 stages."""
    assert w4.fit_stages(64) < 8 and w4.fit_stages(128, split_k=2) < 5
    assert w4.fit_stages(128, asym=False) >= 4 and w4.fit_stages(256) == 2


def _operands(m, n, k, scale_cols=None, zero=False, zero_cols=None):
    ops = [jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((n, k // 2), jnp.uint8),
           jax.ShapeDtypeStruct((n, scale_cols or k // 128), jnp.bfloat16)]
    return ops + [jax.ShapeDtypeStruct((n, zero_cols or k // 128), jnp.uint8) if zero else None]


@pytest.mark.parametrize("tokens,split,zero", [(16, 4, False), (64, 1, True), (256, 1, False)])
def test_lowers_to_a_mosaic_gpu_kernel_with_register_a_bf16_wgmma(tokens, split, zero):
    cfg = MgpuW4Config(tile_tokens=tokens, stages=w4.fit_stages(tokens, split_k=split), split_k=split)
    fn = jax.jit(lambda x, p, s, z: w4.w4a16_matmul_mgpu(x, p, s, z, config=cfg))
    text = fn.trace(*_operands(200, 512, 1024, zero=zero)).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 1
    assert f"wgmma.mma_async.sync.aligned.m64n{tokens}k16.f32.bf16.bf16" in text


@pytest.mark.parametrize("group,zero", [(64, True), (32, False), (32, True)])
def test_small_groups_issue_one_scaled_wgmma_per_group(monkeypatch, wgmma_operands, group, zero):
    """Groups of 64 / 32: per 128-K step, 128 / group wgmmas, each on its slice of the tile with its own
    scale (and zero) row; it lowers for CUDA like group 128."""
    rows = []
    row = w4.per_channel_row

    def recording_row(ref, j, channels, shape):
        rows.append(j)
        return row(ref, j, channels, shape)

    monkeypatch.setattr(w4, "per_channel_row", recording_row)
    cfg = MgpuW4Config(tile_tokens=64, stages=w4.fit_stages(64, scale_rows=128 // group))
    fn = jax.jit(lambda x, p, s, z: w4.w4a16_matmul_mgpu(x, p, s, z, config=cfg))
    text = fn.trace(*_operands(200, 512, 1024, scale_cols=1024 // group, zero=zero, zero_cols=1024 // group)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "m64n64k16.f32.bf16.bf16" in text
    assert [a.shape for a in wgmma_operands] == [(64, group)] * (128 // group)
    assert rows == [j for j in range(128 // group) for _ in range(2 if zero else 1)]


def test_bad_shapes_name_what_is_wrong():
    with pytest.raises(ValueError, match=r"scale \(512, 4\)"):
        w4.w4a16_matmul_mgpu.trace(*_operands(64, 512, 1024, scale_cols=4))


def _w4a8_operands(m, n, k, x_dtype=jnp.float8_e4m3fn):
    return (jax.ShapeDtypeStruct((m, k), x_dtype), jax.ShapeDtypeStruct((), jnp.float32),
            jax.ShapeDtypeStruct((n, k // 2), jnp.uint8), jax.ShapeDtypeStruct((n, k // 128), jnp.float32))


@pytest.mark.parametrize("tokens,split", [(16, 4), (128, 1)])
def test_w4a8_lowers_to_e4m3_wgmma(tokens, split):
    """The FP8-tensor-core W4A8 variant: INT4 -> e4m3 in registers, e4m3 wgmma (K 32 per instruction)."""
    cfg = MgpuW4Config(tile_tokens=tokens, stages=w4.fit_stages(tokens, split_k=split, asym=False, x_bytes=1),
                       split_k=split)
    fn = jax.jit(lambda x, si, p, s: w4.w4a8_matmul_mgpu(x, si, p, s, config=cfg))
    text = fn.trace(*_w4a8_operands(100, 512, 1024)).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 1
    assert f"wgmma.mma_async.sync.aligned.m64n{tokens}k32.f32.e4m3.e4m3" in text


def test_w4a8_rejects_bf16_activations_and_wide_token_tiles():
    with pytest.raises(ValueError, match="needs e4m3 xq"):
        w4.w4a8_matmul_mgpu.trace(*_w4a8_operands(64, 512, 1024, jnp.bfloat16))
    with pytest.raises(ValueError, match="tile_tokens <= 128"):
        w4.w4a8_matmul_mgpu.trace(*_w4a8_operands(64, 512, 1024), config=MgpuW4Config(tile_tokens=256, stages=2))


def test_w4a8_promotes_each_step_once_with_its_f32_scale(promotions):
    """Each K-step's e4m3 wgmma goes to a fresh accumulator, promoted once into the f32 sum with the step's
    per-channel f32 scale (weight_scale * input_scale)."""
    cfg = MgpuW4Config(tile_tokens=64, stages=w4.fit_stages(64, asym=False, x_bytes=1))
    fn = jax.jit(lambda x, si, p, s: w4.w4a8_matmul_mgpu(x, si, p, s, config=cfg))
    text = fn.trace(*_w4a8_operands(72, 512, 1024)).lower(lowering_platforms=("cuda",)).as_text()
    assert "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3" in text
    assert promotions == [((64, 64), jnp.float32)]                     # (M=72: no earlier trace cached)


def test_step_rows_hold_the_scales_and_zeros_per_k_step():
    rng = npo.rng_for("w4a16_mgpu_rows")
    scale = jnp.asarray(rng.uniform(1e-3, 1e-2, (256, 8)), jnp.float32)
    zero = jnp.asarray(rng.integers(0, 16, (256, 8)), jnp.uint8)
    s_rows, z_rows = w4.step_rows(scale, zero)
    assert s_rows.shape == z_rows.shape == (8, 256) and s_rows.dtype == z_rows.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(s_rows), np.asarray(scale.astype(jnp.bfloat16)).T)
    np.testing.assert_array_equal(np.asarray(z_rows, np.float32), np.asarray(zero, np.float32).T - 8)
    (w8,) = w4.w4a8_step_rows(scale, jnp.float32(0.5))
    np.testing.assert_array_equal(np.asarray(w8), np.asarray(scale).T * np.float32(0.5))


@pytest.mark.parametrize("zero", [False, True])
def test_prebuilt_rows_leave_no_transpose_in_the_call(zero):
    """With step_rows built beforehand (a loader's job) the call is the kernel alone; without, it transposes
    the scales (and zeros) itself."""
    x, p, s, z = _operands(40, 512, 1024, zero=zero)
    rows = jax.eval_shape(w4.step_rows, s, z)
    cfg = MgpuW4Config(tile_tokens=64, stages=w4.fit_stages(64))
    own = str(jax.make_jaxpr(lambda x, p, s, z: w4.w4a16_matmul_mgpu(x, p, s, z, config=cfg))(x, p, s, z))
    given = str(jax.make_jaxpr(lambda x, p, s, z, r: w4.w4a16_matmul_mgpu(x, p, s, z, config=cfg, rows=r))(
        x, p, s, z, rows))
    assert own.count("transpose[permutation") == (2 if zero else 1) and "transpose[permutation" not in given
    text = jax.jit(lambda x, p, s, z, r: w4.w4a16_matmul_mgpu(x, p, s, z, config=cfg, rows=r)).trace(
        x, p, s, z, rows).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 1


def test_rows_that_do_not_match_the_weights_are_refused():
    x, p, s, z = _operands(40, 512, 1024, zero=True)
    sym_rows = jax.eval_shape(w4.step_rows, s)                      # no zero rows for asymmetric weights
    with pytest.raises(ValueError, match=r"w4a16_matmul_mgpu: rows .* expected"):
        w4.w4a16_matmul_mgpu.trace(x, p, s, z, rows=sym_rows)
    xq, si, p8, ws = _w4a8_operands(40, 512, 1024)
    with pytest.raises(ValueError, match=r"w4a8_matmul_mgpu: rows .*\(8, 512\).* expected .*\(8, 512\)"):
        w4.w4a8_matmul_mgpu.trace(xq, si, p8, ws, rows=(jax.ShapeDtypeStruct((8, 512), jnp.bfloat16),))


@pytest.mark.parametrize("zero", [False, True])
def test_a_group_of_weights_lowers_to_one_kernel_with_a_pipeline_per_weight(wgmma_operands, zero):
    """q, k and v (N 512, 128, 128) in one launch: one Mosaic GPU kernel whose body traces each weight's
    pipeline (three times the wgmma of one weight's kernel), writing [M, 768]."""
    cfg = MgpuW4Config(tile_tokens=16, stages=w4.fit_stages(16, split_k=2), split_k=2)
    parts = [_operands(40, n, 1024, zero=zero) for n in (512, 128, 128)]
    x = parts[0][0]
    packed, scale = tuple(p[1] for p in parts), tuple(p[2] for p in parts)
    zeros = tuple(p[3] for p in parts) if zero else None
    group = jax.jit(lambda x, p, s, z: w4.w4a16_matmul_mgpu_group(x, p, s, z, config=cfg))
    assert jax.eval_shape(group, x, packed, scale, zeros).shape == (40, 768)
    text = group.trace(x, packed, scale, zeros).lower(lowering_platforms=("cuda",)).as_text()
    grouped_calls, wgmma_operands[:] = len(wgmma_operands), []
    jax.jit(lambda x, p, s, z: w4.w4a16_matmul_mgpu(x, p, s, z, config=cfg)).trace(
        *parts[0]).lower(lowering_platforms=("cuda",))
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 1
    assert len(wgmma_operands) > 0 and grouped_calls == 3 * len(wgmma_operands)


def test_a_w4a8_group_lowers_to_one_kernel_with_each_weights_own_codes(wgmma_operands):
    """W4A8 q, k and v (N 512, 128, 256) with three input scales through dispatch.quantized_matmul_group: x is
    quantized once per weight and one Mosaic GPU kernel runs a pipeline per weight, each on its own codes
    (three times the e4m3 wgmma of one weight's kernel)."""
    from pallas_kernels import dispatch
    ns, k = (512, 128, 256), 1024
    plan = dispatch.group_plan("w4a8", 40, ns, k)
    assert plan.path == "mgpu" and dispatch.group_plan("w4a8", 1, ns, k).path == "gemv"
    weights = tuple({"packed": jax.ShapeDtypeStruct((n, k // 2), jnp.uint8),
                     "weight_scale": jax.ShapeDtypeStruct((n, k // 128), jnp.float32),
                     "input_scale": jax.ShapeDtypeStruct((), jnp.float32)} for n in ns)
    x = jax.ShapeDtypeStruct((40, k), jnp.bfloat16)
    fn = jax.jit(lambda x, ws: dispatch.quantized_matmul_group(x, "w4a8", ws, plan))
    assert jax.eval_shape(fn, x, weights).shape == (40, sum(ns))
    text = fn.trace(x, weights).lower(lowering_platforms=("cuda",)).as_text()
    grouped_calls = [a.dtype for a in wgmma_operands]
    wgmma_operands[:] = []
    w4.w4a8_matmul_mgpu.trace(*_w4a8_operands(40, 512, k), config=plan.config).lower(lowering_platforms=("cuda",))
    calls = [a.dtype for a in wgmma_operands]
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 1
    (call,) = [line for line in text.splitlines() if "stablehlo.custom_call @mosaic_gpu" in line]
    subs = plan.config.sub_steps                        # each x is an operand once per sub-step
    assert call.rsplit(" : (", 1)[1].count("x1024xf8E4M3FN>") == 3 * subs        # one padded x per weight
    assert calls and grouped_calls == 3 * calls and set(calls) == {jnp.dtype(jnp.float8_e4m3fn)}


def test_a_group_refuses_weights_that_differ_in_group_or_shape():
    x, p, s, _ = _operands(40, 512, 1024)
    _, p2, s64, _ = _operands(40, 256, 1024, scale_cols=16)             # group 64 beside group 128
    with pytest.raises(ValueError, match=r"weight 1: .*scale \(256, 16\)"):
        w4.w4a16_matmul_mgpu_group.trace(x, (p, p2), (s, s64))
    _, p3, s3, _ = _operands(40, 192, 1024)                             # N off the 128-channel tile
    with pytest.raises(ValueError, match=r"weight 1: .*packed \(192, 512\)"):
        w4.w4a16_matmul_mgpu_group.trace(x, (p, p3), (s, s3))


@pytest.fixture
def pipeline_states(monkeypatch):
    """The pipeline_state each emitted warp-specialized pipeline got (None: a standalone pipeline); jit
    caches cleared first, as for wgmma_operands."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    jax.clear_caches()
    states = []
    emit = plgpu.emit_pipeline_warp_specialized

    def recording(*args, pipeline_state=None, **kwargs):
        states.append(pipeline_state)
        return emit(*args, pipeline_state=pipeline_state, **kwargs)

    monkeypatch.setattr(plgpu, "emit_pipeline_warp_specialized", recording)
    return states


@pytest.mark.parametrize("chain", [False, True])
def test_chained_tiles_lower_with_a_pipeline_state_per_tile(pipeline_states, chain):
    """chain_tiles: every pipeline of a CTA's tiles (one per weight of a group) gets a traced START / STEADY /
    STOP state, and the stages are cut to a divisor of the K-steps per tile (8 / split 2 = 4 of fit's more),
    which a chained pipeline needs."""
    cfg = MgpuW4Config(tile_tokens=16, stages=w4.fit_stages(16, split_k=2), split_k=2, chain_tiles=chain)
    assert cfg.stages > 4
    parts = [_operands(40, n, 1024) for n in (256, 128)]
    group = jax.jit(lambda x, p, s: w4.w4a16_matmul_mgpu_group(x, p, s, config=cfg))
    text = group.trace(parts[0][0], tuple(p[1] for p in parts), tuple(p[2] for p in parts)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 1
    traced = [s for s in pipeline_states if s is not None]      # besides one stateless allocation query
    assert len(pipeline_states) == 3 and len(traced) == (2 if chain else 0)
    if chain:
        assert all(s.dtype == jnp.int32 and s.shape == () for s in traced)


def test_chain_stages_divide_the_k_steps():
    assert [_mgpu.chain_stages(k, s) for k, s in ((32, 6), (7, 4), (8, 8), (12, 5), (2, 4))] == [4, 1, 8, 4, 2]


@pytest.mark.skipif(jax.default_backend() != "gpu" or not _mgpu.is_hopper(), reason="Mosaic GPU kernels need Hopper")
@pytest.mark.parametrize("kind", ["w4a16", "w4a8"])
@pytest.mark.parametrize("ns", [(512,), (512, 128, 256)])
def test_chained_tiles_give_the_same_bits_on_hopper(kind, ns):
    """chain_tiles changes when loads are issued, not the arithmetic: on a grid of about 7 token tiles per SM
    (2040 tokens, 16 per tile, 896 or 512 channels), single weights and groups give bit-identical outputs with
    and without it (the unchained kernels' numbers are checked against the references by gemm.py --steps
    check and test_dense_group)."""
    rng = np.random.default_rng(11 + len(ns))
    m, k = 2040, 512
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    packed = tuple(jnp.asarray(npo.rand_packed(rng, n, k)) for n in ns)
    scale = tuple(jnp.asarray(rng.uniform(0.005, 0.02, (n, k // 128)), jnp.float32) for n in ns)
    outs = []
    for chain in (False, True):
        cfg = MgpuW4Config(tile_tokens=16, stages=w4.fit_stages(16), chain_tiles=chain)
        if kind == "w4a8":
            input_scale = tuple(jnp.float32(s) for s in (0.02, 0.03, 0.05)[:len(ns)])
            xq = tuple(cm.quantize_fp8_static(x, s) for s in input_scale)
            fn = jax.jit(lambda xq, p, s, cfg=cfg: w4.w4a8_matmul_mgpu_group(xq, input_scale, p, s, config=cfg))
            outs.append(np.asarray(fn(xq, packed, scale), np.float32))
        else:
            bf16_scale = tuple(s.astype(jnp.bfloat16) for s in scale)
            fn = jax.jit(lambda x, p, s, cfg=cfg: w4.w4a16_matmul_mgpu_group(x, p, s, config=cfg))
            outs.append(np.asarray(fn(x, packed, bf16_scale), np.float32))
    np.testing.assert_array_equal(outs[1], outs[0])
    assert np.abs(outs[0]).max() > 0 and outs[0].shape == (m, sum(ns))
