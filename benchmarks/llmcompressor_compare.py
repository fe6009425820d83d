"""llm-compressor next to jaxq on SmolLM2-135M-Instruct: GPTQ W4A16 (symmetric) and AWQ W4A16_ASYM, group 64,
the same bf16 model, the same calibration tokens and the same evaluation; prints both tables.

  PYTHONPATH=. .venv/bin/python benchmarks/llmcompressor_compare.py              # about 75 min on 2 CPU cores
  PYTHONPATH=. .venv/bin/python benchmarks/llmcompressor_compare.py --jobs gptq --calib-size 8   # smoke run

Steps (each skipped when its output already sits in --work, default ~/.cache/jaxq-llmc-compare):
 1. jaxq: the embedded SmolLM2-135M-Instruct GGUF (Q4_1, dequantised, rounded to bf16) written as a plain HF
    checkpoint with jaxq.export(format="hf"); the calibration windows jaxq's PTQ uses
    (jaxq.calib.data.calibration_tokens over WikiText-2 valid.txt: --calib-size seeded windows of --calib-seq
    tokens) saved as token ids, so both tools see exactly the same tokens.
 2. llm-compressor, in its own venv (--venv, default ~/.cache/jaxq-llmc-venv, created on first use with the
    pins below; llm-compressor is never a jaxq dependency): oneshot on those windows, calibrating in float32
    (bf16-exact weights, fast on CPUs), then saved compressed in bf16 as llm-compressor's examples do.
    GPTQ: GPTQModifier, symmetric int4, group 64. AWQ: AWQModifier + QuantizationModifier, asymmetric int4,
    group 64 (SmolLM2's hidden size 576 is not a multiple of 128, so neither tool can use groups of 128).
 3. jaxq: each llm-compressor checkpoint loaded through jaxq's compressed-tensors loader (jaxq.load, checked
    first), perplexity on the first --windows windows of 512 tokens of test.txt (jaxq.perplexity) in --dtype
    compute, next to the bf16 model and jaxq's own rows from benchmarks/results/smollm2_ptq_ppl.json (PTQ) and
    smollm2_rtn_ppl.json (round to nearest) when present.
Writes benchmarks/results/llmc_compare.json and llmc_compare.md (the printed tables).
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext-2"
RESULTS = REPO / "benchmarks" / "results"
TORCH_PIN = "torch==2.13.0"  # the CPU wheel; as ../shared/tools/build_fixtures.py
PINS = ["transformers==5.17.0", "accelerate==1.15.0", "safetensors==0.8.0", "numpy==2.4.6", "datasets",
        "llmcompressor==0.14.0.1", "compressed-tensors==0.19.0"]
GROUP_SIZE = 64
JOBS = {
    "gptq": "GPTQModifier, int4 symmetric, group 64 (W4A16)",
    "awq": "AWQModifier + QuantizationModifier, int4 asymmetric, group 64 (W4A16_ASYM)",
}


# ----------------------------------------------------------------------------- llm-compressor side (its venv)
def llmc_job(job: str, work: pathlib.Path) -> None:
    """Runs inside the llm-compressor venv: quantize work/base with `job` on work/calib.json, save to work/job."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    windows = json.loads((work / "calib.json").read_text())
    base = work / "base"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()

    def group(symmetric):
        return {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": GROUP_SIZE,
            "dynamic": False, "observer": "minmax"}}}

    if job == "gptq":
        recipe = GPTQModifier(config_groups=group(True), ignore=["lm_head"])
    else:
        from llmcompressor.modifiers.transform.awq import AWQModifier

        recipe = [AWQModifier(), QuantizationModifier(config_groups=group(False), ignore=["lm_head"])]
    if not torch.cuda.is_available():
        # llmcompressor 0.14's AWQ pins cached activations, which raises without an accelerator; pinning only
        # speeds up host-to-device copies (the same workaround as ../shared/tools/build_fixtures.py).
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *a, **k: None
    seq = len(windows[0])
    dataset = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * seq for _ in windows]})
    start = time.perf_counter()
    oneshot(model=model, recipe=recipe, dataset=dataset, num_calibration_samples=len(windows),
            max_seq_length=seq, shuffle_calibration_samples=False)
    seconds = time.perf_counter() - start
    model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    out = work / job
    model.save_pretrained(out, save_compressed=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    for name in ("generation_config.json",):
        if (base / name).exists() and not (out / name).exists():
            (out / name).write_bytes((base / name).read_bytes())
    import importlib.metadata as md

    info = {"job": job, "recipe": repr(recipe), "calibrate_seconds": seconds,
            "versions": {p: md.version(p) for p in ("torch", "transformers", "llmcompressor", "compressed-tensors")}}
    (out / "llmc_info.json").write_text(json.dumps(info, indent=1))
    print(f"[{job}] oneshot {seconds:.0f} s -> {out}", flush=True)


def ensure_venv(venv: pathlib.Path) -> pathlib.Path:
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating the llm-compressor venv {venv} (once; a few minutes)", flush=True)
        subprocess.check_call([sys.executable, "-m", "venv", str(venv)])
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.check_call(pip + [TORCH_PIN])  # first, so the pins below keep this CPU build
        subprocess.check_call(pip + PINS)
    return python


# ----------------------------------------------------------------------------- jaxq side
def prepare(work: pathlib.Path, args) -> dict:
    """The bf16 HF checkpoint and the calibration windows (step 1)."""
    import jaxq
    from jaxq.calib.data import calibration_tokens

    model = jaxq.load("smollm2-135m")
    if not (work / "base" / "config.json").exists():
        jaxq.export(model, work / "base", format="hf", overwrite=True)
    windows = calibration_tokens(model, DATA / "valid.txt", num_samples=args.calib_size, seq_len=args.calib_seq)
    (work / "calib.json").write_text(json.dumps(windows.tolist()))
    return {"calib_windows": int(len(windows)), "calib_seq": int(windows.shape[1]), "calib_source": "valid.txt"}


def evaluate(path, args) -> float:
    import jaxq

    model = jaxq.load(path, dtype=args.dtype)
    return jaxq.perplexity(model, (DATA / "test.txt").read_text(encoding="utf-8"), 512, args.windows)


def checkpoint_mb(path: pathlib.Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20


def jaxq_rows(name: str) -> list[dict]:
    """The W4A16 INT4 rows (what llm-compressor ran here) of one of jaxq's own result files, [] when absent."""
    path = RESULTS / name
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    source = f"{name} (calibration {data.get('calib_size')} x {data.get('calib_seq')})"
    w4a16 = lambda text: text.startswith("int4") and "/ none" in text
    return [{"source": source, "variant": r["variant"], "ppl": r["ppl"], "recipe": r.get("recipe_text", "")}
            for r in data["rows"] if w4a16(r.get("recipe_text", ""))]


def markdown(result: dict) -> str:
    lines = [
        "# llm-compressor vs jaxq on SmolLM2-135M-Instruct (W4A16, group 64)",
        "",
        f"Same bf16 model (the embedded GGUF via jaxq.export format='hf'), same calibration tokens "
        f"({result['calib_windows']} x {result['calib_seq']} tokens of WikiText-2 valid.txt, jaxq's seeded windows), "
        f"same evaluation: jaxq.perplexity over the first {result['windows']} windows of 512 tokens of test.txt, "
        f"compute dtype {result['dtype']}. llm-compressor {result['llmc_versions'].get('llmcompressor')}, "
        f"compressed-tensors {result['llmc_versions'].get('compressed-tensors')}, torch "
        f"{result['llmc_versions'].get('torch')} (CPU, its own venv); its checkpoints load through jaxq's "
        "compressed-tensors loader. Rerun: `PYTHONPATH=. .venv/bin/python benchmarks/llmcompressor_compare.py`.",
        "",
        "## llm-compressor",
        "",
        "| job | recipe | ppl | vs bf16 | oneshot s | checkpoint MiB |",
        "|---|---|---|---|---|---|",
        f"| bf16 | - | {result['bf16_ppl']:.3f} | - | - | {result['bf16_mb']:.1f} |",
    ]
    for r in result["llmc"]:
        lines.append(f"| {r['job']} | {JOBS[r['job']]} | {r['ppl']:.3f} | {r['ppl'] - result['bf16_ppl']:+.3f} | "
                     f"{r['calibrate_seconds']:.0f} | {r['mb']:.1f} |")
    missing = sorted(set(JOBS) - {r["job"] for r in result["llmc"]})
    if missing:
        lines += ["", f"Not in this run: {', '.join(missing)} (rerun with --jobs {','.join(JOBS)}; finished jobs are "
                      "reused from --work)."]
    lines += ["", "## jaxq", ""]
    if result["jaxq"]:
        lines += ["W4A16 INT4 rows of jaxq's own tables (their calibration is recorded in each file).", "",
                  "| source | variant | recipe | ppl | vs bf16 |", "|---|---|---|---|---|"]
        lines += [f"| {r['source']} | {r['variant']} | {r['recipe']} | {r['ppl']:.3f} | "
                  f"{r['ppl'] - result['bf16_ppl']:+.3f} |" for r in result["jaxq"]]
    else:
        lines.append("No jaxq result files yet (benchmarks/results/smollm2_ptq_ppl.json, smollm2_rtn_ppl.json).")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=os.path.expanduser("~/.cache/jaxq-llmc-compare"))
    parser.add_argument("--venv", default=os.path.expanduser("~/.cache/jaxq-llmc-venv"))
    parser.add_argument("--jobs", default="gptq,awq")
    parser.add_argument("--calib-size", type=int, default=16)
    parser.add_argument("--calib-seq", type=int, default=512)
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--llmc-job", help=argparse.SUPPRESS)  # internal: run one job inside the llmc venv
    args = parser.parse_args()
    work = pathlib.Path(args.work)
    if args.llmc_job:
        llmc_job(args.llmc_job, work)
        return 0
    jobs = [j for j in args.jobs.split(",") if j]
    if set(jobs) - set(JOBS):
        parser.error(f"unknown jobs {sorted(set(jobs) - set(JOBS))}; known: {sorted(JOBS)}")
    work.mkdir(parents=True, exist_ok=True)
    result = {"windows": args.windows, "dtype": args.dtype, "group_size": GROUP_SIZE, **prepare(work, args)}
    python = ensure_venv(pathlib.Path(args.venv))
    rows = []
    for job in jobs:
        if not (work / job / "llmc_info.json").exists():
            subprocess.check_call([str(python), __file__, "--work", str(work), "--llmc-job", job])
        info = json.loads((work / job / "llmc_info.json").read_text())
        rows.append({"job": job, "ppl": evaluate(work / job, args), "calibrate_seconds": info["calibrate_seconds"],
                     "mb": checkpoint_mb(work / job), "recipe": info["recipe"]})
        result["llmc_versions"] = info["versions"]
        print(f"{job}: ppl {rows[-1]['ppl']:.3f}", flush=True)
    result.update(llmc=rows, bf16_ppl=evaluate(work / "base", args), bf16_mb=checkpoint_mb(work / "base"),
                  jaxq=jaxq_rows("smollm2_ptq_ppl.json") + jaxq_rows("smollm2_rtn_ppl.json"))
    out = pathlib.Path(args.out)
    (out / "llmc_compare.json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    (out / "llmc_compare.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
