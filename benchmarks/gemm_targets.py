"""Issue 7's GEMM speed targets, checked mechanically from benchmarks/results/gemm_summary.json (written by
benchmarks/gemm.py on a GPU): one row per target with the measured value, the worst point, met or not,
and the Llama-3.1 shapes it has no rows for.

  python benchmarks/gemm_targets.py [--summary PATH] [--out DIR]     # writes DIR/gemm_targets.{md,json}

Each card is judged on its own rows (the issue's targets hold on an H100 or an H200, never on a mix of
the two). A ratio against a baseline is measured within one run: the row's own speedup_vs_<baseline>
(gemm.py's ratio to the baseline it timed in the same run, at the same shape and M), else the baseline row's
time over the row's where both rows come from one run (a row's "run" is its gemm.py run's start time). The
summary keeps each point's latest row, and a baseline's older rows while a row of their run stands at that
point (merge_summary), since runs differ by up to 10 % at the same point. Points without a same-run
ratio are skipped (and reported as missing). Values aggregate by geometric mean where the issue says so, by minimum
where the target holds at every point ("not slower than").

The verdict is on wall-clock rows. Below it the same targets are evaluated on the device's own time of the
rows that carry one (gemm.py --device-time): at small M a host slow to launch can swamp a 10 us kernel's
wall time (gemm_notes.md, runs 39 and 41), and inside a jitted model step the host runs ahead of the GPU.
"""
import argparse
import dataclasses
import json
import math
import os

SHAPES = tuple(f"{model}.{layer}" for model in ("8b", "70b") for layer in ("qkv", "o", "gate_up", "down"))


@dataclasses.dataclass(frozen=True)
class Target:
    """recipe at the Ms; metric 'pct_copy' (pct_copy_bw / 100) or a ratio us(baseline) / us(recipe);
    threshold on the aggregate ('geomean' or 'min') over the shapes x Ms present."""

    name: str
    recipe: str
    ms: tuple[int, ...]
    threshold: float
    baseline: str | None = None                     # None: the copy-bandwidth fraction
    agg: str = "geomean"


def _targets() -> list[Target]:
    out = []
    for recipe in ("w4a16", "w4a16_asym", "nvfp4", "mxfp4"):
        out.append(Target(f"{recipe} M=1,16: >= 75 % of copy bandwidth (geomean)", recipe, (1, 16), 0.75))
        out.append(Target(f"{recipe} M=1: >= 3.0x XLA bf16 (geomean)", recipe, (1,), 3.0, "xla_bf16"))
    out += [
        Target("w4a16 M=1: >= 1.4x tinygemm", "w4a16", (1,), 1.4, "tinygemm"),
        Target("w4a16 M=1: >= 2.5x torch cuBLAS bf16", "w4a16", (1,), 2.5, "torch_bf16"),
        Target("w4a16 M=16: >= 2.5x torch cuBLAS bf16", "w4a16", (16,), 2.5, "torch_bf16"),
        Target("w4a16 M=64: >= 1.8x XLA bf16", "w4a16", (64,), 1.8, "xla_bf16"),
        Target("w4a16 every M >= 256: >= 0.95x XLA bf16 (min)", "w4a16", (256, 1024, 4096), 0.95, "xla_bf16",
               "min"),
        Target("w4a8 M=1,16: >= 75 % of copy bandwidth (geomean)", "w4a8", (1, 16), 0.75),
        Target("w4a8 M=256: >= 1.5x XLA bf16", "w4a8", (256,), 1.5, "xla_bf16"),
        Target("fp8_block M=4096: >= 60 % of cuBLASLt FP8 per-tensor (XLA)", "fp8_block", (4096,), 0.6, "fp8_xla"),
        Target("fp8_block M=4096: >= 1.4x XLA bf16", "fp8_block", (4096,), 1.4, "xla_bf16"),
        Target("fp8 per tensor (XLA) M >= 1024: >= 90 % of torch._scaled_mm (min)", "fp8_xla", (1024, 4096), 0.9,
               "torch_fp8", "min"),
        Target("fp8 rowwise (XLA) M >= 1024: >= 90 % of torch._scaled_mm (min)", "fp8_rowwise_xla", (1024, 4096),
               0.9, "torch_fp8_rowwise", "min"),
    ]
    return out


TARGETS = _targets()
BASELINES = frozenset(t.baseline for t in TARGETS if t.baseline)


# Peers gemm.py times by CUDA-graph replay (benchmarks/gemm.py time_torch): no host launch gaps either.
GRAPH_TIMED = frozenset({"torch_bf16", "tinygemm", "torch_fp8", "torch_fp8_fast", "torch_fp8_rowwise"})


def on_device_time(rows: list[dict]) -> list[dict]:
    """The rows that carry the device's own time (gemm.py --device-time: summed kernel time, the host's
    launch gaps left out), with us set to it, pct_copy_bw rescaled to it and the wall-clock speedups dropped
    (ratios then come from same-run rows' device times), plus the torch peers' rows as they are: their time
    is a CUDA graph's replay, with no host launch between kernels (it still counts the graph's own gaps
    between kernels, so a ratio against them leans slightly toward the peer)."""
    out = []
    for r in rows:
        if r.get("device_us") and r.get("us"):
            pct = r.get("pct_copy_bw")
            kept = {key: v for key, v in r.items() if not key.startswith("speedup_vs_")}
            out.append({**kept, "us": r["device_us"], "pct_copy_bw": pct and pct * r["us"] / r["device_us"]})
        elif r.get("recipe") in GRAPH_TIMED and r.get("us"):
            out.append({key: v for key, v in r.items() if not key.startswith("speedup_vs_")})
    return out


def merge_summary(old: list[dict], fresh: list[dict]) -> list[dict]:
    """The summary after a (partial) run: its fresh rows replace the rows of the points (recipe, shape, M,
    card) it measured, except a baseline's older rows (BASELINES) where a row of their own run
    still stands at that point, since evaluate divides only rows of one run. Fresh rows come last."""
    point = lambda r: (r["recipe"], r["shape"], r["M"], r["card"])  # noqa: E731
    measured = {point(r) for r in fresh}
    kept = [r for r in old if point(r) not in measured]
    standing = {(r["shape"], r["M"], r["card"], r.get("run")) for r in kept}
    paired = [r for r in old if point(r) in measured and r["recipe"] in BASELINES
              and (r["shape"], r["M"], r["card"], r.get("run")) in standing]
    return kept + paired + fresh


def evaluate(rows: list[dict], target: Target) -> dict:
    """{value, worst, points, met, missing}: value None (and met None) when no point has its rows."""
    us = {(r["recipe"], r["shape"], r["M"], r["card"]): r for r in rows if r.get("us")}         # the latest
    of_run = {(r["recipe"], r["shape"], r["M"], r["card"], r.get("run")): r for r in rows if r.get("us")}
    values, missing = [], set()
    for shape in SHAPES:
        for m in target.ms:
            found = False
            for (recipe, s, mm, card), r in us.items():
                if recipe != target.recipe or s != shape or mm != m:
                    continue
                if target.baseline is None:
                    v = r.get("pct_copy_bw")
                    v = v / 100 if v else None
                else:
                    base = of_run.get((target.baseline, shape, m, card, r.get("run")))
                    v = r.get(f"speedup_vs_{target.baseline}") or (base["us"] / r["us"] if base else None)
                if v:
                    values.append(v)
                    found = True
            if not found:
                missing.add(shape)
    if not values:
        return {"value": None, "worst": None, "points": 0, "met": None, "missing": sorted(missing)}
    agg = min(values) if target.agg == "min" else math.exp(sum(map(math.log, values)) / len(values))
    return {"value": round(agg, 3), "worst": round(min(values), 3), "points": len(values),
            "met": agg >= target.threshold, "missing": sorted(missing)}


def table(rows: list[dict]) -> tuple[dict, str]:
    """Per card: every target on the card's wall-clock rows (the verdict), then on their device time where
    they have it (each result carries it as "device": {value, worst, points, met, missing}). Returns
    ({card: [result per target]}, markdown)."""
    results = {}
    lines = ["# GEMM targets (issue 7), from gemm_summary.json, per card", ""]
    for card in sorted({r["card"] for r in rows}):
        card_rows = [r for r in rows if r["card"] == card]
        device_rows = on_device_time(card_rows)
        results[card] = [{"target": t.name, "threshold": t.threshold, **evaluate(card_rows, t),
                          "device": evaluate(device_rows, t)} for t in TARGETS]
        for title, pick in (("wall clock (the verdict)", lambda r: r), ("device time: the same targets on the rows "
                            "gemm.py --device-time measured (host launch gaps left out), torch peers as timed "
                            "(CUDA-graph replay)",
                            lambda r: r["device"])):
            lines += [f"## {card}: {title}", "", "| target | value | worst point | points | status | "
                      "shapes without rows |", "|---|---|---|---|---|---|"]
            for r in results[card]:
                v = pick(r)
                status = "no data" if v["met"] is None else "met" if v["met"] else "not met"
                lines.append(f"| {r['target']} | {v['value']} | {v['worst']} | {v['points']} | {status} | "
                             f"{', '.join(v['missing']) or '-'} |")
            lines.append("")
    return results, "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    ap.add_argument("--summary", default=os.path.join(here, "gemm_summary.json"))
    ap.add_argument("--out", default=here)
    args = ap.parse_args(argv)
    print(write(args.summary, args.out))


def write(summary_path: str, out_dir: str) -> str:
    """Evaluates the summary's rows; writes out_dir/gemm_targets.json and .md; returns the markdown."""
    with open(summary_path) as f:
        rows = json.load(f)
    results, md = table(rows)
    with open(os.path.join(out_dir, "gemm_targets.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, "gemm_targets.md"), "w") as f:
        f.write(md)
    return md


if __name__ == "__main__":
    main()
