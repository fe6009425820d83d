"""SmolLM2-135M quantized by jaxq.quantize with calibration (max scales, AWQ, GPTQ; layer by layer): WikiText-2
perplexity against round to nearest of the same recipe and the real tools' anchors, time and peak memory.

  PYTHONPATH=. python benchmarks/ptq_ppl.py                        # every variant (~30-40 min on 2 idle cores)
  PYTHONPATH=. python benchmarks/ptq_ppl.py --only w4a16_gptq,fp8  # a subset (names as in VARIANTS)

Setup (as benchmarks/recipes_ppl.py, whose helpers it reuses):
  model       the embedded SmolLM2-135M-Instruct GGUF rounded to bf16, computed in float32 (the anchors' setup).
  calibration --calib-size samples (default 32) of 512 tokens drawn with seed 1234 from
              ../shared/data/wikitext-2/valid.txt (jaxq.calib.data), run layer by layer (jaxq.calib.sequential).
  perplexity  jaxq.perplexity, the first 20 windows of 512 tokens of test.txt.
  INT4        group 64 (hidden 576 is not a multiple of 128; the anchors used 64 too).
  RTN         the same recipe with algorithm="max" (round to nearest; static scales from the same calibration).
  memory      QuantizeReport.host_peak_rise: how far the process's peak resident memory rose during the
              layer-by-layer calibration (activations, statistics, compilation, the quantized weights),
              against the model's bf16 size. The float32 model the caller holds is not counted.
Gate per row: ppl <= gate (the issue's bounds), ppl below RTN's for AWQ/GPTQ, memory rise < 2 x bf16 size.
Writes benchmarks/results/smollm2_ptq_ppl.json and .md.
"""

import argparse
import dataclasses
import json
import math
import os
import pathlib
import platform
import sys
import time

from recipes_ppl import describe  # benchmarks/ is this script's directory, first on sys.path
from smollm2_reference import wikitext

REPO = pathlib.Path(__file__).resolve().parents[1]
MEMORY_GATE = 2.0  # host peak rise / bf16 model size


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    recipe: str | None                 # None: the unquantized model
    overrides: tuple = ()              # get_recipe overrides
    anchor: float | None = None
    anchor_tool: str = ""
    gate: float | None = None          # ppl must be <= gate
    vs_rtn: bool = True                # also quantize round to nearest; the calibrated ppl must beat it


ASYM = (("symmetric", False),)
VARIANTS = (
    Variant("bf16", None, anchor=29.30, anchor_tool="transformers bf16", vs_rtn=False),
    Variant("fp8", "fp8", anchor=30.26, anchor_tool="ModelOpt fp8 (max)", gate=30.3, vs_rtn=False),
    Variant("w4a16_awq", "w4a16_awq", anchor=36.90, anchor_tool="ModelOpt int4 AWQ g64", gate=36.9),
    Variant("w4a16_awq_asym", "w4a16_awq", ASYM, anchor=34.27, anchor_tool="llm-compressor AWQ W4A16_ASYM g64",
            gate=34.3),
    Variant("w4a8_awq", "w4a8_awq", anchor=38.12, anchor_tool="ModelOpt w4a8 AWQ g64", gate=38.1),
    Variant("w4a16_gptq", "w4a16_gptq", anchor=36.91, anchor_tool="llm-compressor GPTQ W4A16 g64 (static "
            "act-order)", gate=36.9),
    Variant("w4a8_gptq", "w4a8_gptq"),
    Variant("nvfp4_awq", "nvfp4", (("algorithm", "awq"),), anchor=41.41, anchor_tool="ModelOpt nvfp4 (max, "
            "no AWQ)"),
)


def quantize(base, recipe, calib, args):
    import jaxq

    start = time.perf_counter()
    model, report = jaxq.quantize(base, recipe, calib_data=calib, calib_size=args.calib_size,
                                  calib_seq=args.calib_seq, return_report=True, progress=False)
    return model, report, time.perf_counter() - start


def run_variant(v: Variant, base, calib: str, test: str, args) -> dict:
    import jaxq

    start = time.perf_counter()
    row = {"variant": v.name, "anchor": v.anchor, "anchor_tool": v.anchor_tool, "gate": v.gate}
    if v.recipe is None:
        row.update(recipe=None, recipe_text="-", algorithm="-", ppl=jaxq.perplexity(base, test, 512, args.windows),
                   ppl_rtn=None, seconds=0.0, host_peak_rise=None, memory_ratio=None, report=None)
    else:
        recipe = jaxq.get_recipe(v.recipe, **dict(v.overrides))
        recipe = recipe.replace(group_size=64) if recipe.weight_format == "int4" else recipe
        model, report, seconds = quantize(base, recipe, calib, args)
        ppl = jaxq.perplexity(model, test, 512, args.windows)
        rtn = None
        if v.vs_rtn:
            rtn_model, _, _ = quantize(base, recipe.replace(algorithm="max"), calib, args)
            rtn = jaxq.perplexity(rtn_model, test, 512, args.windows)
        rise = report.host_peak_rise
        row.update(recipe=dataclasses.asdict(recipe), recipe_text=describe(recipe) + (
                       "" if recipe.symmetric else " asym"), algorithm=recipe.algorithm, ppl=ppl, ppl_rtn=rtn,
                   seconds=seconds, host_peak_rise=rise,
                   memory_ratio=None if rise is None else rise / report.model_bf16_bytes, report=str(report))
    row["row_seconds"] = time.perf_counter() - start  # quantization(s) and perplexities
    ppl, rtn, ratio = row["ppl"], row["ppl_rtn"], row["memory_ratio"]
    row["gate_met"] = bool(math.isfinite(ppl) and (v.gate is None or ppl <= v.gate) and (rtn is None or ppl < rtn)
                           and (ratio is None or ratio < MEMORY_GATE))
    print(f"{v.name:16s} {row['algorithm']:5s} ppl {ppl:7.3f}  rtn {rtn}  anchor {v.anchor}  gate {v.gate}  "
          f"met {row['gate_met']}  {row['seconds']:.0f} s  memory x{ratio}", flush=True)
    return row


def write_markdown(result: dict, path: pathlib.Path) -> None:
    fmt = lambda x, spec=".2f": "-" if x is None else format(x, spec)
    lines = [
        "# SmolLM2-135M-Instruct: jaxq.quantize with calibration (max, AWQ, GPTQ), layer by layer",
        "",
        f"{result['device']}, jax {result['jax']}, float32 compute (bf16-exact weights); calibration "
        f"{result['calib_size']} x {result['calib_seq']} tokens of WikiText-2 valid.txt (seed 1234); perplexity "
        f"over the first {result['windows']} windows of 512 tokens of test.txt; INT4 group 64. All rows "
        f"{sum(r['row_seconds'] for r in result['rows']) / 60:.0f} min (quantizations and perplexities; a CPU "
        "shared with other jobs, load average in the JSON). Rerun: `PYTHONPATH=. python benchmarks/ptq_ppl.py`.",
        "",
        "| variant | weights / activations | algorithm | ppl | RTN ppl | anchor (real tool) | gate | met | "
        "quantize s | host peak rise MiB (x bf16 model) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        anchor = "-" if r["anchor"] is None else f"{r['anchor']:.2f} ({r['anchor_tool']})"
        gate = ("<= " + fmt(r["gate"], "g") if r["gate"] else "finite") + (" and < RTN" if r["ppl_rtn"] else "")
        memory = "-" if r["host_peak_rise"] is None else (f"{r['host_peak_rise'] / 2**20:.0f} "
                                                         f"({r['memory_ratio']:.2f})")
        lines.append(f"| {r['variant']} | {r['recipe_text']} | {r['algorithm']} | {r['ppl']:.2f} | "
                     f"{fmt(r['ppl_rtn'])} | {anchor} | {gate} | {'yes' if r['gate_met'] else 'NO'} | "
                     f"{r['seconds']:.0f} | {memory} |")
    lines += [
        "",
        "Defaults used (jaxq.calib): AWQ = awq_lite scale search (alpha 0..1 step 0.1) + awq_clip (ratios 1.0..0.5), "
        "q/k/v and gate/up smoothing folded into the RMSNorms, o_proj/down_proj keep pre_quant_scale (ModelOpt's "
        "export); GPTQ = damping 0.01, static act-order (llm-compressor's default: no g_idx), blocks of 128; "
        "quantized layer outputs are propagated for AWQ and GPTQ, float ones for max calibration. Memory gate: "
        f"host peak rise < {MEMORY_GATE} x the bf16 model.",
        "",
        "## Quantization reports",
        "",
    ]
    for r in result["rows"]:
        if r["report"]:
            lines += [f"**{r['variant']}**", "```", r["report"], "```"]
    path.write_text("\n".join(lines) + "\n")


def variant_names(text: str) -> list[str]:
    """--only's comma-separated names, each checked against VARIANTS."""
    names = [n for n in text.split(",") if n]
    unknown = sorted(set(names) - {v.name for v in VARIANTS})
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown variants {unknown}; known: {[v.name for v in VARIANTS]}")
    return names


def float32_smollm2():
    """The embedded SmolLM2 rounded to bf16, its params then held in float32 (the anchors' compute dtype)."""
    import jax
    import jax.numpy as jnp

    import jaxq

    bf16 = jaxq.load("smollm2-135m", dtype="bfloat16")
    return bf16.replace(params=jax.tree.map(lambda p: p.astype(jnp.float32), bf16.params), dtype=jnp.dtype("float32"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", type=variant_names, default=[], help="comma-separated variant names (default: all)")
    parser.add_argument("--windows", type=int, default=20, help="perplexity windows of 512 tokens")
    parser.add_argument("--calib-size", type=int, default=32, help="calibration samples")
    parser.add_argument("--calib-seq", type=int, default=512, help="tokens per calibration sample")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    names = args.only

    import logging

    import jax

    logging.basicConfig(level=logging.WARNING)
    base = float32_smollm2()
    calib, test = wikitext("valid"), wikitext("test")
    rows = [run_variant(v, base, calib, test, args) for v in VARIANTS if not names or v.name in names]

    device = f"{jax.devices()[0].device_kind} ({platform.processor() or platform.machine()})"
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "smollm2_ptq_ppl.json"
    if names and path.exists():  # a subset updates its rows of the last full run
        kept = [r for r in json.loads(path.read_text())["rows"] if r["variant"] not in names]
        order = [v.name for v in VARIANTS]
        rows = sorted(kept + rows, key=lambda r: order.index(r["variant"]))
    result = {"device": device, "jax": jax.__version__, "windows": args.windows, "calib_size": args.calib_size,
              "calib_seq": args.calib_seq, "load_average": os.getloadavg(), "rows": rows}
    path.write_text(json.dumps(result, indent=1))
    write_markdown(result, out / "smollm2_ptq_ppl.md")
    print(f"wrote {out}/smollm2_ptq_ppl.json and .md")
    return 0 if all(r["gate_met"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
