"""SmolLM2-135M AWQ (W4A16, symmetric and asymmetric, group 64) quantized with AWQConfig(fold="foldable"),
exported to compressed-tensors (the format vLLM loads) and loaded back: WikiText-2 perplexity against the
issue's gates and the default fold="norms" rows of benchmarks/results/smollm2_ptq_ppl.json.

  PYTHONPATH=. .venv/bin/python benchmarks/awq_ct_export.py     # ~10 min on 2 CPU cores

Setup as benchmarks/ptq_ppl.py (whose model loader it reuses): the embedded SmolLM2-135M-Instruct rounded to
bf16, computed in float32; calibration --calib-size samples (default 32) of 512 tokens, seed 1234, from
../shared/data/wikitext-2/valid.txt, layer by layer; perplexity by jaxq.perplexity over the first 20 windows
of 512 tokens of test.txt. fold "foldable" smooths q/k/v and gate/up (into the RMSNorms) and down_proj (into
up_proj's rows); o_proj is not smoothed (GQA: 9 query heads, 3 KV heads, so v_proj has fewer rows than o_proj
has inputs), only clipped. Each model is exported with jaxq.export(format="compressed-tensors"), loaded back
with jaxq.load (float32) and evaluated again; the loaded model's perplexity is the one gated.
Writes benchmarks/results/smollm2_awq_ct_export.json and .md.
"""

import argparse
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

from ptq_ppl import float32_smollm2  # benchmarks/ is this script's directory, first on sys.path
from smollm2_reference import wikitext

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
GROUP = 64
# variant: (symmetric, gate, the fold="norms" row of smollm2_ptq_ppl.json)
VARIANTS = {"w4a16_awq": (True, 36.9, "w4a16_awq"), "w4a16_awq_asym": (False, 34.3, "w4a16_awq_asym")}


def quantized_linears(model):
    import jax

    from jaxq.nn.quantized_weight import QuantizedWeight

    return [w for w in jax.tree.leaves(model.params, is_leaf=lambda x: isinstance(x, QuantizedWeight))
            if isinstance(w, QuantizedWeight)]


def run_variant(name: str, base, calib: str, test: str, norms_rows: dict, args) -> dict:
    import numpy as np

    import jaxq
    from jaxq.calib import AWQConfig
    from jaxq.io.export.compressed_tensors import AWQ_FOLD

    symmetric, gate, norms_variant = VARIANTS[name]
    recipe = jaxq.get_recipe("w4a16_awq", group_size=GROUP, symmetric=symmetric)
    start = time.perf_counter()
    model, report = jaxq.quantize(base, recipe, calib_data=calib, calib_size=args.calib_size,
                                  calib_seq=args.calib_seq, awq=AWQConfig(fold=AWQ_FOLD), return_report=True,
                                  progress=False)
    seconds = time.perf_counter() - start
    linears = quantized_linears(model)
    kept = sum(w.pre_quant_scale is not None for w in linears)
    ppl_memory = jaxq.perplexity(model, test, 512, args.windows)
    with tempfile.TemporaryDirectory() as tmp:
        out = jaxq.export(model, pathlib.Path(tmp) / name, format="compressed-tensors", progress=False)
        size = sum(f.stat().st_size for f in out.iterdir())
        problems = [str(p) for p in jaxq.check(out)]
        loaded = jaxq.load(out, dtype="float32")
        config = json.loads((out / "config.json").read_text())["quantization_config"]
    ids = np.asarray(loaded.tokenizer(test[:4000]).input_ids[:256], np.int32)[None]
    same_logits = bool(np.array_equal(np.asarray(jaxq.logits(loaded, ids)), np.asarray(jaxq.logits(model, ids))))
    ppl = jaxq.perplexity(loaded, test, 512, args.windows)
    norms = norms_rows.get(norms_variant)
    row = {"variant": name, "recipe": {"name": recipe.name, "group_size": recipe.group_size,
                                       "symmetric": recipe.symmetric, "algorithm": recipe.algorithm},
           "fold": AWQ_FOLD, "quantized_linears": len(linears), "pre_quant_scales_kept": kept,
           "quantize_seconds": seconds, "ppl_in_memory": ppl_memory, "ppl_loaded": ppl,
           "loaded_logits_equal_in_memory": same_logits, "check_problems": problems,
           "ct_format": config["format"], "ct_weights": next(iter(config["config_groups"].values()))["weights"],
           "checkpoint_bytes": size, "gate": gate, "ppl_norms_fold": None if norms is None else norms["ppl"],
           "report": str(report)}
    row["gate_met"] = bool(ppl <= gate and kept == 0 and same_logits and not problems)
    print(f"{name:16s} ppl loaded {ppl:.3f} (in memory {ppl_memory:.3f}, fold norms {row['ppl_norms_fold']})  "
          f"gate {gate}  met {row['gate_met']}  pre_quant_scales {kept}  logits equal {same_logits}  "
          f"{seconds:.0f} s", flush=True)
    return row


def write_markdown(result: dict, path: pathlib.Path) -> None:
    lines = [
        "# SmolLM2-135M-Instruct: AWQ with fold \"foldable\", exported to compressed-tensors and loaded back",
        "",
        f"{result['device']}, jax {result['jax']}, float32 compute (bf16-exact weights); INT4 group {GROUP}; "
        f"calibration {result['calib_size']} x {result['calib_seq']} tokens of WikiText-2 valid.txt (seed 1234), "
        f"layer by layer; perplexity over the first {result['windows']} windows of 512 tokens of test.txt, of the "
        "model jaxq.load reads back from the compressed-tensors export (gated) and of the in-memory one. fold "
        "\"foldable\" (jaxq/calib/awq.py): q/k/v and gate/up smoothing folded into the RMSNorms, down_proj's into "
        "up_proj's rows, o_proj not smoothed (GQA), so no pre_quant_scale is left. \"fold norms\": the default "
        "fold (o_proj/down_proj keep pre_quant_scale, ModelOpt only) from smollm2_ptq_ppl.json, same setup. "
        f"bf16 model {result['ppl_bf16']:.2f}. Rerun: `PYTHONPATH=. .venv/bin/python benchmarks/awq_ct_export.py`.",
        "",
        "| variant | ppl loaded from compressed-tensors | ppl in memory | ppl fold norms | gate | met | "
        "pre_quant_scales | loaded logits = in-memory | quantize s | checkpoint MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        norms = "-" if r["ppl_norms_fold"] is None else f"{r['ppl_norms_fold']:.2f}"
        lines.append(f"| {r['variant']} (group {r['recipe']['group_size']}, "
                     f"{'sym' if r['recipe']['symmetric'] else 'asym'}) | {r['ppl_loaded']:.2f} | "
                     f"{r['ppl_in_memory']:.2f} | {norms} | <= {r['gate']} | {'yes' if r['gate_met'] else 'NO'} | "
                     f"{r['pre_quant_scales_kept']} of {r['quantized_linears']} | "
                     f"{'yes' if r['loaded_logits_equal_in_memory'] else 'NO'} | {r['quantize_seconds']:.0f} | "
                     f"{r['checkpoint_bytes'] / 2**20:.0f} |")
    lines += ["", "The checkpoint holds float32 embeddings (the model's dtype here); its INT4 linears are "
              "compressed-tensors pack-quantized.", "", "## Quantization reports", ""]
    for r in result["rows"]:
        lines += [f"**{r['variant']}**", "```", r["report"], "```"]
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=20, help="perplexity windows of 512 tokens")
    parser.add_argument("--calib-size", type=int, default=32, help="calibration samples")
    parser.add_argument("--calib-seq", type=int, default=512, help="tokens per calibration sample")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    import logging

    import jax

    logging.basicConfig(level=logging.WARNING)
    ptq = json.loads((RESULTS / "smollm2_ptq_ppl.json").read_text())
    norms_rows = {r["variant"]: r for r in ptq["rows"]}
    base = float32_smollm2()
    calib, test = wikitext("valid"), wikitext("test")
    rows = [run_variant(name, base, calib, test, norms_rows, args) for name in VARIANTS]
    result = {"device": f"{jax.devices()[0].device_kind} ({platform.processor() or platform.machine()})",
              "jax": jax.__version__, "windows": args.windows, "calib_size": args.calib_size,
              "calib_seq": args.calib_seq, "ppl_bf16": norms_rows["bf16"]["ppl"], "load_average": os.getloadavg(),
              "rows": rows}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "smollm2_awq_ct_export.json").write_text(json.dumps(result, indent=1))
    write_markdown(result, out / "smollm2_awq_ct_export.md")
    print(f"wrote {out}/smollm2_awq_ct_export.json and .md")
    return 0 if all(r["gate_met"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
