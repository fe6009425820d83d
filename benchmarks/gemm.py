"""Quantized GEMM benchmark: checks every pallas_kernels kernel against its reference on the GPU, then
times it against XLA bf16, XLA dequant-then-dot, XLA/torch FP8 and torch's tinygemm W4A16 on Llama-3.1
8B and 70B layer shapes.

  PYTHONPATH=. python3 benchmarks/gemm.py                       # check + full benchmark, both models
  PYTHONPATH=. python3 benchmarks/gemm.py --steps check         # correctness only
  PYTHONPATH=. python3 benchmarks/gemm.py --steps sweep --sweep int4 --ms 1,16 --models 8b
  options: --models 8b,70b  --ms 1,16,64,256,1024,4096  --recipes ...  --out DIR
           --device-time (each JAX row also traced: device_us per call beside the wall-clock us)
           --sweep int4,fp4,w4a8,w4a8_fp4,fp8 (tile families for --steps sweep)

W4A16 / W4A8 weights carry their scale rows built once, as jaxq's models run them (as_models_run).

Timing (METHOD.md): each measured executable runs the op R times on R distinct weight sets (R chosen so
the weights of one executable exceed L2 and its GPU time dwarfs host dispatch), many executions back to
back, median of 5 trials. Correctness is checked on fresh random data before timing. TB/s counts the
bytes the op must move (weights + scales + x + y), % copy compares with a device-to-device copy measured
in the same run. Results: <out>/gemm_<card>_<date>.json/.md, and <out>/gemm_summary.json, where a run
replaces the rows of the points it measured and keeps the others, each row with its run's start time ("run")
and its ratios to the baselines timed in the same run (gemm_targets.py compares only within one run); then
gemm_targets.py rechecks the issue's targets from it (<out>/gemm_targets.md/.json).
"""
import argparse
import dataclasses
import datetime
import gc
import json
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # leave GPU memory for the torch peers
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import _common as cm  # noqa: E402
from pallas_kernels import dispatch, fp8  # noqa: E402
from pallas_kernels.fp8 import Fp8Config  # noqa: E402
from pallas_kernels.packed4 import Packed4Config  # noqa: E402

import gemm_targets  # noqa: E402  (benchmarks/, the script's own folder)

SHAPES = {   # Llama-3.1 layer (N, K), HF orientation [out, in]
    "8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
    "70b": {"qkv": (10240, 8192), "o": (8192, 8192), "gate_up": (57344, 8192), "down": (8192, 28672)},
}
MS = (1, 16, 64, 256, 1024, 4096)
GROUP = 128
L2_BYTES = 60e6
TOL = 1e-2
INTERPRET = False   # --smoke: tiny shapes, kernels in interpret mode, no torch (a CPU dry run)
DEVICE_TIME = False  # --device-time: each JAX row also gets its device time per call from a profiler trace
RECIPES = ("xla_bf16", "torch_bf16", "xla_deq_int4", "tinygemm", "w4a16", "w4a16_asym", "nvfp4", "mxfp4",
           "w4a8", "w4a8_mxfp4", "w4a8_nvfp4", "fp8_block", "fp8_xla", "fp8_xla_fast", "fp8_rowwise_xla",
           "fp8_rowwise_pallas", "torch_fp8", "torch_fp8_fast", "torch_fp8_rowwise")


def log(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------------------------------- timing


def reps_for(weight_bytes: float, floor_s: float) -> int:
    """Weight sets per executable: enough to defeat L2 and to keep 60 us of GPU work per launch."""
    r = max(2.5 * L2_BYTES / max(weight_bytes, 1.0), 60e-6 / max(floor_s, 1e-7))
    return int(min(max(np.ceil(r), 1), 16))


def time_jax(op, arg_sets, trials=5, min_trial_s=0.03):
    """Median seconds per op call; op(*args) for each args in arg_sets inside one executable."""
    f = jax.jit(lambda sets: [op(*a) for a in sets])
    jax.block_until_ready(f(arg_sets))
    t0 = time.perf_counter()
    jax.block_until_ready(f(arg_sets))
    one = time.perf_counter() - t0
    n = max(1, int(min_trial_s / max(one, 1e-6)))
    samples = []
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(n):
            out = f(arg_sets)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / (n * len(arg_sets)))
    return statistics.median(samples)


def time_torch(fn, arg_sets, trials=5, min_trial_s=0.03):
    """Median seconds per call, CUDA-graph replay of fn over arg_sets (no host overhead)."""
    import torch
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for a in arg_sets:
            fn(*a)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = [fn(*a) for a in arg_sets]
    g.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    g.replay()
    torch.cuda.synchronize()
    n = max(1, int(min_trial_s / max(time.perf_counter() - t0, 1e-6)))
    samples = []
    for _ in range(trials):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(n):
            g.replay()
        e1.record()
        torch.cuda.synchronize()
        samples.append(e0.elapsed_time(e1) / 1e3 / (n * len(arg_sets)))
    del outs, g
    return statistics.median(samples)


def copy_bandwidth():
    """Device-to-device copy bandwidth, bytes read + written per second: torch copy_ and an XLA pass."""
    import torch
    nbytes = 1 << 30
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t_torch = time_torch(lambda: b.copy_(a), [()], min_trial_s=0.2)
    del a, b
    x = jnp.zeros((nbytes // 4,), jnp.float32) + 1.0
    t_xla = time_jax(lambda v: v * 2.0, [(x,)], min_trial_s=0.2)
    del x
    return {"torch_copy_tbps": 2 * nbytes / t_torch / 1e12, "xla_elementwise_tbps": 2 * nbytes / t_xla / 1e12}


# ----------------------------------------------------------------------------------------- operands


def make_weights(recipe: str, n: int, k: int, seed: int):
    """Random weights of the recipe's canonical layout (jax arrays on the GPU)."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    packed = lambda: jax.random.bits(ks[0], (n, k // 2), jnp.uint8)  # noqa: E731
    if recipe in ("w4a16", "w4a16_asym", "xla_deq_int4"):
        w = {"packed": packed(),
             "scale": jax.random.uniform(ks[1], (n, k // GROUP), jnp.float32, 0.005, 0.02).astype(jnp.bfloat16)}
        if recipe == "w4a16_asym":
            w["zero"] = jax.random.randint(ks[2], (n, k // GROUP), 4, 12).astype(jnp.uint8)
        return w
    if recipe == "nvfp4":
        bs = cm.cast_e4m3_saturating(jax.random.uniform(ks[1], (n, k // 16), jnp.float32, 0.5, 400.0))
        return {"packed": packed(), "block_scale": bs, "global_scale": jnp.float32(2e-5)}
    if recipe == "mxfp4":
        return {"packed": packed(), "scale": jax.random.randint(ks[1], (n, k // 32), 118, 126).astype(jnp.uint8)}
    if recipe == "w4a8":
        return {"packed": packed(),
                "weight_scale": jax.random.uniform(ks[1], (n, k // GROUP), jnp.float32, 0.005, 0.02),
                "input_scale": jnp.float32(4.0 / 448)}
    if recipe in dispatch.W4A8_FP4:                   # FP4 weights x static FP8 activations
        return {**make_weights(recipe[len("w4a8_"):], n, k, seed), "input_scale": jnp.float32(4.0 / 448)}
    if recipe in ("fp8_block", "fp8_xla", "fp8_xla_fast", "fp8_rowwise_xla", "fp8_rowwise_pallas"):
        wq = cm.cast_e4m3_saturating(jax.random.normal(ks[0], (n, k), jnp.float32) * 64)
        if recipe == "fp8_block":
            return {"wq": wq, "w_scale": jax.random.uniform(ks[1], (cm.cdiv(n, 128), cm.cdiv(k, 128)),
                                                            jnp.float32, 1e-4, 4e-4)}
        if recipe in ("fp8_xla", "fp8_xla_fast"):
            return {"wq": wq, "w_scale": jnp.float32(3e-4), "input_scale": jnp.float32(4.0 / 448)}
        return {"wq": wq, "w_scale": jax.random.uniform(ks[1], (n,), jnp.float32, 1e-4, 4e-4)}
    if recipe == "xla_bf16":
        return {"w": (jax.random.normal(ks[0], (n, k), jnp.float32) * 0.02).astype(jnp.bfloat16)}
    raise ValueError(recipe)


def as_models_run(recipe: str, w: dict) -> dict:
    """The weights as jaxq's models run them (LoadedModel.run_params): W4A16 / W4A8 with the Mosaic kernels'
    scale rows built once (dispatch.with_step_rows), so no timed call transposes the scales."""
    if recipe in ("w4a16", "w4a16_asym", "w4a8"):
        return jax.block_until_ready(dispatch.with_step_rows("w4a8" if recipe == "w4a8" else "w4a16", w))
    return w


def weight_bytes(w: dict) -> int:
    return sum(int(np.prod(v.shape)) * v.dtype.itemsize for v in w.values() if hasattr(v, "shape"))


def _dot_tn(x, w):
    return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32).astype(x.dtype)


def jax_op(recipe: str, plan=None):
    """(x, weights) -> y for the JAX-side recipes; `plan` overrides the dispatcher's choice."""
    if recipe == "xla_bf16":
        return lambda x, w: _dot_tn(x, w["w"])
    if recipe == "xla_deq_int4":
        return lambda x, w: _dot_tn(x, dispatch.dequantize_bf16("w4a16", **w))
    if recipe == "fp8_xla_fast":                        # per-tensor FP8 in cuBLASLt's fast-accumulation mode
        return lambda x, w: fp8.fp8_matmul_xla(cm.quantize_fp8_static(x, w["input_scale"]), w["input_scale"],
                                               w["wq"], w["w_scale"], fast_accumulation=True)
    if recipe == "fp8_rowwise_pallas":
        def op(x, w):
            xq, sx = fp8.quantize_fp8_rowwise(x)
            return fp8.fp8_matmul(xq, sx, w["wq"], w["w_scale"], mode="rowwise",
                                  config=plan.config if plan else None, interpret=INTERPRET)
        return op
    name = {"w4a16_asym": "w4a16", "fp8_xla": "fp8", "fp8_rowwise_xla": "fp8_rowwise"}.get(recipe, recipe)
    return lambda x, w: dispatch.quantized_matmul(x, name, w, plan_override=plan, interpret=INTERPRET)


def reference(recipe: str, x, w):
    if recipe == "xla_bf16":
        return jnp.dot(x.astype(jnp.float32), w["w"].astype(jnp.float32).T, precision=jax.lax.Precision.HIGHEST)
    name = {"w4a16_asym": "w4a16", "xla_deq_int4": "w4a16", "fp8_xla": "fp8", "fp8_xla_fast": "fp8",
            "fp8_rowwise_xla": "fp8_rowwise",
            "fp8_rowwise_pallas": "fp8_rowwise"}.get(recipe, recipe)
    return dispatch.reference_matmul(x, name, w)


def slice_n(recipe: str, w: dict, n_keep: int) -> dict:
    """The first n_keep output channels of a weight dict (n_keep a multiple of 128)."""
    out = {}
    for name, v in w.items():
        if not hasattr(v, "ndim") or v.ndim == 0:
            out[name] = v
        elif recipe == "fp8_block" and name == "w_scale":
            out[name] = v[: n_keep // 128]
        else:
            out[name] = v[:n_keep]
    return out


def check_op(recipe, op, x, w, tol=TOL, m_keep=64, n_keep=1024):
    """Runs op on the full operands and compares the first n_keep channels of its first and last m_keep / 2
    rows (the first and the last, possibly padded, token tile) with the reference."""
    out = jax.jit(op)(x, w)
    m, n = out.shape
    nk = n if n <= n_keep else n_keep
    rows = np.unique(np.r_[0:min(m, m_keep // 2), max(0, m - m_keep // 2):m])
    ref = reference(recipe, x[rows], slice_n(recipe, w, nk) if nk < n else w)
    return check_close(out[rows, :nk], ref, tol)


def check_close(out, ref, tol=TOL):
    """(ok, max_err / rms(ref)): |out - ref| <= tol |ref| + tol rms(ref) everywhere, all finite."""
    out = np.asarray(jnp.asarray(out, jnp.float32))
    ref = np.asarray(jnp.asarray(ref, jnp.float32))
    rms = float(np.sqrt(np.mean(ref.astype(np.float64) ** 2))) + 1e-30
    err = np.abs(out - ref)
    ok = bool(np.isfinite(out).all() and (err <= tol * np.abs(ref) + tol * rms).all())
    return ok, float(np.nanmax(err) / rms) if out.size else 0.0


def rand_x(m, k, seed):
    return jax.random.normal(jax.random.PRNGKey(seed), (m, k), jnp.float32).astype(jnp.bfloat16)


# ------------------------------------------------------------------------------------------- checks


def step_check(results):
    """Compiled kernels vs references: unaligned shapes, several tilings, then one Llama shape each."""
    cases = []
    p4cfgs = [None, Packed4Config(16, 64, 128, split_k=2), Packed4Config(32, 128, 64, presplit_x=True,
                                                                          num_warps=8)]
    for m, n, k in [(1, 200, 384), (17, 520, 640)]:
        for recipe in ("w4a16", "w4a16_asym", "nvfp4", "mxfp4", "w4a8"):
            for cfg in p4cfgs:
                cases.append((recipe, m, n, k, cfg))
        for cfg in [None, Fp8Config(16, 64, 128, split_k=2, swap_ab=True, num_warps=4),
                    Fp8Config(64, 128, 64, num_warps=4)]:
            cases.append(("fp8_block", m, n, k + 40, cfg))
            cases.append(("fp8_rowwise_pallas", m, n, k + 40, cfg))
        cases.append(("fp8_xla", m, n, k, None))
        cases.append(("fp8_rowwise_xla", m, n, k, None))
    for recipe in ("w4a16", "w4a16_asym", "nvfp4", "mxfp4", "w4a8", "fp8_block", "fp8_rowwise_pallas"):
        for m in (() if INTERPRET else (1, 256)):
            cases.append((recipe, m, 4096, 4096, None))
    for recipe in dispatch.W4A8_FP4:                  # appended: the cases above keep their seeds
        for m, n, k in [(1, 200, 384), (17, 520, 640)]:
            for cfg in p4cfgs:
                cases.append((recipe, m, n, k, cfg))
        for m in (() if INTERPRET else (1, 256)):
            cases.append((recipe, m, 4096, 4096, None))
    n_fail = 0
    for i, (recipe, m, n, k, cfg) in enumerate(cases):
        w = make_weights(recipe, n, k, seed=1000 + i)
        x = rand_x(m, k, seed=2000 + i)
        plan = None
        if cfg is not None:
            plan = dispatch.Plan("pallas", cfg)
        try:
            ok, err = check_op(recipe, jax_op(recipe, plan), x, w)
        except Exception as e:  # noqa: BLE001  (report every failing case, keep going)
            ok, err = False, float("nan")
            log("  error:", recipe, m, n, k, cfg, repr(e)[:400])
        n_fail += not ok
        results.append({"recipe": recipe, "m": m, "n": n, "k": k, "config": str(cfg), "ok": ok,
                        "max_err_over_rms": err})
        if not ok:
            log(f"CHECK FAIL {recipe} m={m} n={n} k={k} cfg={cfg} err/rms={err:.3g}")
    log(f"check: {len(cases) - n_fail}/{len(cases)} passed")
    return n_fail == 0


# -------------------------------------------------------------------------------------------- sweep


def packed4_candidates(m: int, n: int, k: int, family: str):
    """Tile candidates per M: the GEMV path (block_m 1) and MMA tiles, with unrolled K chunks and split-K
    for about one or two waves."""
    out = []

    def add(bm, bn, warps, waves, unroll=1, stages=3, presplit=False, bk=128):
        progs = cm.cdiv(m, bm) * cm.cdiv(n, bn)
        chunks = cm.cdiv(k, bk) // unroll
        for split in sorted({dispatch.fill_split(progs, chunks, w * cm.NUM_SMS) if w else 1 for w in waves}):
            out.append(Packed4Config(bm, bn, bk, split, presplit, warps, stages, unroll))

    if m == 1:
        for bn in (16, 32, 64):
            for unroll in (2, 4, 8):
                for warps in (2, 4):
                    add(1, bn, warps, (0, 1), unroll)
    if m <= 16:
        for bn in (64, 128):
            for unroll in (1, 2, 4):
                for warps in (2, 4):
                    add(16, bn, warps, (1,) if m == 1 else (1, 2), unroll)
    elif m <= 64:
        for bm in (32, 64):
            for bn in (64, 128):
                for unroll in (1, 2):
                    add(bm, bn, 4, (1, 2), unroll)
    else:
        for bm, bn, warps in ((64, 128, 4), (128, 128, 8), (128, 256, 8), (256, 128, 8)):
            for stages in (3, 4):
                add(bm, bn, warps, (0,), 1, stages, presplit=True)
    return list(dict.fromkeys(out))


def fp8_candidates(m: int, n: int, k: int):
    out = []
    if m <= 64:
        for bn in (64, 128, 256):
            progs = cm.cdiv(n, bn)
            for t in (1, 2, 4):
                split = dispatch.fill_split(progs, cm.cdiv(k, 128), t * cm.NUM_SMS)
                for stages in (3, 5):
                    out.append(Fp8Config(max(cm.pow2_ceil(m), 16), bn, 128, split, swap_ab=True, num_warps=4,
                                         num_stages=stages))
    else:
        for bm, bn, warps in ((128, 128, 4), (128, 128, 8), (128, 256, 8), (256, 128, 8), (64, 256, 4)):
            for stages in (3, 4):
                out.append(Fp8Config(bm, bn, 128, 1, swap_ab=False, num_warps=warps, num_stages=stages))
    return list(dict.fromkeys(out))


def step_sweep(families, models, layers, ms, results, flush):
    """Time candidate configs per (family, shape, M); print and record the best."""
    recipe_of = {"int4": "w4a16", "fp4": "nvfp4", "w4a8": "w4a8", "w4a8_fp4": "w4a8_nvfp4", "fp8": "fp8_block"}
    for family in families:
        recipe = recipe_of[family]
        for model in models:
            for layer, (n, k) in SHAPES[model].items():
                if layers and layer not in layers:
                    continue
                w0 = make_weights(recipe, n, k, seed=7)
                wb = weight_bytes(w0)
                for m in ms:
                    reps = reps_for(wb, wb / 3e12)
                    ws = [w0] + [make_weights(recipe, n, k, seed=8 + r) for r in range(reps - 1)]
                    x = rand_x(m, k, seed=m)
                    cands = fp8_candidates(m, n, k) if family == "fp8" else packed4_candidates(m, n, k, family)
                    best = None
                    for cfg in cands:
                        op = jax_op(recipe, dispatch.Plan("pallas", cfg))
                        try:
                            ok, _ = check_op(recipe, op, x, w0)
                            t = time_jax(op, [(x, w) for w in ws], trials=3, min_trial_s=0.01) if ok else None
                        except Exception as e:  # noqa: BLE001
                            ok, t = False, None
                            log("  error", cfg, repr(e)[:300])
                        results.append({"family": family, "model": model, "layer": layer, "m": m, "n": n,
                                        "k": k, "config": dataclasses.asdict(cfg), "ok": ok, "us": t and t * 1e6})
                        if t is not None and (best is None or t < best[0]):
                            best = (t, cfg)
                    flush()
                    if best:
                        log(f"SWEEP {family} {model}.{layer} M={m}: {best[0] * 1e6:.1f} us "
                            f"{wb / best[0] / 1e12:.2f} TB/s  {best[1]}")
                    del ws
                    gc.collect()


# -------------------------------------------------------------------------------------------- bench


def torch_ops(n, k, m, reps, seed):
    """Torch peers: cuBLAS bf16, tinygemm W4A16 (int4 g128), _scaled_mm FP8 per-tensor (precise and fast
    accumulation) and rowwise."""
    import torch
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    ops = {}
    ws = [(torch.randn(n, k, device="cuda", generator=g) * 0.02).to(torch.bfloat16) for _ in range(reps)]
    ops["torch_bf16"] = (lambda w: torch.nn.functional.linear(x, w), [(w,) for w in ws], 2 * n * k)
    try:
        packs = []
        for _ in range(reps):
            wi = torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8, generator=g)
            packs.append((torch._convert_weight_to_int4pack(wi, 8),
                          torch.rand(k // GROUP, n, 2, device="cuda", generator=g).to(torch.bfloat16)))
        ops["tinygemm"] = (lambda wp, sz: torch._weight_int4pack_mm(x, wp, GROUP, sz), packs,
                           n * k // 2 + n * k // GROUP * 4)
    except Exception as e:  # noqa: BLE001
        log("  tinygemm unavailable:", repr(e)[:200])
    f8 = torch.float8_e4m3fn
    xq = x.to(f8)
    w8 = [(torch.randn(n, k, device="cuda", generator=g) * 64).clamp(-448, 448).to(f8) for _ in range(reps)]
    one = torch.tensor(1.0, device="cuda")
    sa, sb = torch.rand(m, 1, device="cuda"), torch.rand(1, n, device="cuda")
    ops["torch_fp8"] = (lambda w: torch._scaled_mm(xq, w.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
                        [(w,) for w in w8], n * k)
    ops["torch_fp8_fast"] = (lambda w: torch._scaled_mm(xq, w.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                                                        use_fast_accum=True), [(w,) for w in w8], n * k)
    ops["torch_fp8_rowwise"] = (lambda w: torch._scaled_mm(xq, w.t(), scale_a=sa, scale_b=sb,
                                                           out_dtype=torch.bfloat16), [(w,) for w in w8], n * k)
    return ops


PACKED4_RECIPES = ("w4a16", "w4a16_asym", "nvfp4", "mxfp4", "w4a8") + dispatch.W4A8_FP4


def tune_plans(m, n, k, recipes, log_rows):
    """Quick per-point autotune: tile candidates for the packed-4 skeleton (timed on W4A16, shared by
    the packed-4 recipes; the FP4 x FP8 recipes, whose block-MMA mode computes differently, timed on
    w4a8_nvfp4) and for FP8 block at large M, plus 'xla_dequant' where M >= 256. Returns {recipe: Plan};
    the winners are frozen into pallas_kernels/dispatch.py. At M=1 W4A16 also tries the dispatcher's
    word-GEMV plan."""
    plans = {}
    tried = []
    if any(r in recipes for r in PACKED4_RECIPES):
        cands = [dispatch.Plan("pallas", c) for c in quick_packed4_candidates(m, n, k)]
        if m >= 256:
            cands.append(dispatch.Plan("xla_dequant"))
        best = _fastest("w4a16", m, n, k, cands, tried)
        for r in PACKED4_RECIPES:
            plans[r] = best
        if any(r in recipes for r in dispatch.W4A8_FP4):
            best_fp4 = _fastest("w4a8_nvfp4", m, n, k, cands, tried)
            for r in dispatch.W4A8_FP4:
                plans[r] = best_fp4
        gemv = dispatch.plan("w4a16", m, n, k, GROUP)
        if gemv.path == "gemv":                        # W4A16 alone has the word GEMV at M=1
            plans["w4a16"] = plans["w4a16_asym"] = _fastest("w4a16", m, n, k, [best, gemv], tried)
    if "fp8_block" in recipes and m >= 256:
        cands = [dispatch.Plan("pallas", c) for c in (Fp8Config(128, 128, 128, num_warps=8, num_stages=4),
                                                       Fp8Config(128, 256, 128, num_warps=8, num_stages=3),
                                                       Fp8Config(256, 128, 128, num_warps=8, num_stages=3))]
        cands.append(dispatch.Plan("xla_dequant"))
        plans["fp8_block"] = _fastest("fp8_block", m, n, k, cands, tried)
    log_rows.extend(tried)
    return plans


def quick_packed4_candidates(m, n, k):
    def fill(bm, bn, bk, unroll, waves=1):
        return dispatch.fill_split(cm.cdiv(m, bm) * cm.cdiv(n, bn), cm.cdiv(k, bk) // unroll, waves * cm.NUM_SMS)

    out = []
    if m == 1:
        for bn in (16, 32):
            for unroll in (4, 8):
                out.append(Packed4Config(1, bn, 128, fill(1, bn, 128, unroll), False, 2, 3, unroll))
        out.append(Packed4Config(1, 32, 128, 1, False, 2, 3, 8))
    if m <= 16:
        for bn, unroll in ((64, 2), (64, 4), (128, 2)):
            out.append(Packed4Config(16, bn, 128, fill(16, bn, 128, unroll), False, 2, 3, unroll))
    elif m <= 64:
        for bm, bn, unroll in ((64, 64, 1), (64, 128, 1), (32, 64, 2)):
            out.append(Packed4Config(bm, bn, 128, fill(bm, bn, 128, unroll), False, 4, 3, unroll))
    elif m <= 256:
        out += [Packed4Config(64, 128, 128, 1, True, 4, 3), Packed4Config(128, 128, 128, 1, True, 8, 3)]
    return list(dict.fromkeys(out))


def _fastest(recipe, m, n, k, cands, tried):
    w0 = make_weights(recipe, n, k, seed=21)
    wb = weight_bytes(w0)
    ws = [w0] + [make_weights(recipe, n, k, seed=22 + r) for r in range(reps_for(wb, wb / 3e12) - 1)]
    x = rand_x(m, k, seed=23)
    best = None
    for plan in cands:
        op = jax_op(recipe, plan)
        try:
            ok, _ = check_op(recipe, op, x, w0)
            t = time_jax(op, [(x, w) for w in ws], trials=3, min_trial_s=0.01) if ok else None
        except Exception as e:  # noqa: BLE001
            log("  tune error", plan, repr(e)[:200])
            t = None
        tried.append({"recipe": recipe, "N": n, "K": k, "M": m, "path": plan.path,
                      "config": plan.config and dataclasses.asdict(plan.config), "us": t and t * 1e6})
        if t is not None and (best is None or t < best[0]):
            best = (t, plan)
    del ws
    gc.collect()
    log(f"  tuned {recipe} M={m} N={n} K={k}: {best[1]} {best[0] * 1e6:.1f} us")
    return best[1]


def step_bench(models, layers, ms, recipes, env, rows, flush, tune=False, tune_rows=None):
    copy_tbps = max(env["copy"].values())
    for model in models:
        for layer, (n, k) in SHAPES[model].items():
            if layers and layer not in layers:
                continue
            for m in ms:
                flops = 2.0 * m * n * k
                io_bytes = 2 * m * k + 2 * m * n
                base = {}
                plans = tune_plans(m, n, k, recipes, tune_rows) if tune else {}
                for recipe in recipes:
                    if recipe.startswith("torch") or recipe == "tinygemm":
                        continue
                    w0 = as_models_run(recipe, make_weights(recipe, n, k, seed=11))
                    wb = weight_bytes(w0)
                    reps = reps_for(wb, max((wb + io_bytes) / (copy_tbps * 1e12), flops / 900e12))
                    ws = [w0] + [as_models_run(recipe, make_weights(recipe, n, k, seed=12 + r))
                                 for r in range(reps - 1)]
                    x = rand_x(m, k, seed=m + n)
                    plan = plans.get(recipe)
                    if plan is None and recipe in PACKED4_RECIPES + ("fp8_block",):
                        plan = dispatch.plan("w4a16" if recipe == "w4a16_asym" else recipe, m, n, k, GROUP)
                    op = jax_op(recipe, plan)
                    try:
                        ok, err = check_op(recipe, op, x, w0, tol=2e-2 if recipe == "xla_bf16" else TOL)
                        t = time_jax(op, [(x, w) for w in ws])
                    except Exception as e:  # noqa: BLE001
                        log(f"  error {recipe} {model}.{layer} M={m}: {repr(e)[:300]}")
                        ok, err, t = False, float("nan"), None
                    device = device_time(op, [(x, w) for w in ws]) if DEVICE_TIME and t else {}
                    base[recipe] = t
                    rows.append({**_row(recipe, model, layer, n, k, m, t, wb + io_bytes, flops, copy_tbps, env,
                                        ok=ok, err=err, plan=plan, reps=reps), **device})
                    del ws, w0
                    gc.collect()
                if any(r.startswith("torch") or r == "tinygemm" for r in recipes):
                    reps = reps_for(2 * n * k, 2 * n * k / (copy_tbps * 1e12))
                    for name, (fn, arg_sets, wbytes) in torch_ops(n, k, m, reps, seed=n + m).items():
                        if name not in recipes:
                            continue
                        try:
                            t = time_torch(fn, arg_sets)
                        except Exception as e:  # noqa: BLE001
                            log(f"  error {name} {model}.{layer} M={m}: {repr(e)[:200]}")
                            t = None
                        base[name] = t
                        rows.append(_row(name, model, layer, n, k, m, t, wbytes + io_bytes, flops, copy_tbps, env,
                                         reps=len(arg_sets)))
                    import torch
                    torch.cuda.empty_cache()
                for r in rows:
                    if r["shape"] == f"{model}.{layer}" and r["M"] == m:
                        for b in ("xla_bf16", "torch_bf16", "tinygemm", "torch_fp8", "torch_fp8_fast",
                                  "torch_fp8_rowwise"):
                            if base.get(b) and r["us"]:
                                r[f"speedup_vs_{b}"] = round(base[b] * 1e6 / r["us"], 3)
                line = "  ".join(f"{r['recipe']}={r['us']:.1f}"
                                 + (f" ({r['device_us']:.1f})" if "device_us" in r else "")
                                 for r in rows if r["shape"] == f"{model}.{layer}" and r["M"] == m and r["us"])
                log(f"{model}.{layer} M={m}: {line}")
                flush()


def device_time(op, arg_sets) -> dict:
    """The device's own time per call of op (device_trace.op_summary: summed kernel time, so launch gaps
    on the host side are left out) and the GPU's busy fraction over the traced calls; {} where the trace
    holds no GPU kernels (a CPU run)."""
    import device_trace
    try:
        summary = device_trace.op_summary(op, arg_sets)
    except ValueError as e:                           # no GPU kernels in the trace: the row keeps its wall time
        log(f"  no device time: {str(e)[:300]}")
        return {}
    return {"device_us": round(summary["kernel_us_per_call"], 2), "busy_fraction": round(summary["busy_fraction"], 3)}


def _row(recipe, model, layer, n, k, m, t, nbytes, flops, copy_tbps, env, ok=True, err=0.0, plan=None,
         reps=1):
    us = t * 1e6 if t else None
    tbps = nbytes / t / 1e12 if t else None
    return {"recipe": recipe, "shape": f"{model}.{layer}", "N": n, "K": k, "M": m, "us": us and round(us, 2),
            "tbps": tbps and round(tbps, 3), "pct_copy_bw": tbps and round(100 * tbps / copy_tbps, 1),
            "tflops": t and round(flops / t / 1e12, 1), "card": env["card"], "jax": env["jax"],
            "check_ok": ok, "max_err_over_rms": err, "path": plan and plan.path,
            "config": plan and plan.config and dataclasses.asdict(plan.config), "reps": reps}


def step_once(models, layers, ms, recipes):
    """Runs each op a few times with no timing, for a profiler (ncu -k regex:packed4 ...)."""
    for model in models:
        for layer, (n, k) in SHAPES[model].items():
            if layers and layer not in layers:
                continue
            for recipe in recipes:
                w = make_weights(recipe, n, k, seed=3)
                for m in ms:
                    f = jax.jit(jax_op(recipe))
                    x = rand_x(m, k, seed=4)
                    for _ in range(3):
                        jax.block_until_ready(f(x, w))


# ---------------------------------------------------------------------------------------- HLO proof


def step_hlo(out_dir, env):
    """Prove the FP8 XLA path is cuBLASLt FP8 with no transpose, per-tensor scales inside the call."""
    m, n, k = 1024, 14336, 4096
    xq = jnp.zeros((m, k), jnp.float8_e4m3fn)
    wq = jnp.zeros((n, k), jnp.float8_e4m3fn)
    proof = {}
    for name, sx, sw in [("per_tensor", jnp.float32(1), jnp.float32(1)),
                         ("rowwise", jnp.ones((m,), jnp.float32), jnp.ones((n,), jnp.float32))]:
        hlo = jax.jit(fp8.fp8_matmul_xla).lower(xq, sx, wq, sw).compile().as_text()
        with open(os.path.join(out_dir, f"hlo_fp8_{name}.txt"), "w") as f:
            f.write(hlo)
        calls = [ln.strip()[:400] for ln in hlo.splitlines() if "custom_call_target=" in ln]
        proof[name] = {"cublaslt_f8": any("cublas$lt$matmul$f8" in c for c in calls),
                       "transposes": sum(" transpose(" in ln for ln in hlo.splitlines()),
                       "fusions": sum(ln.lstrip().startswith("ROOT") is False and " fusion(" in ln
                                      for ln in hlo.splitlines()),
                       "custom_calls": calls}
        log(f"HLO fp8 {name}: cublasLt f8={proof[name]['cublaslt_f8']} transposes={proof[name]['transposes']}")
        for c in calls:
            log("   ", c[:300])
    env["hlo_proof"] = proof


# --------------------------------------------------------------------------------------------- main


def write_outputs(out_dir, env, rows, checks, sweeps):
    stamp = env["date"][:16].replace(":", "")         # to the minute: a second run that day keeps the first's
    card = env["card"].replace(" ", "_")
    base = os.path.join(out_dir, f"gemm_{card}_{stamp}")
    with open(base + ".json", "w") as f:
        json.dump({"env": env, "rows": rows, "checks": checks, "sweeps": sweeps}, f, indent=1)
    keys = ("recipe", "shape", "M", "us", "tbps", "pct_copy_bw", "tflops", "speedup_vs_xla_bf16", "card", "jax",
            "device_us")
    fresh = [{**{kk: r.get(kk) for kk in keys}, **{kk: v for kk, v in r.items() if kk.startswith("speedup_vs_")},
              "run": env["date"]} for r in rows]
    summary_path = os.path.join(out_dir, "gemm_summary.json")
    old = []
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            old = json.load(f)
    with open(summary_path, "w") as f:
        json.dump(gemm_targets.merge_summary(old, fresh), f, indent=1)
    gemm_targets.write(summary_path, out_dir)
    with open(base + ".md", "w") as f:
        f.write(f"# GEMM benchmark: {env['card']}, jax {env['jax']}, {env['date']}\n\n")
        f.write(f"copy bandwidth: {env['copy']}\n\n")
        f.write("| recipe | shape | M | us | device us | TB/s | % copy | TFLOP/s | x XLA bf16 | x torch bf16 | "
                "x tinygemm | path |\n")
        f.write("|---|---|---|---|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['recipe']} | {r['shape']} | {r['M']} | {r['us']} | {r.get('device_us')} | {r['tbps']} | "
                    f"{r['pct_copy_bw']} | {r['tflops']} | {r.get('speedup_vs_xla_bf16')} | "
                    f"{r.get('speedup_vs_torch_bf16')} | {r.get('speedup_vs_tinygemm')} | {r.get('path')} |\n")
    log("wrote", base + ".json/.md")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", default="check,hlo,bench")
    ap.add_argument("--models", default="8b,70b")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--sweep", default="int4")
    ap.add_argument("--layers", default="", help="subset of qkv,o,gate_up,down (default all)")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--tune", action="store_true", help="quick per-point autotune before timing")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run: tiny shapes, interpret mode, no torch")
    ap.add_argument("--device-time", action="store_true",
                    help="GPU: also trace each JAX row for its device time per call (device_us, busy_fraction)")
    args = ap.parse_args(argv)
    if args.device_time:
        global DEVICE_TIME
        DEVICE_TIME = True
    if args.smoke:
        global INTERPRET
        INTERPRET = True
        SHAPES.clear()
        SHAPES["tiny"] = {"o": (256, 256), "down": (136, 384)}
        args.recipes = ",".join(r for r in args.recipes.split(",") if not (r.startswith("torch") or r == "tinygemm"))
    os.makedirs(args.out, exist_ok=True)
    steps = args.steps.split(",")
    models = ["tiny"] if args.smoke else args.models.split(",")
    ms = [int(v) for v in args.ms.split(",")]
    dev = jax.devices()[0]
    import torch
    env = {"card": dev.device_kind, "jax": jax.__version__, "torch": torch.__version__,
           "date": datetime.datetime.now().isoformat(timespec="seconds")}
    log(env)
    if steps == ["once"]:
        step_once(models, [v for v in args.layers.split(",") if v], ms, args.recipes.split(","))
        return 0
    env["copy"] = {"torch_copy_tbps": 1.0} if args.smoke else copy_bandwidth()
    log("copy bandwidth", env["copy"])
    layers = [v for v in args.layers.split(",") if v]
    rows, checks, sweeps = [], [], []
    ok = True
    if "check" in steps:
        ok = step_check(checks)
        write_outputs(args.out, env, rows, checks, sweeps)
    if "hlo" in steps:
        step_hlo(args.out, env)
    if "sweep" in steps:
        step_sweep(args.sweep.split(","), models, layers, ms, sweeps,
                   lambda: write_outputs(args.out, env, rows, checks, sweeps))
        write_outputs(args.out, env, rows, checks, sweeps)
    if "bench" in steps:
        step_bench(models, layers, ms, args.recipes.split(","), env, rows,
                   lambda: write_outputs(args.out, env, rows, checks, sweeps), args.tune, sweeps)
    write_outputs(args.out, env, rows, checks, sweeps)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
