"""Probe kernel questions on the GPU before benchmarks/gemm.py times them in full:

1. The word GEMV (pallas_kernels/w4a16_gemv.py) at M=1: a config sweep on Llama-3.1 8B and 70B layer shapes
   (int4 g128, symmetric and asymmetric), checked against the reference, timed against the current
   dispatcher plan (packed-4 skeleton) and XLA bf16.
2. The XLA FP8 path's output: f32 from cuBLASLt and a convert pass (today) against ways of asking for a
   bf16 result, per-tensor and rowwise, against torch._scaled_mm, with the custom call's output type from
   the compiled HLO.
3. XLA with native 4-bit dtypes (`xla4`): weights stored as jnp.int4 / float4_e2m1fn [N, K], dequantised
   by group scales inside the jitted matmul, so XLA may fuse the convert and scale into its own Triton
   GEMM instead of materialising a bf16 weight; timed per M against XLA bf16 and today's dispatcher plan,
   with the compiled HLO's kind of GEMM (cuBLAS call or Triton fusion).

4. The Mosaic GPU FP8 block-scaled kernel (`mgpu`, pallas_kernels/fp8_block_mgpu.py): configs checked
   against the reference, timed against the Triton kernel, XLA's FP8 per-tensor GEMM, torch._scaled_mm and
   XLA bf16.

5. The FP4 word GEMV (`fp4gemv`, pallas_kernels/fp4_gemv.py) at M=1 for NVFP4 and MXFP4: a few tiles checked
   against the reference, timed against the dispatcher's packed-4 plan.

6. The Mosaic GPU W4A16 kernel (`w4mgpu`, pallas_kernels/w4a16_mgpu.py) from M=16 up: token tiles and K
   splits per M on the canonical uint8 weights, then the best on asymmetric weights, checked against the
   reference, timed against the dispatcher's plan and XLA bf16.

7. W4A8 at M=1 on the word GEMV (`w4a8gemv`): the E4M3 activation codes as the GEMV's x and input_scale
   after the sum, per tile, checked against the W4A8 reference, timed against the dispatcher's packed-4 plan
   and XLA bf16.

8. W4A8 on FP8 tensor cores (`w4a8mgpu`, w4a16_mgpu.w4a8_matmul_mgpu): token tiles and K splits per M,
   checked against the W4A8 reference, timed against the dispatcher's plan and XLA bf16.

9. W4A16 with groups of 64 and 32 (`w4groups`): the dispatcher's plan against its plan without the Mosaic
   kernel, checked, with the group-128 plan timed twice (the run's noise) and XLA bf16.

10. Compile time (`compile`) of chains of 1, 8 and 32 planned GEMMs (8B o shape) per recipe at M=1 and 16.

11. Wall time against the device's own (`trace`, benchmarks/device_trace.py): per point and recipe (XLA bf16,
    W4A16, W4A8 planned), time_jax's wall time beside a profiler trace of the same executable: kernels per
    call, their summed device time, the GPU's busy fraction and the costliest kernels.

12. The grouped GEMV at M=1 (`gemvgroup`, w4a16_gemv.w4a16_gemv_group) on the fused shapes qkv and gate_up,
    split into the projections the models run (8b.qkv = q 4096 + k 1024 + v 1024, gate_up = two halves):
    one launch over the separate weights on the fused shape's planned tile, checked against the reference,
    timed against the separate planned calls, the planned GEMV of the fused weight and XLA bf16. Run 37 (H100):
    grouped beat separate on all four, so pallas_kernels.dispatch.group_plan groups at M=1 too.

13. The grouped GEMV's tile (`gemvgroupcfg`): a sweep of tiles and K splits on the fused qkv / gate_up shapes,
    checked, against the fused weight's planned GEMV and the separate planned GEMVs.

14. K splits of the W4A16 / W4A8 Mosaic GPU kernels (`w4split`): 1 to 16 on the plan's token tile, where few
    CTA tiles leave the last wave mostly idle, checked, against the plan and XLA bf16.

15. Chained tiles (`chain`): the W4A16 / W4A8 / FP8 block Mosaic kernels on the plan's tiles with
    chain_tiles off and on (one pipeline of pipelines per CTA), checked, against XLA bf16.

16. K splits of the FP8 block Mosaic kernel (`fp8split`): 1, 2 and 4 on the plan's tile, checked, against
    XLA bf16.

17. The word GEMVs' tiles by device time (`gemvtiles`): W4A16 (sym, asym), NVFP4 and MXFP4 at M=1, the
    dispatcher's planned tile against GEMV_TILE_SWEEP's tiles with splits aiming at 0, 2 and 4 programs per
    SM, each with and without the register prefetch (asym and FP4: the plan and every third candidate),
    each checked against the reference (run 62-63: the tiles after the FMA-chain decode, before the
    prefetch existed).

18. K splits of the planned GEMV tiles (`gemvsplits`): W4A16 and NVFP4 at M=1, the plan's tile at every
    split from 1 to 8, by device time, checked: whether a split that fills whole waves (run 67: 8b.down's
    512 programs at 3 per SM are 1.29 waves) beats the plan's power of two. `gemvstages`: the same with
    1 to 5 pipelining stages and with 8 warps (run 67: 168 registers a thread, 18.75 % occupancy).

19. The word GEMVs' register prefetch (`gemvprefetch`): W4A16, NVFP4 and MXFP4 at M=1, the plan with and
    without GemvConfig.prefetch, and with prefetch on half the channels, half the K chunk or 8 warps (the
    second tile of registers it costs), by device time, checked. (Run 69 measured fp4_gemv's byte-permute
    decode against the bit decode it replaced, in a part since removed.)

20. The FP4 recipes' paths from M=2 (`fp4paths`): NVFP4, MXFP4 and the W4A8_FP4 recipes on the plan
    (packed-4 Triton kernel) and on dequantise-then-dot ('xla_dequant'), checked, against XLA bf16: the
    crossover XLA_DEQUANT_FROM should take (run 75: at M=16 / 64 the packed-4 plans ran 2-10x XLA bf16's time).

21. The deep GEMV class's tiles (`gemvdeep`): W4A16 at M=1 on K >= GEMV_DEEP_K (down, the 70B layers), the
    plan against 16 and 32 channels x 512 and 1024 K x prefetch off / on x splits aiming at 2 and 4
    programs per SM, by device time, checked (between the deep tile and the 16-channel prefetch tile).

22. 128-K sub-steps per pipeline step (`substeps`): the W4A16, NVFP4, MXFP4 and W4A8 Mosaic kernels on the
    plan's tiles with MgpuW4Config.sub_steps 1, 2 and 4 (stages refitted), checked, against XLA bf16.

23. 128 channels per compute warpgroup (`wg128`): W4A16 sym / asym on 256-channel CTA tiles (one x tile for
    twice the weights) with 1 and 2 sub-steps at the plan's K split and twice it, checked, against the plan.

  PYTHONPATH=. python3 benchmarks/gemm_probe.py --out DIR     # gemv,fp8; --parts gemv, fp8, xla4, mgpu,
                                                              # fp4gemv, w4mgpu, w4a8gemv, w4a8mgpu,
                                                              # w4groups, compile, trace, gemvgroup,
                                                              # gemvgroupcfg, w4split, chain, fp8split,
                                                              # gemvtiles, gemvsplits, gemvstages,
                                                              # gemvprefetch, fp4paths, gemvdeep,
                                                              # substeps, wg128
Shapes: gemm.py's fused layers ("8b.qkv", "8b.gate_up", ...) and the unfused ones the Flax models run
("8b.q" = o's shape, "8b.kv" for k_proj and v_proj, "8b.gate" for gate_proj and up_proj; 70b the same).
Timing as benchmarks/gemm.py (it is imported): distinct weight sets per executable, median of 5 trials.
Writes DIR/gemm_probe_<card>_<date>.json and prints a table.
"""
import argparse
import dataclasses
import datetime
import gc
import itertools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gemm as G  # noqa: E402  (sets XLA_PYTHON_CLIENT_PREALLOCATE before jax is imported)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from pallas_kernels import _common as cm  # noqa: E402
from pallas_kernels import _mgpu, dispatch, fp4_gemv, fp4_mgpu, fp8, w4a16_gemv  # noqa: E402
from pallas_kernels.w4a16_gemv import GemvConfig  # noqa: E402

# Llama-3.1 layer (N, K): gemm.py's fused shapes plus the separate projections the models call one by one.
UNFUSED = {"8b": {"q": (4096, 4096), "kv": (1024, 4096), "gate": (14336, 4096)},
           "70b": {"q": (8192, 8192), "kv": (1024, 8192), "gate": (28672, 8192)}}
SHAPES = {model: {**layers, **UNFUSED[model]} for model, layers in G.SHAPES.items()}


def time_op(op, arg_sets) -> float:
    """Seconds per call of op: gemm.py's wall clock, or with --device-time the device's own time from a
    profiler trace (host launch gaps left out; the kernel inside a jitted model step pays no such gap)."""
    if DEVICE_TIME:
        device = G.device_time(op, arg_sets)
        if device:
            return device["device_us"] / 1e6
    return G.time_jax(op, arg_sets)


DEVICE_TIME = False


def gemv_candidates(n, k, wide: bool):
    out = []
    tiles = list(itertools.product((16, 32, 64) if wide else (32,), (256, 512), (4,), (1, 2)))
    tiles += [(64, 256, 8, 1), (128, 256, 8, 1)] if wide else []
    for bn, bk, warps, unroll in tiles:
        chunks = k // bk
        for target in (2, 4):
            split = 1
            while cm.cdiv(n, bn) * split < target * cm.NUM_SMS and split * 2 * unroll <= chunks // 2:
                split *= 2
            cfg = GemvConfig(bn, bk, split, unroll, warps, 3)
            if cfg not in out:
                out.append(cfg)
    return out


def probe_gemv(copy_tbps, rows, shapes, flush):
    """shapes: "model.layer" names; the first two get the wide sweep, the rest the best configs so far."""
    top: dict = {}
    for i, name in enumerate(shapes):
        model, layer = name.split(".")
        n, k = SHAPES[model][layer]
        x = G.rand_x(1, k, seed=n)
        for recipe in ("w4a16", "w4a16_asym") if i == 0 else ("w4a16",):
            w0 = G.make_weights(recipe, n, k, seed=11)
            wb = G.weight_bytes(w0)
            reps = G.reps_for(wb, wb / (copy_tbps * 1e12))
            ws = [w0] + [G.make_weights(recipe, n, k, seed=12 + r) for r in range(reps - 1)]
            floor_us = (wb + 2 * k + 2 * n) / (copy_tbps * 1e12) * 1e6

            def record(name, op, cfg=None, check=False):
                ok, err = G.check_op(recipe, op, x, w0) if check else (None, None)
                t = G.time_jax(op, [(x, w) for w in ws])
                rows.append({"part": "gemv", "shape": f"{model}.{layer}", "recipe": recipe, "variant": name,
                             "config": cfg, "us": round(t * 1e6, 2),
                             "pct_copy_bw": round(100 * floor_us / (t * 1e6), 1), "check_ok": ok, "err": err})
                return t

            base = {"plan": record("packed4_plan", G.jax_op(recipe))}
            if recipe == "w4a16":
                wbf = [G.make_weights("xla_bf16", n, k, seed=5 + r) for r in range(G.reps_for(2 * n * k, 1e-5))]
                tb = G.time_jax(G.jax_op("xla_bf16"), [(x, w) for w in wbf])
                rows.append({"part": "gemv", "shape": f"{model}.{layer}", "recipe": "xla_bf16", "variant": "xla",
                             "us": round(tb * 1e6, 2)})
                del wbf
            wide = i < 2
            cands = gemv_candidates(n, k, wide) if recipe == "w4a16" else top.get("best", [])[:3]
            if recipe == "w4a16" and not wide:
                cands = cands + [c for c in top.get("best", [])[:6] if c not in cands]
            timed = []
            for cfg in cands:
                op = (lambda c: lambda xx, w: w4a16_gemv.w4a16_gemv(xx, w["packed"], w["scale"], w.get("zero"),
                                                                    config=c))(cfg)
                try:
                    timed.append((record("gemv", op, str(cfg)), cfg))
                except Exception as e:  # noqa: BLE001
                    G.log(f"  gemv {cfg} failed: {repr(e)[:200]}")
            timed.sort(key=lambda tc: tc[0])
            if wide and recipe == "w4a16":
                top["best"] = [c for _, c in timed] + top.get("best", [])
            if timed:
                t, cfg = timed[0]
                ok, err = G.check_op(recipe, lambda xx, w: w4a16_gemv.w4a16_gemv(
                    xx, w["packed"], w["scale"], w.get("zero"), config=cfg), x, w0)
                rows.append({"part": "gemv_check", "shape": f"{model}.{layer}", "recipe": recipe,
                             "config": str(cfg), "check_ok": ok, "err": err})
                if not ok:
                    G.log(f"  CHECK FAILED {model}.{layer} {recipe} {cfg}: err {err}")
                G.log(f"{model}.{layer} {recipe} M=1: floor {floor_us:.1f} us, packed4 plan "
                      f"{base['plan'] * 1e6:.1f} us, best gemv {t * 1e6:.1f} us "
                      f"({100 * floor_us / (t * 1e6):.0f}% copy) {cfg}")
            del ws, w0
            gc.collect()
            flush()


def fp8_variants():
    def f32_out(xq, sx, wq, sw):                        # f32 from cuBLASLt, then scale and convert
        return fp8.fp8_matmul_xla(xq, sx, wq, sw)

    def xla_fast(xq, sx, wq, sw):                       # bf16 out of the GEMM (fast accumulation), scale after
        return fp8.fp8_matmul_xla(xq, sx, wq, sw, fast_accumulation=True)

    def bf16_highest(xq, sx, wq, sw):                   # the same at HIGHEST precision (no fast accumulation?)
        y = lax.dot_general(xq, wq, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
                            preferred_element_type=jnp.bfloat16)
        s = sx * sw if sx.ndim == 0 else sx[:, None] * sw[None, :]
        return (y.astype(jnp.float32) * s).astype(jnp.bfloat16)

    return {"f32_out": f32_out, "xla_fast": xla_fast, "bf16_highest": bf16_highest}


def probe_fp8(rows, flush, shapes=("8b.gate_up", "8b.qkv"), ms=(1024, 4096)):
    import torch
    for (model, layer), m in itertools.product([s.split(".") for s in shapes], ms):
        n, k = SHAPES[model][layer]
        x = G.rand_x(m, k, seed=m + n)
        reps = 4
        wq = [cm.cast_e4m3_saturating(jax.random.normal(jax.random.PRNGKey(r), (n, k)) * 64) for r in range(reps)]
        for mode in ("per_tensor", "rowwise"):
            if mode == "per_tensor":
                sx, sw = jnp.float32(4.0 / 448), jnp.float32(3e-4)
                xq = cm.quantize_fp8_static(x, sx)
            else:
                xq, sx = fp8.quantize_fp8_rowwise(x)
                sw = jax.random.uniform(jax.random.PRNGKey(9), (n,), jnp.float32, 1e-4, 4e-4)
            ref = fp8.fp8_rowwise_matmul_reference(xq, sx, wq[0], sw)
            for name, fn in fp8_variants().items():
                hlo = jax.jit(fn).lower(xq, sx, wq[0], sw).compile().as_text()
                calls = [ln for ln in hlo.splitlines() if "custom_call_target=" in ln]
                out_types = sorted({ln.split("=", 1)[1].strip().split("[")[0].lstrip("(") for ln in calls})
                fusions = sum(" fusion(" in ln for ln in hlo.splitlines())
                ok, err = G.check_close(jax.jit(fn)(xq, sx, wq[0], sw), ref)
                t = G.time_jax(fn, [(xq, sx, w, sw) for w in wq])
                rows.append({"part": "fp8", "shape": f"{model}.{layer}", "M": m, "mode": mode, "variant": name,
                             "us": round(t * 1e6, 2), "tflops": round(2 * m * n * k / t / 1e12, 1),
                             "check_ok": ok, "err": err, "custom_call_out": out_types, "fusions": fusions,
                             "cublaslt_f8": any("f8" in ln and "cublas" in ln for ln in calls),
                             "gemm_config": [ln[ln.find("backend_config"):][:700] for ln in calls if "cublas" in ln]})
            tx = torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn)
            tw = [(torch.randn(n, k, device="cuda") * 64).clamp(-448, 448).to(torch.float8_e4m3fn) for _ in range(reps)]
            if mode == "per_tensor":
                sa = sb = torch.tensor(1.0, device="cuda")
            else:
                sa, sb = torch.rand(m, 1, device="cuda"), torch.rand(1, n, device="cuda")
            for fast in (False, True):
                t = G.time_torch(lambda w, f=fast: torch._scaled_mm(tx, w.t(), scale_a=sa, scale_b=sb,
                                                                    out_dtype=torch.bfloat16, use_fast_accum=f),
                                 [(w,) for w in tw])
                rows.append({"part": "fp8", "shape": f"{model}.{layer}", "M": m, "mode": mode,
                             "variant": f"torch_scaled_mm_fast{int(fast)}", "us": round(t * 1e6, 2),
                             "tflops": round(2 * m * n * k / t / 1e12, 1)})
            del tw
            torch.cuda.empty_cache()
            flush()
        del wq
        gc.collect()


def xla4_weights(variant, n, k, seed):
    """Random weights in native 4-bit XLA dtypes; the dequantised bf16 matrix is `xla4_dequant`."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    if variant in ("s4_sym", "s4_asym"):
        w = {"q": jax.random.randint(ks[0], (n, k), -8, 8).astype(jnp.int4),
             "s": jax.random.uniform(ks[1], (n, k // 128), jnp.float32, 0.005, 0.02).astype(jnp.bfloat16)}
        if variant == "s4_asym":
            w["z"] = jax.random.randint(ks[2], (n, k // 128), -4, 4).astype(jnp.bfloat16)
        return w
    q = jax.random.normal(ks[0], (n, k), jnp.float32).astype(jnp.float4_e2m1fn)
    if variant == "f4_nvfp4":
        bs = cm.cast_e4m3_saturating(jax.random.uniform(ks[1], (n, k // 16), jnp.float32, 0.5, 400.0))
        return {"q": q, "s": bs, "g": jnp.float32(2e-5)}
    e = jax.random.randint(ks[1], (n, k // 32), 118, 126).astype(jnp.uint8)
    return {"q": q, "s": lax.bitcast_convert_type(e, jnp.float8_e8m0fnu)}


def xla4_dequant(variant, w, dtype=jnp.bfloat16):
    """[N, K] dtype from the native 4-bit weights: convert, subtract zero (asym), times the group scale."""
    q = w["q"]
    n, k = q.shape
    s = w["s"].astype(jnp.float32) * w["g"] if variant == "f4_nvfp4" else w["s"]
    g = k // s.shape[1]
    v = q.astype(dtype).reshape(n, k // g, g)
    if "z" in w:
        v = v - w["z"].astype(dtype)[:, :, None]
    return (v * s.astype(dtype)[:, :, None]).reshape(n, k)


def u4_bitcast_dequant(w):
    """Our canonical uint8 [N, K/2] (low nibble = even k) bitcast to uint4 [N, K] inside the jit, then
    (u - 8) * scale: whether XLA fuses this from today's storage."""
    n = w["packed"].shape[0]
    u = lax.bitcast_convert_type(w["packed"], jnp.uint4).reshape(n, -1)
    return xla4_dequant("s4_sym", {"q": u.astype(jnp.bfloat16) - 8, "s": w["scale"]})


def probe_xla4(copy_tbps, rows, shapes, ms, flush, hlo_dir=None):
    """XLA's own fusion of a native-4-bit dequantise into the GEMM, per M, against bf16 and our plan."""
    variants = ("s4_sym", "s4_asym", "f4_nvfp4", "f4_mxfp4")
    for name in shapes:
        model, layer = name.split(".")
        n, k = SHAPES[model][layer]
        for m in ms:
            x = G.rand_x(m, k, seed=m + n)
            ops = {"xla_bf16": ("xla_bf16", G.jax_op("xla_bf16"), G.make_weights),
                   "plan_w4a16": ("w4a16", G.jax_op("w4a16"), G.make_weights)}
            for v in variants:
                ops[v] = (v, (lambda vv: lambda xx, w: G._dot_tn(xx, xla4_dequant(vv, w)))(v), xla4_weights)
            ops["u4_bitcast"] = ("w4a16", lambda xx, w: G._dot_tn(xx, u4_bitcast_dequant(w)), G.make_weights)
            for label, (kind, op, maker) in ops.items():
                w0 = maker(kind, n, k, 11)
                wb = G.weight_bytes(w0) if maker is G.make_weights else n * k // 2 + G.weight_bytes(
                    {kk: vv for kk, vv in w0.items() if kk != "q"})
                reps = G.reps_for(wb, wb / (copy_tbps * 1e12))
                ws = [w0] + [maker(kind, n, k, 12 + r) for r in range(reps - 1)]
                try:
                    hlo = jax.jit(op).lower(x, w0).compile().as_text()
                    if maker is xla4_weights:
                        ref = jnp.dot(x.astype(jnp.float32), xla4_dequant(kind, w0, jnp.float32).T,
                                      precision=lax.Precision.HIGHEST)
                        ok, err = G.check_close(jax.jit(op)(x, w0), ref)
                    elif kind == "w4a16":
                        ok, err = G.check_op(kind, op, x, w0)
                    else:
                        ok, err = None, None
                    t = G.time_jax(op, [(x, w) for w in ws])
                except Exception as e:  # noqa: BLE001
                    G.log(f"  xla4 {name} M={m} {label} failed: {repr(e)[:300]}")
                    continue
                floor_us = (wb + 2 * m * k + 2 * m * n) / (copy_tbps * 1e12) * 1e6
                row = {"part": "xla4", "shape": name, "M": m, "variant": label, "us": round(t * 1e6, 2),
                       "pct_copy_bw": round(100 * floor_us / (t * 1e6), 1),
                       "tflops": round(2 * m * n * k / t / 1e12, 1), "check_ok": ok, "err": err,
                       "triton_gemm": hlo.count('"kind":"__triton'), "cublas": hlo.count("__cublas"),
                       "fusions": sum(" fusion(" in ln for ln in hlo.splitlines())}
                rows.append(row)
                if m in (1, 1024) and label in ("s4_sym", "u4_bitcast") and hlo_dir:
                    with open(os.path.join(hlo_dir, f"hlo_xla4_{name}_{label}_m{m}.txt"), "w") as f:
                        f.write(hlo)
                G.log(f"xla4 {name} M={m} {label:12s} {row['us']:9.1f} us {row['pct_copy_bw']:5.1f}% copy "
                      f"{row['tflops']:6.0f} TF ok={ok} triton={row['triton_gemm']} cublas={row['cublas']} "
                      f"fusions={row['fusions']}")
                del ws, w0
                gc.collect()
                flush()


def _large_m_points(shapes, ms):
    """(shape name, M, N, K, fresh x [M, K]) for every "model.layer" shape and M."""
    for name in shapes:
        model, layer = name.split(".")
        n, k = SHAPES[model][layer]
        for m in ms:
            yield name, m, n, k, G.rand_x(m, k, seed=m + n)


def _record_large_m(rows, flush, part, shape, m, n, k, variant, op, arg_sets, checker=None):
    """Checks (checker() -> (ok, err), optional) and times op over arg_sets, appends and logs a row; a
    failure is logged and skipped."""
    try:
        ok, err = checker() if checker else (None, None)
        t = time_op(op, arg_sets)
    except Exception as e:  # noqa: BLE001
        G.log(f"  {part} {shape} M={m} {variant} failed: {repr(e)[:600]}")
        return
    row = {"part": part, "shape": shape, "M": m, "variant": variant, "us": round(t * 1e6, 2),
           "tflops": round(2 * m * n * k / t / 1e12, 1), "check_ok": ok, "err": err}
    rows.append(row)
    G.log(f"{part} {shape} M={m} {variant:18s} {row['us']:9.1f} us {row['tflops']:7.1f} TF ok={ok} err={err}")
    flush()


def _record_xla_bf16(rows, flush, part, shape, m, n, k, x, seed=70):
    """The point's XLA bf16 baseline row (two weight sets), then the memory handed back."""
    wb = [G.make_weights("xla_bf16", n, k, seed=seed + r) for r in range(2)]
    _record_large_m(rows, flush, part, shape, m, n, k, "xla_bf16", G.jax_op("xla_bf16"), [(x, w) for w in wb])
    del wb
    gc.collect()
    flush()


MGPU_CONFIGS = (("m64n128_wgN_s4", dict(tile_m=64, tile_n=128, wg_dim="n", stages=4)),
                ("m64n128_wgM_s4", dict(tile_m=64, tile_n=128, wg_dim="m", stages=4)),
                ("m64n128_wgM_s5", dict(tile_m=64, tile_n=128, wg_dim="m", stages=5)),
                ("m64n128_wgM_s5_w16", dict(tile_m=64, tile_n=128, wg_dim="m", stages=5, grid_tile_width=16)),
                ("m128n128_wgM_s3", dict(tile_m=128, tile_n=128, wg_dim="m", stages=3)),
                ("m64n256_wgM_s3", dict(tile_m=64, tile_n=256, wg_dim="m", stages=3)))


def probe_mgpu(rows, shapes, ms, flush):
    """The Mosaic GPU FP8 block-scaled GEMM per config, against its reference and the other FP8 paths."""
    import torch

    from pallas_kernels import fp8_block_mgpu as mg
    for name, m, n, k, x in _large_m_points(shapes, ms):
        xq, sx = fp8.quantize_fp8_1x128(x)
        ws = [G.make_weights("fp8_block", n, k, seed=40 + r) for r in range(2)]
        ref = fp8.fp8_block_scaled_reference(xq[:64], sx[:64], ws[0]["wq"][:1024], ws[0]["w_scale"][:8])

        def record(variant, op, check=True):
            checker = (lambda: G.check_close(jax.jit(op)(xq, sx, ws[0])[:64, :1024], ref)) if check else None
            _record_large_m(rows, flush, "mgpu", name, m, n, k, variant, op, [(xq, sx, w) for w in ws], checker)

        for label, kw in MGPU_CONFIGS:
            cfg = mg.MgpuFp8Config(**kw)
            if mg.can_use(m, n, k, cfg):
                record(label, lambda a, s, w, c=cfg: mg.fp8_block_matmul_mgpu(a, s, w["wq"], w["w_scale"],
                                                                               config=c))
        record("triton", lambda a, s, w: fp8.fp8_matmul(a, s, w["wq"], w["w_scale"], mode="block",
                                                         config=dispatch.FP8_LARGE_M if m > 64 else None))
        for fast in (False, True):
            record(f"xla_fp8_pt_fast{int(fast)}", lambda a, s, w, f=fast: fp8.fp8_matmul_xla(
                a, jnp.float32(1e-2), w["wq"], jnp.float32(3e-4), fast_accumulation=f), check=False)
        wb = [G.make_weights("xla_bf16", n, k, seed=50 + r) for r in range(2)]
        _record_large_m(rows, flush, "mgpu", name, m, n, k, "xla_bf16", G.jax_op("xla_bf16"), [(x, w) for w in wb])
        tx = torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn)
        tw = [(torch.randn(n, k, device="cuda") * 64).clamp(-448, 448).to(torch.float8_e4m3fn) for _ in range(2)]
        one = torch.tensor(1.0, device="cuda")
        for fast in (False, True):
            t = G.time_torch(lambda w, f=fast: torch._scaled_mm(tx, w.t(), scale_a=one, scale_b=one,
                                                                out_dtype=torch.bfloat16, use_fast_accum=f),
                             [(w,) for w in tw])
            rows.append({"part": "mgpu", "shape": name, "M": m, "variant": f"torch_scaled_mm_fast{int(fast)}",
                         "us": round(t * 1e6, 2), "tflops": round(2 * m * n * k / t / 1e12, 1)})
        for r in rows[-2:]:
            G.log(f"mgpu {name} M={m} {r['variant']:18s} {r['us']:9.1f} us {r['tflops']:7.1f} TF")
        del ws, wb, tw
        torch.cuda.empty_cache()
        gc.collect()
        flush()


def fp4_gemv_candidates(n, k):
    from pallas_kernels import fp4_gemv
    out = [fp4_gemv.default_config(n, k)]
    w4 = dispatch.gemv_config(n, k, 128)
    for cfg in (w4, GemvConfig(16, 512, w4.split_k, 2, 4, 3), GemvConfig(32, 256, w4.split_k, 2, 4, 3),
                GemvConfig(64, 256, max(w4.split_k, 1), 1, 4, 3)):
        if cfg not in out and fp4_gemv.config_is_valid("nvfp4", cfg):
            out.append(cfg)
    return out


def probe_fp4_gemv(copy_tbps, rows, shapes, flush):
    """NVFP4 / MXFP4 at M=1: the word GEMV per tile against the packed-4 plan."""
    from pallas_kernels import fp4_gemv
    for name in shapes:
        model, layer = name.split(".")
        n, k = SHAPES[model][layer]
        x = G.rand_x(1, k, seed=n + 7)
        for recipe in ("nvfp4", "mxfp4"):
            w0 = G.make_weights(recipe, n, k, seed=11)
            wb = G.weight_bytes(w0)
            reps = G.reps_for(wb, wb / (copy_tbps * 1e12))
            ws = [w0] + [G.make_weights(recipe, n, k, seed=12 + r) for r in range(reps - 1)]
            floor_us = (wb + 2 * k + 2 * n) / (copy_tbps * 1e12) * 1e6

            def gemv(c):
                if recipe == "nvfp4":
                    return lambda xx, w: fp4_gemv.nvfp4_gemv(xx, w["packed"], w["block_scale"], w["global_scale"],
                                                             config=c)
                return lambda xx, w: fp4_gemv.mxfp4_gemv(xx, w["packed"], w["scale"], config=c)

            for variant, op in [("packed4_plan", G.jax_op(recipe))] + [(str(c), gemv(c)) for c in
                                                                       fp4_gemv_candidates(n, k)]:
                try:
                    ok, err = G.check_op(recipe, op, x, w0)
                    t = G.time_jax(op, [(x, w) for w in ws])
                except Exception as e:  # noqa: BLE001
                    G.log(f"  fp4gemv {name} {recipe} {variant} failed: {repr(e)[:300]}")
                    continue
                row = {"part": "fp4gemv", "shape": name, "recipe": recipe, "variant": variant,
                       "us": round(t * 1e6, 2), "pct_copy_bw": round(100 * floor_us / (t * 1e6), 1),
                       "check_ok": ok, "err": err}
                rows.append(row)
                G.log(f"fp4gemv {name} {recipe} {variant[:60]:60s} {row['us']:8.1f} us {row['pct_copy_bw']:5.1f}% "
                      f"ok={ok}")
            del ws, w0
            gc.collect()
            flush()


def w4_mgpu_configs(m):
    """(label, config): token tiles and K splits suited to M, stages as shared memory allows."""
    from pallas_kernels import w4a16_mgpu as w4
    if m <= 16:
        points = [(16, 1), (16, 2), (16, 4), (16, 8)]
    elif m <= 64:
        points = [(64, 1), (64, 2), (64, 4), (32, 1)]
    elif m <= 256:
        points = [(128, 1), (128, 2), (128, 4), (64, 1), (64, 2), (256, 1), (256, 2), (256, 4)]
    else:
        points = [(128, 1), (256, 1)]
    return [(f"t{t}_k{split}", w4.MgpuW4Config(tile_tokens=t, stages=w4.fit_stages(t, split_k=split), split_k=split))
            for t, split in points]


def regroup(w: dict, group: int, seed: int) -> dict:
    """W4A16 weights of group 128 as weights of a smaller group: every sub-group gets its own scale (the
    group's times a random factor in [0.5, 1.5]) and, where there are zeros, its own random zero."""
    n, groups = w["scale"].shape
    ks = jax.random.split(jax.random.PRNGKey(200 + seed), 2)
    shape = (n, groups * (128 // group))
    factor = jax.random.uniform(ks[0], shape, jnp.float32, 0.5, 1.5)
    out = {**w, "scale": (jnp.repeat(w["scale"].astype(jnp.float32), 128 // group, axis=1) * factor
                          ).astype(w["scale"].dtype)}
    if w.get("zero") is not None:
        out["zero"] = jax.random.randint(ks[1], shape, 4, 12).astype(w["zero"].dtype)
    return out


def probe_w4_mgpu(rows, shapes, ms, flush):
    """The Mosaic GPU W4A16 kernel (swap-AB, weights decoded in registers) on the canonical uint8 weights:
    symmetric per tiling, then the best tiling on asymmetric weights, each checked against the reference,
    timed against the dispatcher's plan and XLA bf16."""
    from pallas_kernels import w4a16_mgpu as w4
    for name, m, n, k, x in _large_m_points(shapes, ms):
        best = None
        for recipe in ("w4a16", "w4a16_asym"):
            ws = [G.make_weights(recipe, n, k, seed=60 + r) for r in range(2)]

            def record(variant, op, weights=ws):
                _record_large_m(rows, flush, "w4mgpu", name, m, n, k, f"{recipe}.{variant}", op,
                                [(x, w) for w in weights], lambda: G.check_op(recipe, op, x, weights[0]))
                last = rows[-1] if rows else {}
                return last["us"] if last.get("variant") == f"{recipe}.{variant}" and last.get("M") == m else None

            kernel = lambda c: lambda xx, w: w4.w4a16_matmul_mgpu(  # noqa: E731
                xx, w["packed"], w["scale"], w.get("zero"), config=c)
            for label, cfg in (w4_mgpu_configs(m) if best is None else [("best", best[1])]):
                if w4.can_use(m, n, k, 128, cfg):
                    t = record(label, kernel(cfg))
                    if t is not None and recipe == "w4a16" and (best is None or t < best[0]):
                        best = (t, cfg)
            record("plan", G.jax_op(recipe))
            del ws
        _record_xla_bf16(rows, flush, "w4mgpu", name, m, n, k, x)


def probe_w4_split(rows, shapes, ms, flush):
    """The W4A16 and W4A8 Mosaic GPU kernels on the plan's token tile with K split 1 to 16 (stages refitted),
    symmetric, each checked against the reference, against the plan and XLA bf16: how the split should
    balance the waves of CTA tiles where N is small."""
    from pallas_kernels import w4a16_mgpu as w4
    for name, m, n, k, x in _large_m_points(shapes, ms):
        for recipe in ("w4a16", "w4a8"):
            ws = [G.make_weights(recipe, n, k, seed=80 + r) for r in range(2)]
            base = dispatch.plan(recipe, m, n, k).config
            for split in (1, 2, 4, 8, 16):
                cfg = dataclasses.replace(base, split_k=split, stages=w4.fit_stages(
                    base.tile_tokens, split_k=split, asym=recipe == "w4a16", x_bytes=1 if recipe == "w4a8" else 2))
                if not w4.can_use(m, n, k, 128, cfg):
                    continue
                op = G.jax_op(recipe, plan=dispatch.Plan("mgpu", cfg))
                _record_large_m(rows, flush, "w4split", name, m, n, k, f"{recipe}.t{cfg.tile_tokens}_k{split}", op,
                                [(x, w) for w in ws], lambda op=op: G.check_op(recipe, op, x, ws[0]))
            _record_large_m(rows, flush, "w4split", name, m, n, k, f"{recipe}.plan_k{base.split_k}", G.jax_op(recipe),
                            [(x, w) for w in ws])
            del ws
        _record_xla_bf16(rows, flush, "w4split", name, m, n, k, x)


def probe_sub_steps(rows, shapes, ms, flush):
    """The swap-AB Mosaic kernels (W4A16, NVFP4, MXFP4, W4A8) on the plan's tiles with one, two and four 128-K
    sub-steps per pipeline step (stages refitted; every sub-step decoded before the first wgmma), each checked
    against the reference, against XLA bf16."""
    from pallas_kernels import w4a16_mgpu as w4
    for name, m, n, k, x in _large_m_points(shapes, ms):
        for recipe in ("w4a16", "nvfp4", "mxfp4", "w4a8"):
            p = dispatch.plan(recipe, m, n, k)
            if p.path != "mgpu":
                continue
            fp4, fp8 = recipe in fp4_mgpu.GROUPS, recipe == "w4a8"
            ws = [G.make_weights(recipe, n, k, seed=20 + r) for r in range(2)]
            for subs in w4.SUB_STEPS:
                cfg = dataclasses.replace(p.config, sub_steps=subs, stages=w4.fit_stages(
                    p.config.tile_tokens, split_k=p.config.split_k, asym=not (fp4 or fp8),
                    scale_rows=8 if fp4 else 1, x_bytes=1 if fp8 else 2, sub_steps=subs))
                if not (fp4_mgpu.can_use(recipe, m, n, k, cfg) if fp4 else w4.can_use(m, n, k, 128, cfg)):
                    continue
                op = G.jax_op(recipe, plan=dispatch.Plan("mgpu", cfg))
                _record_large_m(rows, flush, "substeps", name, m, n, k, f"{recipe}.sub{subs}_s{cfg.stages}", op,
                                [(x, w) for w in ws], lambda op=op: G.check_op(recipe, op, x, ws[0]))
            del ws
        _record_xla_bf16(rows, flush, "substeps", name, m, n, k, x)


def probe_wg128(rows, shapes, ms, flush):
    """W4A16 (sym, asym) with MgpuW4Config.wg_channels 128 (two 64-row wgmmas per slice, 256-channel CTA
    tiles) at 1 and 2 sub-steps and the plan's split or twice it (stages refitted), each checked, against the
    plan and XLA bf16."""
    from pallas_kernels import w4a16_mgpu as w4
    for name, m, n, k, x in _large_m_points(shapes, ms):
        for recipe in ("w4a16", "w4a16_asym"):
            p = dispatch.plan("w4a16", m, n, k)         # asym plans as sym (its stages: zero rows)
            if p.path != "mgpu":
                continue
            ws = [G.make_weights(recipe, n, k, seed=20 + r) for r in range(2)]
            _record_large_m(rows, flush, "wg128", name, m, n, k, f"{recipe}.plan", G.jax_op(recipe),
                            [(x, w) for w in ws])
            for subs in (1, 2):
                for split in (p.config.split_k, 2 * p.config.split_k):
                    cfg = dataclasses.replace(p.config, sub_steps=subs, split_k=split, wg_channels=128,
                                              stages=w4.fit_stages(p.config.tile_tokens, split_k=split,
                                                                   asym=recipe.endswith("asym"), sub_steps=subs,
                                                                   wg_channels=128))
                    if not w4.can_use(m, n, k, 128, cfg):
                        continue
                    op = G.jax_op(recipe, plan=dispatch.Plan("mgpu", cfg))
                    _record_large_m(rows, flush, "wg128", name, m, n, k,
                                    f"{recipe}.wg128_sub{subs}_k{split}_s{cfg.stages}", op, [(x, w) for w in ws],
                                    lambda op=op: G.check_op(recipe, op, x, ws[0]))
            del ws
        _record_xla_bf16(rows, flush, "wg128", name, m, n, k, x)


def probe_fp4_paths(rows, shapes, ms, flush, recipes=("nvfp4", "mxfp4", "w4a8_nvfp4", "w4a8_mxfp4")):
    """The FP4 recipes on the dispatcher's plan, on 'xla_dequant' and (NVFP4, MXFP4 on Hopper) on the Mosaic
    GPU kernel (fp4_mgpu.py, dispatch.fp4_mgpu_config's tiles), each checked against the reference, with XLA
    bf16 per point."""
    for name, m, n, k, x in _large_m_points(shapes, ms):
        for recipe in recipes:
            ws = [G.make_weights(recipe, n, k, seed=90 + r) for r in range(2)]
            variants = [("plan", None), ("xla_dequant", dispatch.Plan("xla_dequant"))]
            if recipe in fp4_mgpu.GROUPS and _mgpu.is_hopper():
                variants.append(("mgpu", dispatch.Plan("mgpu", dispatch.fp4_mgpu_config(recipe, m, n, k))))
            for variant, p in variants:
                op = G.jax_op(recipe, plan=p)
                _record_large_m(rows, flush, "fp4paths", name, m, n, k, f"{recipe}.{variant}", op,
                                [(x, w) for w in ws], lambda op=op: G.check_op(recipe, op, x, ws[0]))
            del ws
        _record_xla_bf16(rows, flush, "fp4paths", name, m, n, k, x)


def probe_chain(rows, shapes, ms, flush):
    """The Mosaic GPU kernels (W4A16, W4A8, FP8 block) on the plan's tiles with chain_tiles off and on (a CTA's
    tiles as one pipeline of pipelines, so the next tile's loads overlap this tile's last steps and its
    output write), each checked against the reference, against XLA bf16; worth most where a CTA runs many
    tiles (large M, wide N)."""
    for name, m, n, k, x in _large_m_points(shapes, ms):
        for recipe in ("w4a16", "w4a8", "fp8_block"):
            p = dispatch.plan(recipe, m, n, k)
            if p.path != "mgpu":
                continue
            ws = [G.make_weights(recipe, n, k, seed=30 + r) for r in range(2)]
            for chain in (False, True):
                op = G.jax_op(recipe, plan=dispatch.Plan("mgpu", dataclasses.replace(p.config, chain_tiles=chain)))
                _record_large_m(rows, flush, "chain", name, m, n, k, f"{recipe}.{'chained' if chain else 'plan'}",
                                op, [(x, w) for w in ws], lambda op=op: G.check_op(recipe, op, x, ws[0]))
            del ws
        _record_xla_bf16(rows, flush, "chain", name, m, n, k, x)


def probe_fp8_split(rows, shapes, ms, flush):
    """The FP8 block Mosaic kernel with its K split across CTA tiles (f32 partials summed by one fusion) at 1, 2
    and 4 on the plan's tile (3 stages when split: the f32 epilogue buffers take the fourth's shared memory),
    each checked against the reference, against XLA bf16: where M and N give few CTA tiles (8b.down at M=256:
    64 tiles on 132 SMs, 0.60x bf16 in run 46)."""
    for name, m, n, k, x in _large_m_points(shapes, ms):
        p = dispatch.plan("fp8_block", m, n, k)
        if p.path != "mgpu":
            continue
        ws = [G.make_weights("fp8_block", n, k, seed=40 + r) for r in range(2)]
        for split in (1, 2, 4):
            cfg = dataclasses.replace(p.config, split_k=split, stages=p.config.stages if split == 1 else 3)
            if k % (128 * split):
                continue
            op = G.jax_op("fp8_block", plan=dispatch.Plan("mgpu", cfg))
            _record_large_m(rows, flush, "fp8split", name, m, n, k, f"fp8_block.k{split}", op,
                            [(x, w) for w in ws], lambda op=op: G.check_op("fp8_block", op, x, ws[0]))
        del ws
        _record_xla_bf16(rows, flush, "fp8split", name, m, n, k, x)


def probe_w4_groups(rows, shapes, ms, flush):
    """W4A16 with groups of 64 and 32 (symmetric and asymmetric): the dispatcher's plan against its plan
    without the Mosaic kernel (packed-4 Triton, or XLA dequant at large M: the plan before groups other than
    128 went to the Mosaic kernel), each checked against the reference, with the symmetric group-128 plan timed
    twice (the run's noise) and XLA bf16."""
    for name, m, n, k, x in _large_m_points(shapes, ms):
        for recipe in ("w4a16", "w4a16_asym"):
            base = [G.make_weights(recipe, n, k, seed=60 + r) for r in range(2)]
            for group in (128, 64, 32):
                ws = base if group == 128 else [regroup(w, group, seed=r) for r, w in enumerate(base)]
                if group == 128 and recipe == "w4a16_asym":
                    continue
                before = dispatch.plan("w4a16", m, n, k, group, mosaic=False)
                variants = [("plan", G.jax_op(recipe)), ("plan_again", G.jax_op(recipe))] if group == 128 else [
                    ("plan", G.jax_op(recipe)), (f"before_{before.path}", G.jax_op(recipe, plan=before))]
                for label, op in variants:
                    _record_large_m(rows, flush, "w4groups", name, m, n, k, f"{recipe}.g{group}.{label}", op,
                                    [(x, w) for w in ws],
                                    lambda op=op, w0=ws[0]: G.check_op(recipe, op, x, w0))
                del ws
            del base
        _record_xla_bf16(rows, flush, "w4groups", name, m, n, k, x)


def probe_w4a8_mgpu(rows, shapes, ms, flush):
    """W4A8 on FP8 tensor cores (w4a16_mgpu.w4a8_matmul_mgpu) per token tile and K split, against the W4A8
    reference, the dispatcher's plan and XLA bf16."""
    from pallas_kernels import w4a16_mgpu as w4
    for name, m, n, k, x in _large_m_points(shapes, ms):
        ws = [G.make_weights("w4a8", n, k, seed=80 + r) for r in range(2)]

        def record(variant, op):
            _record_large_m(rows, flush, "w4a8mgpu", name, m, n, k, variant, op, [(x, w) for w in ws],
                            lambda: G.check_op("w4a8", op, x, ws[0]))

        tiles = dict.fromkeys((min(cfg.tile_tokens, 128), cfg.split_k) for _, cfg in w4_mgpu_configs(m))
        for t, split in tiles:
            c = w4.MgpuW4Config(tile_tokens=t, split_k=split,
                                stages=w4.fit_stages(t, split_k=split, asym=False, x_bytes=1))
            if w4.can_use(m, n, k, 128, c):
                record(f"fp8mma.t{t}_k{split}", lambda xx, w, c=c: w4.w4a8_matmul_mgpu(
                    cm.quantize_fp8_static(xx, w["input_scale"]), w["input_scale"], w["packed"], w["weight_scale"],
                    config=c))
        record("plan", G.jax_op("w4a8"))
        del ws
        _record_xla_bf16(rows, flush, "w4a8mgpu", name, m, n, k, x, seed=90)


def projection_widths(name: str) -> tuple:
    """The separate projections a fused "model.qkv" / "model.gate_up" shape stands for: q, k, v (k and v the
    Llama-3.1 GQA width of 8 heads x 128) or gate, up."""
    model, layer = name.split(".")
    n = SHAPES[model][layer][0]
    if layer == "qkv":
        return (n - 2 * 1024, 1024, 1024)
    if layer == "gate_up":
        return (n // 2, n // 2)
    raise SystemExit(f"gemvgroup: {name} is not a fused qkv / gate_up shape")


# (block_n, block_k, unroll, num_warps) of the `gemvtiles` sweep.
GEMV_TILE_SWEEP = ((16, 512, 2, 4), (16, 512, 1, 4), (32, 512, 1, 4), (32, 256, 1, 4), (64, 256, 1, 4),
                   (64, 512, 1, 4), (128, 256, 1, 8), (64, 256, 1, 8), (32, 1024, 1, 4))


def gemv_tile_candidates(n, k):
    """GEMV_TILE_SWEEP's tiles, each with the split dispatch._gemv_tile would give for 0, 2 and 4 programs
    per SM, without and with the register prefetch (deduplicated)."""
    out = []
    for tile in GEMV_TILE_SWEEP:
        for target in (0, 2 * cm.NUM_SMS, 4 * cm.NUM_SMS):
            for prefetch in (False, True):
                cfg = dispatch._gemv_tile(n, k, dict.fromkeys(("wide", "deep", "small"), (*tile, target, prefetch)))
                if cfg not in out:
                    out.append(cfg)
    return out


def _gemv_op(recipe, cfg):
    """recipe: w4a16 / w4a16_asym / nvfp4 / mxfp4."""
    if recipe in ("w4a16", "w4a16_asym"):
        return lambda xx, w: w4a16_gemv.w4a16_gemv(xx, w["packed"], w["scale"], w.get("zero"), config=cfg)
    if recipe == "nvfp4":
        return lambda xx, w: fp4_gemv.nvfp4_gemv(xx, w["packed"], w["block_scale"], w["global_scale"], config=cfg)
    return lambda xx, w: fp4_gemv.mxfp4_gemv(xx, w["packed"], w["scale"], config=cfg)


def tile_sweep(plan, n, k, recipe):
    """`gemvtiles`: the plan, then GEMV_TILE_SWEEP's candidates (all for W4A16, every third otherwise)."""
    cands = [c for c in gemv_tile_candidates(n, k) if c != plan]
    return [plan] + (cands if recipe == "w4a16" else cands[::3])


def deep_sweep(plan, n, k, recipe):
    """`gemvdeep`: the plan, then (16 | 32 channels) x (512 | 1024 K) x prefetch x 2 | 4 programs per SM."""
    cands = []
    for bn in (16, 32):
        for bk in (512, 1024):
            for prefetch in (False, True):
                for target in (2 * cm.NUM_SMS, 4 * cm.NUM_SMS):
                    cfg = dispatch._gemv_tile(n, k, dict.fromkeys(("wide", "deep", "small"),
                                                                  (bn, bk, 1, 4, target, prefetch)))
                    if cfg != plan and cfg not in cands:
                        cands.append(cfg)
    return [plan] + cands


def split_sweep(plan, n, k, recipe):
    """`gemvsplits`: the plan's tile at every K split from 1 to 8 (powers of two or not), the plan first."""
    return [plan] + [dataclasses.replace(plan, split_k=s) for s in range(1, 9) if s != plan.split_k]


def stage_sweep(plan, n, k, recipe):
    """`gemvstages`: the plan's tile at 1 to 5 software-pipelining stages and at 8 warps, the plan first."""
    stages = [dataclasses.replace(plan, num_stages=s) for s in range(1, 6) if s != plan.num_stages]
    return [plan] + stages + [dataclasses.replace(plan, num_warps=8)]


def prefetch_sweep(plan, n, k, recipe):
    """`gemvprefetch`: the plan, then with prefetch on its tile, on half its channels, half its K chunk and
    8 warps (the ones valid for the recipe's group)."""
    ahead = dataclasses.replace(plan, prefetch=True)
    cands = [ahead, dataclasses.replace(ahead, num_warps=8)]
    if plan.block_n >= 16:
        cands.append(dataclasses.replace(ahead, block_n=plan.block_n // 2))
    if plan.block_k >= 256:
        cands.append(dataclasses.replace(ahead, block_k=plan.block_k // 2))
    return [plan] + cands


def probe_gemv_tiles(copy_tbps, rows, shapes, flush, part, configs, recipes):
    """Per recipe and shape at M=1: configs(plan, n, k, recipe) -> the GEMV configs to time by device time,
    each checked against the reference; logs the plan's time and the best."""
    for recipe in recipes:
        for name in shapes:
            model, layer = name.split(".")
            n, k = SHAPES[model][layer]
            x = G.rand_x(1, k, seed=n)
            w0 = G.make_weights(recipe, n, k, seed=11)
            wb = G.weight_bytes(w0)
            reps = G.reps_for(wb, wb / (copy_tbps * 1e12))
            ws = [w0] + [G.make_weights(recipe, n, k, seed=12 + r) for r in range(reps - 1)]
            floor_us = wb / (copy_tbps * 1e12) * 1e6
            fp4 = recipe in ("nvfp4", "mxfp4")
            plan = dispatch.fp4_gemv_config(recipe, n, k) if fp4 else dispatch.gemv_config(n, k, G.GROUP)
            for cfg in configs(plan, n, k, recipe):
                op = jax.jit(_gemv_op(recipe, cfg))
                try:
                    ok, err = G.check_op(recipe, op, x, w0)
                    us = G.device_time(op, [(x, w) for w in ws]).get("device_us")
                except Exception as e:  # noqa: BLE001
                    G.log(f"  {part} {recipe} {name} {cfg} failed: {repr(e)[:300]}")
                    continue
                rows.append({"part": part, "recipe": recipe, "shape": name, "plan": cfg == plan,
                             "config": str(cfg), "device_us": us, "pct_copy_bw": us and round(100 * floor_us / us, 1),
                             "check_ok": ok, "err": err})
            done = [r for r in rows if r["part"] == part and r["recipe"] == recipe and r["shape"] == name
                    and r["check_ok"] and r["device_us"]]
            if done:
                best = min(done, key=lambda r: r["device_us"])
                planned = next((r for r in done if r["plan"]), None)
                G.log(f"{part} {recipe} {name}: plan {planned and planned['device_us']} us, best "
                      f"{best['device_us']} us ({best['pct_copy_bw']} % copy) {best['config']}")
            del ws, w0
            gc.collect()
            flush()


def probe_gemv_group(copy_tbps, rows, shapes, flush):
    """The grouped GEMV (one launch over the separate weights) against the separate planned GEMVs, the
    fused weight's planned GEMV and XLA bf16, at M=1, symmetric and asymmetric."""
    for name in shapes:
        ns = projection_widths(name)
        n, k = sum(ns), SHAPES[name.split(".")[0]][name.split(".")[1]][1]
        x = G.rand_x(1, k, seed=n + 3)
        cfg = dispatch.gemv_config(n, k, G.GROUP)
        for recipe in ("w4a16", "w4a16_asym"):
            fused = [G.make_weights(recipe, n, k, seed=40 + r) for r in range(2)]
            bounds = [0] + list(itertools.accumulate(ns))

            def parts(w):
                return [{key: v[a:b] for key, v in w.items() if v is not None} for a, b in zip(bounds, bounds[1:])]

            def grouped(xx, ws):
                return w4a16_gemv.w4a16_gemv_group(
                    xx, tuple(w["packed"] for w in ws), tuple(w["scale"] for w in ws),
                    tuple(w["zero"] for w in ws) if "zero" in ws[0] else None, config=cfg)

            split = [parts(w) for w in fused]
            ok, err = G.check_op(recipe, lambda xx, w: grouped(xx, parts(w)), x, fused[0], n_keep=n)
            plan_op = G.jax_op(recipe)
            variants = [("grouped", grouped, [(x, ws) for ws in split]),
                        ("separate", lambda xx, ws: [plan_op(xx, w) for w in ws], [(x, ws) for ws in split]),
                        ("fused_plan", plan_op, [(x, w) for w in fused])]
            for variant, op, arg_sets in variants:
                t = G.time_jax(op, arg_sets)
                rows.append({"part": "gemvgroup", "shape": name, "recipe": recipe, "variant": variant,
                             "widths": list(ns), "config": str(cfg), "us": round(t * 1e6, 2),
                             "check_ok": ok if variant == "grouped" else None,
                             "err": err if variant == "grouped" else None})
                G.log(f"gemvgroup {name} {recipe:10s} {variant:10s} {t * 1e6:8.1f} us"
                      + (f" ok={ok} err={err}" if variant == "grouped" else ""))
            del fused, split
        wb = [G.make_weights("xla_bf16", n, k, seed=50 + r) for r in range(2)]
        t = G.time_jax(G.jax_op("xla_bf16"), [(x, w) for w in wb])
        rows.append({"part": "gemvgroup", "shape": name, "recipe": "xla_bf16", "variant": "xla",
                     "us": round(t * 1e6, 2)})
        del wb
        gc.collect()
        flush()


def probe_gemv_group_configs(rows, shapes, flush):
    """The grouped GEMV (symmetric) over a sweep of tiles and K splits on the fused qkv / gate_up shapes, each
    checked, against the fused weight's planned GEMV and the separate planned GEMVs: which tile the group
    should plan."""
    tiles = [(128, 256, 1, 8), (128, 256, 2, 8), (128, 256, 1, 4), (64, 256, 1, 4), (64, 256, 2, 4),
             (16, 512, 2, 4)]
    for name in shapes:
        ns = projection_widths(name)
        n, k = sum(ns), SHAPES[name.split(".")[0]][name.split(".")[1]][1]
        x = G.rand_x(1, k, seed=n + 5)
        fused = [G.make_weights("w4a16", n, k, seed=60 + r) for r in range(2)]
        bounds = [0] + list(itertools.accumulate(ns))
        split = [[{key: v[a:b] for key, v in w.items() if v is not None} for a, b in zip(bounds, bounds[1:])]
                 for w in fused]
        t = time_op(G.jax_op("w4a16"), [(x, w) for w in fused])
        rows.append({"part": "gemvgroupcfg", "shape": name, "variant": "fused_plan",
                     "config": str(dispatch.gemv_config(n, k, G.GROUP)), "us": round(t * 1e6, 2)})
        G.log(f"gemvgroupcfg {name} fused_plan {t * 1e6:8.1f} us")
        plan_op = G.jax_op("w4a16")
        t = time_op(lambda xx, ws: [plan_op(xx, w) for w in ws], [(x, ws) for ws in split])
        rows.append({"part": "gemvgroupcfg", "shape": name, "variant": "separate_plan", "config": "",
                     "us": round(t * 1e6, 2)})
        G.log(f"gemvgroupcfg {name} separate_plan {t * 1e6:8.1f} us")
        for (bn, bk, unroll, warps), s in itertools.product(tiles, (1, 2, 4, 8)):
            cfg = GemvConfig(bn, bk, s, unroll, warps, 3)
            if (k // bk) // s < unroll or any(w % bn for w in ns[:-1]) or not w4a16_gemv.config_is_valid(G.GROUP, cfg):
                continue

            def grouped(xx, ws, cfg=cfg):
                return w4a16_gemv.w4a16_gemv_group(xx, tuple(w["packed"] for w in ws),
                                                   tuple(w["scale"] for w in ws), config=cfg)

            ok, err = G.check_op("w4a16", lambda xx, w: grouped(xx, split[0]), x, fused[0], n_keep=n)
            t = time_op(grouped, [(x, ws) for ws in split])
            rows.append({"part": "gemvgroupcfg", "shape": name, "variant": "grouped", "config": str(cfg),
                         "us": round(t * 1e6, 2), "check_ok": ok, "err": err})
            G.log(f"gemvgroupcfg {name} {bn:4d} {bk:4d} u{unroll} w{warps} split {s} {t * 1e6:8.1f} us ok={ok}")
        del fused, split
        gc.collect()
        flush()


def probe_w4a8_gemv(copy_tbps, rows, shapes, flush):
    """W4A8 at M=1: the word GEMV per tile (Plan("gemv")) against the packed-4 plan and XLA bf16."""
    for name in shapes:
        model, layer = name.split(".")
        n, k = SHAPES[model][layer]
        x = G.rand_x(1, k, seed=n + 9)
        w0 = G.make_weights("w4a8", n, k, seed=11)
        wb = G.weight_bytes(w0)
        reps = G.reps_for(wb, wb / (copy_tbps * 1e12))
        ws = [w0] + [G.make_weights("w4a8", n, k, seed=12 + r) for r in range(reps - 1)]
        floor_us = (wb + 2 * k + 2 * n) / (copy_tbps * 1e12) * 1e6
        cands = [dispatch.gemv_config(n, k, 128)] + [c for c in gemv_candidates(n, k, n >= dispatch.GEMV_WIDE_N)[:4]]
        variants = [("packed4_plan", G.jax_op("w4a8"))]
        variants += [(str(c), G.jax_op("w4a8", dispatch.Plan("gemv", c))) for c in dict.fromkeys(cands)]
        for variant, op in variants:
            try:
                ok, err = G.check_op("w4a8", op, x, w0)
                t = G.time_jax(op, [(x, w) for w in ws])
            except Exception as e:  # noqa: BLE001
                G.log(f"  w4a8gemv {name} {variant} failed: {repr(e)[:300]}")
                continue
            rows.append({"part": "w4a8gemv", "shape": name, "recipe": "w4a8", "variant": variant,
                         "us": round(t * 1e6, 2), "pct_copy_bw": round(100 * floor_us / (t * 1e6), 1),
                         "check_ok": ok, "err": err})
            G.log(f"w4a8gemv {name} {variant[:60]:60s} {t * 1e6:8.1f} us {100 * floor_us / (t * 1e6):5.1f}% ok={ok}")
        wbf = [G.make_weights("xla_bf16", n, k, seed=5 + r) for r in range(G.reps_for(2 * n * k, 1e-5))]
        tb = G.time_jax(G.jax_op("xla_bf16"), [(x, w) for w in wbf])
        rows.append({"part": "w4a8gemv", "shape": name, "recipe": "xla_bf16", "variant": "xla",
                     "us": round(tb * 1e6, 2)})
        G.log(f"w4a8gemv {name} xla_bf16 {tb * 1e6:8.1f} us")
        del ws, w0, wbf
        gc.collect()
        flush()


def probe_trace(rows, shapes, ms, flush,
                recipes=("xla_bf16", "w4a16", "w4a16+rows", "w4a16_asym+rows", "w4a8", "w4a8+rows")):
    """Wall time (time_jax) against a profiler trace of the same executable (device_trace.py): kernels per
    call, their device time, the GPU's busy fraction and the costliest kernels, per (shape, M, recipe).
    '+rows': the weights carry their scale rows built once (gemm.as_models_run, as the models run them),
    checked against the reference first."""
    import device_trace
    for name, m, n, k, x in _large_m_points(shapes, ms):
        for variant in recipes:
            recipe, prepared = variant.split("+")[0], variant.endswith("+rows")
            ws = [G.make_weights(recipe, n, k, seed=130 + r) for r in range(4)]
            if prepared:
                ws = [G.as_models_run(recipe, w) for w in ws]
            op, sets = G.jax_op(recipe), [(x, w) for w in ws]
            check = G.check_op(recipe, op, x, ws[0]) if prepared else (None, None)
            try:
                wall = G.time_jax(op, sets)
                summary = device_trace.op_summary(op, sets)
            except Exception as e:  # noqa: BLE001
                G.log(f"  trace {name} M={m} {recipe} failed: {repr(e)[:600]}")
                continue
            top = list(summary["by_kernel"].items())[:4]
            rows.append({"part": "trace", "shape": name, "M": m, "variant": variant, "us": round(wall * 1e6, 2),
                         **{key: summary[key] for key in ("kernels_per_call", "kernel_us_per_call", "busy_fraction")},
                         "top_kernels": top, "check_ok": check[0], "check_err": check[1]})
            G.log(f"trace {name} M={m} {variant:15s} ok={check[0]} wall {wall * 1e6:8.1f} us, kernels "
                  f"{summary['kernel_us_per_call']:8.1f} us in {summary['kernels_per_call']:.1f} launches, "
                  f"busy {summary['busy_fraction']:.2f}: "
                  + "; ".join(f"{kn[:40]} {v['per_call']:.1f}x {v['mean_us']:.1f} us" for kn, v in top))
            del ws
            flush()


def probe_compile(rows, flush, layers=(1, 8, 32), ms=(1, 16)):
    """Compile time of a chain of `layers` GEMMs of the 8B o shape (4096 x 4096), each with its own weights,
    per recipe and M: what a model without a layer scan pays per linear layer at jit time."""
    n = k = 4096
    for recipe in ("xla_bf16", "w4a16", "w4a8"):
        op = G.jax_op(recipe)
        for m in ms:
            for count in layers:
                ws = [G.make_weights(recipe, n, k, seed=100 + i) for i in range(count)]
                x = G.rand_x(m, k, 1)

                def chain(x, ws):
                    for w in ws:
                        x = op(x, w)
                    return x

                start = time.perf_counter()
                jax.jit(chain).lower(x, ws).compile()
                seconds = time.perf_counter() - start
                rows.append({"part": "compile", "recipe": recipe, "M": m, "layers": count,
                             "compile_s": round(seconds, 2)})
                G.log(f"compile {recipe:8s} M={m:3d} {count:3d} layers: {seconds:6.2f} s")
                del ws
                flush()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="gemv,fp8")
    ap.add_argument("--shapes", default="8b.gate_up,8b.o,8b.qkv,8b.down,70b.gate_up,70b.down")
    ap.add_argument("--ms", default="1,16,64,256,1024,4096",
                    help="M values of the xla4, mgpu, w4mgpu, w4groups, w4a8mgpu, fp4paths, substeps, wg128, trace "
                         "and fp8 parts")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--gemv-recipes", default=None,
                    help="recipes of the gemvtiles, gemvsplits, gemvprefetch, gemvstages and fp4paths parts "
                         "(default: each part's own)")
    ap.add_argument("--device-time", action="store_true",
                    help="time the gemvgroupcfg and large-M parts by the device's own time (profiler trace)")
    args = ap.parse_args()
    global DEVICE_TIME
    DEVICE_TIME = args.device_time
    parts = set(args.parts.split(","))
    card = jax.devices()[0].device_kind
    copy = G.copy_bandwidth()
    copy_tbps = max(copy.values())
    G.log(f"{card}, jax {jax.__version__}, copy {copy}")
    rows: list = []
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"gemm_probe_{card.replace(' ', '_')}_{datetime.date.today()}.json")

    def flush():
        with open(path, "w") as f:
            json.dump({"card": card, "jax": jax.__version__, "copy": copy, "rows": rows}, f, indent=1)

    try:
        if "gemv" in parts:
            probe_gemv(copy_tbps, rows, args.shapes.split(","), flush)
        if "fp8" in parts:
            probe_fp8(rows, flush, args.shapes.split(","), [int(v) for v in args.ms.split(",")])
        if "w4mgpu" in parts:
            probe_w4_mgpu(rows, args.shapes.split(","), [int(v) for v in args.ms.split(",")], flush)
        if "fp4paths" in parts:
            probe_fp4_paths(rows, args.shapes.split(","), [int(v) for v in args.ms.split(",")], flush,
                            *([tuple(args.gemv_recipes.split(","))] if args.gemv_recipes else []))
        if "chain" in parts:
            probe_chain(rows, args.shapes.split(","), [int(v) for v in args.ms.split(",")], flush)
        if "substeps" in parts:
            probe_sub_steps(rows, args.shapes.split(","), [int(v) for v in args.ms.split(",")], flush)
        if "wg128" in parts:
            probe_wg128(rows, args.shapes.split(","), [int(v) for v in args.ms.split(",")], flush)
        if "fp8split" in parts:
            probe_fp8_split(rows, args.shapes.split(","), [int(v) for v in args.ms.split(",")], flush)
        if "w4split" in parts:
            probe_w4_split(rows, args.shapes.split(","), [int(v) for v in args.ms.split(",")], flush)
        if "w4groups" in parts:
            probe_w4_groups(rows, args.shapes.split(","), [int(v) for v in args.ms.split(",")], flush)
        if "w4a8mgpu" in parts:
            probe_w4a8_mgpu(rows, args.shapes.split(","), [int(v) for v in args.ms.split(",")], flush)
        if "w4a8gemv" in parts:
            probe_w4a8_gemv(copy_tbps, rows, args.shapes.split(","), flush)
        if "gemvgroup" in parts:
            probe_gemv_group(copy_tbps, rows, args.shapes.split(","), flush)
        gemv_sweeps = {"gemvtiles": (tile_sweep, ("w4a16", "w4a16_asym", "nvfp4", "mxfp4")),
                       "gemvsplits": (split_sweep, ("w4a16", "nvfp4")),
                       "gemvprefetch": (prefetch_sweep, ("w4a16", "nvfp4", "mxfp4")),
                       "gemvstages": (stage_sweep, ("w4a16", "nvfp4")),
                       "gemvdeep": (deep_sweep, ("w4a16",))}
        for part, (sweep, recipes) in gemv_sweeps.items():
            if part in parts:
                recipes = args.gemv_recipes.split(",") if args.gemv_recipes else recipes
                probe_gemv_tiles(copy_tbps, rows, args.shapes.split(","), flush, part, sweep, recipes)
        if "gemvgroupcfg" in parts:
            probe_gemv_group_configs(rows, args.shapes.split(","), flush)
        if "fp4gemv" in parts:
            probe_fp4_gemv(copy_tbps, rows, args.shapes.split(","), flush)
        if "mgpu" in parts:
            probe_mgpu(rows, args.shapes.split(","), [int(v) for v in args.ms.split(",")], flush)
        if "compile" in parts:
            probe_compile(rows, flush)
        if "trace" in parts:
            probe_trace(rows, args.shapes.split(","), [int(v) for v in args.ms.split(",")], flush)
        if "xla4" in parts:
            probe_xla4(copy_tbps, rows, args.shapes.split(","), [int(v) for v in args.ms.split(",")], flush,
                       args.out)
    finally:
        flush()
        for r in rows:
            if r["part"] == "xla4":
                G.log(f"xla4 {r['shape']} M={r['M']} {r['variant']:12s} {r['us']:9.1f} us {r['pct_copy_bw']:5.1f}% "
                      f"{r['tflops']:6.0f} TF ok={r['check_ok']} triton={r['triton_gemm']} cublas={r['cublas']}")
            if r["part"] == "fp8":
                G.log(f"fp8 {r['shape']} M={r['M']} {r['mode']:10s} {r['variant']:16s} {r['us']:9.1f} us "
                      f"{r['tflops']:6.0f} TF ok={r.get('check_ok')} out={r.get('custom_call_out')} "
                      f"fusions={r.get('fusions')}")
        G.log(f"wrote {path}")


if __name__ == "__main__":
    main()
