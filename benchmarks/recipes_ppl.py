"""SmolLM2-135M quantized with every recipe by jaxq.quantize (round to nearest, max calibration): WikiText-2
perplexity against the real tools' anchors, params size, a greedy sample per recipe.

  PYTHONPATH=. python benchmarks/recipes_ppl.py                      # all variants (about 15 min on 2 CPU cores)
  PYTHONPATH=. python benchmarks/recipes_ppl.py --only fp8,nvfp4     # a subset (names as in VARIANTS)

Setup, as the anchors' runs (../shared/tools/build_fixtures.py full-size mode) where it matters:
  model       the embedded SmolLM2-135M-Instruct GGUF, dequantised and rounded to bf16 (the "bf16" model),
              then computed in float32 (--dtype float32: bf16-exact weights, float32 activations, as the
              anchors' fake-quant models ran); --dtype bfloat16 computes in bf16 instead.
  calibration the first --calib-size windows of --calib-seq tokens of ../shared/data/wikitext-2/valid.txt
              (default 32 x 512; the anchors used 32 seeded random windows of 256).
  perplexity  jaxq.perplexity: the first 20 windows of 512 tokens of test.txt (jaxq/eval.py's definition);
              variants with the FP8 KV cache run through an FP8 cache.
  INT4        group 64: SmolLM2's hidden size 576 = 9 x 64 is not a multiple of 128, so q/k/v/o/gate/up
              cannot take groups of 128 (jaxq.quantize refuses and names group_size=64; the anchors' ModelOpt
              and llm-compressor runs used 64 too). RTN only: the AWQ anchors come from AWQ-smoothed weights.
  bytes       the quantized linears as stored (codes + scales), the rest of the params counted in bf16
              (their values are bf16-exact), against the bf16 model.
Writes benchmarks/results/smollm2_rtn_ppl.json and .md.
"""

import argparse
import dataclasses
import json
import math
import pathlib
import platform
import sys
import time

import numpy as np

from smollm2_reference import wikitext  # benchmarks/ is this script's directory, first on sys.path

REPO = pathlib.Path(__file__).resolve().parents[1]
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,"]


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    recipe: str | None                 # None: the unquantized model
    overrides: tuple = ()              # get_recipe overrides
    kv_cache: str | None = None
    group_size: int | None = None
    anchor: float | None = None
    anchor_tool: str = ""
    gate: float | None = None          # ppl must be <= gate; None: finite and reported


RTN = (("algorithm", "max"),)
VARIANTS = (
    Variant("bf16", None, anchor=29.30, anchor_tool="transformers bf16"),
    Variant("fp8", "fp8", anchor=30.26, anchor_tool="ModelOpt fp8 (+FP8 KV)", gate=30.40),
    Variant("fp8+kv_fp8", "fp8", kv_cache="fp8", anchor=30.26, anchor_tool="ModelOpt fp8 (+FP8 KV)", gate=30.40),
    Variant("fp8_rowwise", "fp8_rowwise", anchor=30.51, anchor_tool="ModelOpt fp8 pc-pt; llm-compressor "
            "FP8_DYNAMIC 30.20", gate=30.65),
    Variant("fp8_block", "fp8_block", anchor=30.19, anchor_tool="ModelOpt fp8 2D-block weight-only", gate=30.35),
    Variant("fp8_block_wo", "fp8_block", (("activation", "none"),), anchor=30.19,
            anchor_tool="ModelOpt fp8 2D-block weight-only", gate=30.35),
    Variant("nvfp4", "nvfp4", anchor=41.41, anchor_tool="ModelOpt nvfp4 (W4A4)", gate=42.5),
    Variant("nvfp4_wo", "nvfp4", (("activation", "none"),), anchor=34.38, anchor_tool="llm-compressor NVFP4A16",
            gate=35.0),
    Variant("mxfp4", "mxfp4"),
    Variant("w4a16_awq_rtn_g64", "w4a16_awq", RTN, group_size=64, anchor=36.90,
            anchor_tool="ModelOpt int4 AWQ g64 (with AWQ)"),
    Variant("w4a8_awq_rtn_g64", "w4a8_awq", RTN, group_size=64, anchor=38.12,
            anchor_tool="ModelOpt w4a8 AWQ g64 (with AWQ)"),
    Variant("w4a16_gptq_rtn_g64", "w4a16_gptq", RTN, group_size=64),
    Variant("w4a8_gptq_rtn_g64", "w4a8_gptq", RTN, group_size=64),
)


def param_sizes(params) -> tuple[int, int, int]:
    """(bytes of the quantized linears as stored, their number of weights, bytes of everything else
    counted at 2 bytes per value)."""
    import jax

    from jaxq.nn.quantized_weight import QuantizedWeight

    quantized = values = other = 0
    for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QuantizedWeight)):
        if isinstance(leaf, QuantizedWeight):
            quantized += sum(x.nbytes for x in jax.tree.leaves(leaf))
            values += int(np.prod(leaf.shape))
        else:
            other += leaf.size * 2
    return quantized, values, other


def describe(recipe) -> str:
    if recipe is None:
        return "-"
    weight = f"{recipe.weight_format} {recipe.weight_granularity}"
    if recipe.weight_granularity in ("group", "block"):
        weight += f" {recipe.group_size}"
    return f"{weight} / {recipe.activation}"


def run_variant(v: Variant, base, calib: str, test: str, args) -> dict:
    import jaxq

    start = time.perf_counter()
    report = None
    model = base
    if v.recipe is not None:
        recipe = jaxq.get_recipe(v.recipe, **dict(v.overrides))
        model, report = jaxq.quantize(base, recipe, calib_data=calib, calib_size=args.calib_size,
                                      calib_seq=args.calib_seq, kv_cache=v.kv_cache, group_size=v.group_size,
                                      return_report=True)
        recipe = model.quantization.recipe_for("model.layers.0.mlp.up_proj")  # with group_size applied
    quantize_s = time.perf_counter() - start
    start = time.perf_counter()
    ppl = jaxq.perplexity(model, test, 512, args.windows, kv_cache_dtype="fp8" if v.kv_cache else None)
    ppl_s = time.perf_counter() - start
    samples = [jaxq.generate(model, p, max_new_tokens=args.tokens, kv_cache_dtype=v.kv_cache or "bf16")
               for p in PROMPTS]
    quantized, linear_values, other = param_sizes(model.params)
    met = math.isfinite(ppl) and (v.gate is None or ppl <= v.gate)
    row = {
        "variant": v.name, "recipe": None if v.recipe is None else dataclasses.asdict(recipe),
        "recipe_text": describe(None if v.recipe is None else recipe), "kv_cache": v.kv_cache or "bf16",
        "ppl": ppl, "anchor": v.anchor, "anchor_tool": v.anchor_tool, "gate": v.gate, "gate_met": met,
        "params_bytes": quantized + other, "quantized_linear_bytes": quantized,
        "bits_per_weight": 8 * quantized / linear_values if linear_values else 16.0,
        "quantize_seconds": quantize_s, "ppl_seconds": ppl_s, "samples": dict(zip(PROMPTS, samples)),
        "report": None if report is None else str(report),
    }
    print(f"{v.name:20s} ppl {ppl:8.3f}  anchor {v.anchor}  gate {v.gate} met {met}  "
          f"{row['params_bytes'] / 2**20:.1f} MiB  {row['bits_per_weight']:.2f} bits/w  "
          f"({quantize_s:.0f} s + {ppl_s:.0f} s)\n  {samples[0]!r}", flush=True)
    return row


def write_markdown(result: dict, path: pathlib.Path) -> None:
    rows = result["rows"]
    bf16 = next(r for r in rows if r["variant"] == "bf16")["params_bytes"]
    lines = [
        "# SmolLM2-135M-Instruct: jaxq.quantize (RTN, max calibration) per recipe",
        "",
        f"{result['device']}, jax {result['jax']}, compute dtype {result['dtype']} (bf16-exact weights); "
        f"WikiText-2 test.txt, first {result['windows']} windows of 512 tokens; calibration: first "
        f"{result['calib_size']} x {result['calib_seq']} tokens of valid.txt. Rerun: "
        "`PYTHONPATH=. python benchmarks/recipes_ppl.py`.",
        "",
        "| variant | weights / activations | KV | ppl | anchor (real tool) | gate | met | params MiB (x bf16) "
        "| linear bits/weight |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        anchor = "-" if r["anchor"] is None else f"{r['anchor']:.2f} ({r['anchor_tool']})"
        gate = "finite" if r["gate"] is None else f"<= {r['gate']}"
        lines.append(f"| {r['variant']} | {r['recipe_text']} | {r['kv_cache']} | {r['ppl']:.2f} | {anchor} | {gate} "
                     f"| {'yes' if r['gate_met'] else 'NO'} | {r['params_bytes'] / 2**20:.1f} "
                     f"({r['params_bytes'] / bf16:.2f}) | {r['bits_per_weight']:.2f} |")
    lines += [
        "",
        "Expected linear bits/weight: FP8 8 (+ a float32 scale per tensor / row / 128x128 block), NVFP4 4 + 8/16 "
        "= 4.5, MXFP4 4 + 8/32 = 4.25, INT4 group 64 with float32 scales 4 + 32/64 = 4.5 (+ 8/64 zero points "
        "for asymmetric GPTQ, not used here). Embeddings (tied lm_head) and norms stay bf16.",
        "",
        "INT4 group size: 64. SmolLM2's hidden size 576 = 9 x 64 is not a multiple of 128, so q/k/v/o/gate/up "
        "cannot use groups of 128; jaxq.quantize raises naming those layers and group_size=64 rather than "
        "mixing group sizes per layer. The AWQ anchors are ModelOpt runs with AWQ smoothing; the rows here are "
        "round to nearest (AWQ/GPTQ plug into jaxq.quantize later).",
        "",
        "## Greedy samples (jaxq.generate)",
        "",
    ]
    for r in rows:
        for prompt, text in r["samples"].items():
            lines.append(f"- **{r['variant']}** {prompt!r} -> {text!r}")
    lines += ["", "## Quantization reports (layers, bytes, peak memory)", "",
              f"As jaxq.quantize logs them; bytes there count the unquantized params in the compute dtype "
              f"({result['dtype']}). The host peak is the process's resident high-water mark over layers 1.. "
              "(layer 0 compiles every quantizer); on a CPU it stays at or below the quantized weights those "
              "layers produced, as the loop holds one layer's temporaries at a time and XLA reuses the buffers "
              "calibration freed. Seconds include calibration and compiles on a shared, loaded 2-core CPU.", ""]
    for r in rows:
        if r["report"]:
            lines += [f"**{r['variant']}** ({r['quantize_seconds']:.0f} s incl. calibration)", "```",
                      r["report"], "```"]
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--calib-size", type=int, default=32)
    parser.add_argument("--calib-seq", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=24, help="greedy tokens per sample")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - {v.name for v in VARIANTS}
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {[v.name for v in VARIANTS]}")

    import logging

    import jax
    import jax.numpy as jnp

    import jaxq

    logging.basicConfig(level=logging.WARNING)
    bf16 = jaxq.load("smollm2-135m", dtype="bfloat16")
    base = bf16.replace(params=jax.tree.map(lambda p: p.astype(args.dtype), bf16.params), dtype=jnp.dtype(args.dtype))
    calib, test = wikitext("valid"), wikitext("test")
    rows = [run_variant(v, base, calib, test, args) for v in VARIANTS if not names or v.name in names]

    device = f"{jax.devices()[0].device_kind} ({platform.processor() or platform.machine()})"
    result = {"device": device, "jax": jax.__version__, "dtype": args.dtype, "windows": args.windows,
              "calib_size": args.calib_size, "calib_seq": args.calib_seq, "rows": rows}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "smollm2_rtn_ppl.json").write_text(json.dumps(result, indent=1))
    if any(r["variant"] == "bf16" for r in rows):
        write_markdown(result, out / "smollm2_rtn_ppl.md")
    print(f"wrote {out}/smollm2_rtn_ppl.json" + (" and .md" if (out / "smollm2_rtn_ppl.md").exists() else ""))
    return 0 if all(r["gate_met"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
