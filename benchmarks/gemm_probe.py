"""Probe two kernel questions on the GPU before benchmarks/gemm.py times them in full:

1. The word GEMV (pallas_kernels/w4a16_gemv.py) at M=1: a config sweep on Llama-3.1 8B and 70B layer shapes
   (int4 g128, symmetric and asymmetric), checked against the reference, timed against the current
   dispatcher plan (packed-4 skeleton) and XLA bf16.
2. The XLA FP8 path's output: f32 from cuBLASLt and a convert pass (today) against ways of asking for a
   bf16 result, per-tensor and rowwise, against torch._scaled_mm, with the custom call's output type from
   the compiled HLO.

  PYTHONPATH=. python3 benchmarks/gemm_probe.py --out DIR     # both; --parts gemv or fp8
Timing as benchmarks/gemm.py (it is imported): distinct weight sets per executable, median of 5 trials.
Writes DIR/gemm_probe_<card>_<date>.json and prints a table.
"""
import argparse
import datetime
import gc
import itertools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gemm as G  # noqa: E402  (sets XLA_PYTHON_CLIENT_PREALLOCATE before jax is imported)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from pallas_kernels import _common as cm  # noqa: E402
from pallas_kernels import fp8, w4a16_gemv  # noqa: E402
from pallas_kernels.w4a16_gemv import GemvConfig  # noqa: E402


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
        n, k = G.SHAPES[model][layer]
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
                             "config": cfg, "us": round(t * 1e6, 2), "pct_copy_bw": round(100 * floor_us / (t * 1e6), 1),
                             "check_ok": ok, "err": err})
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
                G.log(f"{model}.{layer} {recipe} M=1: floor {floor_us:.1f} us, packed4 plan {base['plan'] * 1e6:.1f} us, "
                      f"best gemv {t * 1e6:.1f} us ({100 * floor_us / (t * 1e6):.0f}% copy) {cfg}")
            del ws, w0
            gc.collect()
            flush()


def fp8_variants():
    def f32_out(xq, sx, wq, sw):                        # today: f32 from cuBLASLt, then scale and convert
        return fp8.fp8_matmul_xla(xq, sx, wq, sw)

    def bf16_dot(xq, sx, wq, sw):                       # bf16 straight out of the dot, scale after
        y = lax.dot_general(xq, wq, (((1,), (1,)), ((), ())), preferred_element_type=jnp.bfloat16)
        s = sx * sw if sx.ndim == 0 else sx[:, None] * sw[None, :]
        return (y.astype(jnp.float32) * s).astype(jnp.bfloat16)

    def dequant_f32(xq, sx, wq, sw):                    # dequantise pattern in f32, bf16 result
        a = xq.astype(jnp.float32) * sx
        b = wq.astype(jnp.float32) * sw
        return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.bfloat16)

    def dequant_bf16(xq, sx, wq, sw):                   # flax fp8_ops style: scales rounded to bf16
        a = xq.astype(jnp.bfloat16) * sx.astype(jnp.bfloat16)
        b = wq.astype(jnp.bfloat16) * sw.astype(jnp.bfloat16)
        return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.bfloat16)

    return {"f32_out": f32_out, "bf16_dot": bf16_dot, "dequant_f32": dequant_f32, "dequant_bf16": dequant_bf16}


def probe_fp8(rows, flush):
    import torch
    for (model, layer), m in itertools.product([("8b", "gate_up"), ("8b", "qkv")], (1024, 4096)):
        n, k = G.SHAPES[model][layer]
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
                if mode == "rowwise" and name.startswith("dequant"):
                    continue                            # cuBLASLt on Hopper takes scalar scales only
                hlo = jax.jit(fn).lower(xq, sx, wq[0], sw).compile().as_text()
                calls = [ln for ln in hlo.splitlines() if "custom_call_target=" in ln]
                out_types = sorted({ln.split("=", 1)[1].strip().split("[")[0].lstrip("(") for ln in calls})
                fusions = sum(" fusion(" in ln for ln in hlo.splitlines())
                ok, err = G.check_close(jax.jit(fn)(xq, sx, wq[0], sw), ref)
                t = G.time_jax(fn, [(xq, sx, w, sw) for w in wq])
                rows.append({"part": "fp8", "shape": f"{model}.{layer}", "M": m, "mode": mode, "variant": name,
                             "us": round(t * 1e6, 2), "tflops": round(2 * m * n * k / t / 1e12, 1),
                             "check_ok": ok, "err": err, "custom_call_out": out_types, "fusions": fusions,
                             "cublaslt_f8": any("f8" in ln and "cublas" in ln for ln in calls)})
            tx = torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn)
            tw = [(torch.randn(n, k, device="cuda") * 64).clamp(-448, 448).to(torch.float8_e4m3fn) for _ in range(reps)]
            if mode == "per_tensor":
                sa = sb = torch.tensor(1.0, device="cuda")
            else:
                sa, sb = torch.rand(m, 1, device="cuda"), torch.rand(1, n, device="cuda")
            t = G.time_torch(lambda w: torch._scaled_mm(tx, w.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16),
                             [(w,) for w in tw])
            rows.append({"part": "fp8", "shape": f"{model}.{layer}", "M": m, "mode": mode, "variant": "torch_scaled_mm",
                         "us": round(t * 1e6, 2), "tflops": round(2 * m * n * k / t / 1e12, 1)})
            del tw
            torch.cuda.empty_cache()
            flush()
        del wq
        gc.collect()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="gemv,fp8")
    ap.add_argument("--shapes", default="8b.gate_up,8b.o,8b.qkv,8b.down,70b.gate_up,70b.down")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    card = jax.devices()[0].device_kind
    copy = G.copy_bandwidth()
    copy_tbps = max(copy.values())
    G.log(f"{card}, jax {jax.__version__}, copy {copy}")
    rows: list = []
    path = os.path.join(args.out, f"gemm_probe_{card.replace(' ', '_')}_{datetime.date.today()}.json")

    def flush():
        with open(path, "w") as f:
            json.dump({"card": card, "jax": jax.__version__, "copy": copy, "rows": rows}, f, indent=1)

    try:
        if "gemv" in args.parts:
            probe_gemv(copy_tbps, rows, args.shapes.split(","), flush)
        if "fp8" in args.parts:
            probe_fp8(rows, flush)
    finally:
        flush()
        for r in rows:
            if r["part"] == "fp8":
                G.log(f"fp8 {r['shape']} M={r['M']} {r['mode']:10s} {r['variant']:16s} {r['us']:9.1f} us "
                      f"{r['tflops']:6.0f} TF ok={r.get('check_ok')} out={r.get('custom_call_out')} "
                      f"fusions={r.get('fusions')}")
        G.log(f"wrote {path}")


if __name__ == "__main__":
    main()
