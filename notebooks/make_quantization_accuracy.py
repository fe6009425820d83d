"""Builds and executes notebooks/quantization_accuracy.ipynb (outputs saved in the file).

The notebook needs nbclient, ipykernel and matplotlib, which jaxq does not depend on: run this script from a
throwaway venv that has them and sees the project, e.g.

  python3 -m venv /tmp/nbvenv && /tmp/nbvenv/bin/pip install nbclient nbformat ipykernel matplotlib
  echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/nbvenv/lib/python3.11/site-packages/jaxq_venv.pth
  /tmp/nbvenv/bin/python notebooks/make_quantization_accuracy.py      # a few minutes on 2 CPU cores

The notebook reads the committed result tables (benchmarks/results/smollm2_rtn_ppl.json: every recipe, round
to nearest; smollm2_ptq_ppl.json: AWQ/GPTQ, when present; llmc_compare.json: llm-compressor, when present)
instead of recomputing them, and runs live only the export round trip and the generated samples.
"""

import pathlib

import nbformat
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parents[1]
OUT = REPO / "notebooks" / "quantization_accuracy.ipynb"

CELLS = [
    ("markdown", """# SmolLM2-135M: accuracy of every jaxq recipe

Perplexity of SmolLM2-135M-Instruct (the embedded GGUF, dequantised to bf16) on WikiText-2 `test.txt` (the first
20 windows of 512 tokens, `jaxq.perplexity`) after quantizing with each jaxq recipe, against the bits each
quantized linear weight costs on disk (codes + scales + zero points). The numbers come from the committed
benchmark results, which record how they were made:

* `benchmarks/results/smollm2_rtn_ppl.json`: every recipe, round to nearest with max-calibrated static scales
  (`benchmarks/recipes_ppl.py`);
* `benchmarks/results/smollm2_ptq_ppl.json`: AWQ and GPTQ (jaxq.calib), when present;
* `benchmarks/results/llmc_compare.json`: llm-compressor's GPTQ and AWQ on the same model, loaded by jaxq
  (`benchmarks/llmcompressor_compare.py`), when present.

Then a live check of the export path: quantize, `jaxq.export` to ModelOpt and compressed-tensors, `jaxq.load`
back, and generate."""),
    ("code", """import json, pathlib
import matplotlib.pyplot as plt
from IPython.display import Markdown, display

RESULTS = pathlib.Path("benchmarks/results")
def read(name):
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None

rtn, ptq, llmc = read("smollm2_rtn_ppl.json"), read("smollm2_ptq_ppl.json"), read("llmc_compare.json")
bf16 = next(r for r in rtn["rows"] if r["variant"] == "bf16")["ppl"]
print({k: v for k, v in rtn.items() if k != "rows"})
print("PTQ results:", "present" if ptq else "absent", "| llm-compressor results:", "present" if llmc else "absent")"""),
    ("markdown", """## Table

`bits/weight` counts what a quantized linear stores per weight: FP8 8 (+ its float32 scales), NVFP4 4 + 8/16,
MXFP4 4 + 8/32, INT4 group 64 with float32 scales 4 + 32/64. llm-compressor stores bf16 INT4 scales
(4 + 16/64) and, asymmetric, a 4-bit zero point per group (+ 4/64). Embeddings (tied with the head) and norms
stay bf16 in every row."""),
    ("code", """rows = [dict(source="jaxq RTN", variant=r["variant"], recipe=r["recipe_text"], kv=r["kv_cache"],
             ppl=r["ppl"], bits=r["bits_per_weight"]) for r in rtn["rows"]]
NOMINAL_BITS = {"fp8": 8.0, "nvfp4": 4 + 8 / 16, "mxfp4": 4 + 8 / 32}
def ptq_bits(r):  # the PTQ table records recipes, not sizes: codes + float32 scales (+ 4-bit zero points)
    recipe = r.get("recipe") or {}
    if recipe.get("weight_format") == "int4":  # groups of the recorded group_size
        group = recipe["group_size"]
        return 4 + 32 / group + (0.0 if recipe.get("symmetric", True) else 4 / group)
    return NOMINAL_BITS.get(recipe.get("weight_format"), 16.0)
if ptq:
    for r in ptq.get("rows", []):
        if r.get("recipe"):
            rows.append(dict(source="jaxq PTQ", variant=r["variant"], recipe=r.get("recipe_text", ""),
                             kv="bf16", ppl=r["ppl"], bits=ptq_bits(r)))
LLMC_BITS = {"gptq": 4 + 16 / 64, "awq": 4 + 16 / 64 + 4 / 64}
if llmc:
    for r in llmc["llmc"]:
        rows.append(dict(source="llm-compressor", variant=f"llmc_{r['job']}_g64", recipe="int4 group 64 / none",
                         kv="bf16", ppl=r["ppl"], bits=LLMC_BITS[r["job"]]))
lines = ["| source | variant | weights / activations | KV | ppl | vs bf16 | bits/weight |", "|---|---|---|---|---|---|---|"]
lines += [f"| {r['source']} | {r['variant']} | {r['recipe']} | {r['kv']} | {r['ppl']:.2f} | {r['ppl'] - bf16:+.2f} | "
          f"{r['bits']:.2f} |" for r in rows]
display(Markdown("\\n".join(lines)))"""),
    ("markdown", "## Perplexity vs bits per weight"),
    ("code", """# Two panels (4-bit and 8-bit recipes), labels spread apart vertically so close points stay readable.
fig, axes = plt.subplots(1, 2, figsize=(12, 5.5), gridspec_kw={"width_ratios": [3, 2]})
markers = {"jaxq RTN": "o", "jaxq PTQ": "s", "llm-compressor": "^"}
for ax, (lo, hi) in zip(axes, [(4.0, 4.8), (7.9, 8.2)]):
    pts = [r for r in rows if r["variant"] != "bf16" and lo <= r["bits"] <= hi]
    for source, marker in markers.items():
        mine = [r for r in pts if r["source"] == source]
        if mine:
            ax.scatter([r["bits"] for r in mine], [r["ppl"] for r in mine], marker=marker, s=50, label=source)
    pts.sort(key=lambda r: r["ppl"])
    ppls = [r["ppl"] for r in pts]
    step = (max(ppls + [bf16]) - min(ppls + [bf16])) / 16
    ys = []
    for p in ppls:  # labels at least `step` apart, each chain of pushed labels centred on its points
        ys.append(max(p, ys[-1] + step) if ys else p)
    i = 0
    while i < len(ys):
        j = i
        while j + 1 < len(ys) and ys[j + 1] - ys[j] <= step * 1.0001:
            j += 1
        shift = (sum(ppls[i:j + 1]) - sum(ys[i:j + 1])) / (j + 1 - i)
        ys[i:j + 1] = [y + shift for y in ys[i:j + 1]]
        i = j + 1
    for r, y in zip(pts, ys):
        label = r["variant"] + (" (PTQ)" if r["source"] == "jaxq PTQ" else "")
        ax.annotate(label, (r["bits"], r["ppl"]), xytext=(r["bits"] + (hi - lo) * 0.06, y), fontsize=7,
                    va="center", arrowprops=dict(arrowstyle="-", color="gray", lw=0.5))
    ax.set_ylim(min(ys + [bf16]) - step, max(ys) + step)
    ax.axhline(bf16, color="gray", linestyle="--", label=f"bf16 ({bf16:.2f}, 16 bits/weight)")
    ax.set_xlim(lo, hi + (hi - lo) * 0.6)
    ax.set_xlabel("bits per quantized linear weight (codes + scales)")
    ax.grid(alpha=0.3)
axes[0].set_ylabel("WikiText-2 perplexity (20 x 512 tokens)")
axes[0].set_title("4-bit recipes")
axes[1].set_title("8-bit recipes")
axes[0].legend(loc="lower right", fontsize=8)
fig.suptitle("SmolLM2-135M-Instruct: perplexity vs bits per weight")
plt.tight_layout()
plt.show()"""),
    ("markdown", """## Generated samples (recorded with the RTN table)

Greedy continuations by `jaxq.generate`, 24 new tokens, from `benchmarks/recipes_ppl.py`'s run."""),
    ("code", """for r in rtn["rows"]:
    if r["variant"] in ("bf16", "fp8+kv_fp8", "nvfp4", "nvfp4_wo", "w4a16_awq_rtn_g64", "w4a16_gptq_rtn_g64"):
        for prompt, text in r["samples"].items():
            print(f"[{r['variant']}] {prompt!r} -> {text!r}")"""),
    ("markdown", """## Live: quantize, export, load back, generate

Two recipes quantized here (round to nearest, 4 windows of 256 calibration tokens), each written by
`jaxq.export` in a checkpoint format other engines read, loaded back with `jaxq.load` (which runs `jaxq check`
first) and compared with the in-memory model: same logits bit for bit, same greedy text."""),
    ("code", """import tempfile, warnings
import numpy as np
import jaxq

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's notebook bar without ipywidgets

model = jaxq.load("smollm2-135m")
calib = pathlib.Path("../shared/data/wikitext-2/valid.txt")
prompts = ["The capital of France is", "Once upon a time, in a small village,"]
work = pathlib.Path(tempfile.mkdtemp())
cases = [("fp8", jaxq.get_recipe("fp8"), "fp8", "modelopt"),
         ("w4a16_gptq_rtn_g64", jaxq.get_recipe("w4a16_gptq", algorithm="max", group_size=64), None,
          "compressed-tensors")]
for name, recipe, kv, fmt in cases:
    q = jaxq.quantize(model, recipe, calib_data=calib, calib_size=4, calib_seq=256, kv_cache=kv, progress=False)
    out = jaxq.export(q, work / name, format=fmt, progress=False)
    loaded = jaxq.load(out)
    ids = q.tokenizer(prompts[0]).input_ids
    same = np.array_equal(np.asarray(jaxq.logits(loaded, ids)), np.asarray(jaxq.logits(q, ids)))
    files = sorted(p.name for p in out.iterdir())
    print(f"{name} -> {fmt}: {files}\\n  jaxq check: {jaxq.check(out) or 'clean'}; logits equal to the in-memory model: {same}")
    for prompt in prompts:
        text = jaxq.generate(loaded, prompt, max_new_tokens=24, kv_cache_dtype=kv or "bf16")
        print(f"  [{name}, loaded from {fmt}] {prompt!r} -> {text!r}")"""),
]


def main() -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "markdown" else nbformat.v4.new_code_cell(src)
                for kind, src in CELLS]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    nbformat.write(nb, OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
