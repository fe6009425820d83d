"""Nsight Compute's view of jaxq's planned kernels: where a kernel's time goes (DRAM, issue slots,
registers, occupancy), which wall or device timings cannot tell.

Run mode: launches each (recipe, shape, M) of the dispatcher's plan once to compile and warm up, then `--calls`
times, printing a label before each launch, for ncu to profile from outside (nothing is timed or checked
here; gemm.py does both):

  ncu --clock-control none -k regex:'gemv|mgpu|w4a|fp8' --csv --page details \\
      --section SpeedOfLight --section ComputeWorkloadAnalysis --section Occupancy --section LaunchStats \\
      --section SchedulerStats --section WarpStateStats --section InstructionStats \\
      python3 benchmarks/ncu_kernels.py --recipes w4a16,nvfp4 --shapes 8b.gate_up,8b.qkv --ms 1 > ncu.csv

Table mode: `python3 benchmarks/ncu_kernels.py --table ncu.csv --out stem` writes stem.json (every metric of
every profiled launch) and stem.md (one row per launch, in launch order, with the run mode's labels):
duration, DRAM throughput, issue slots busy, executed IPC, registers per thread, theoretical / achieved
occupancy, and executed instructions per weight byte (thread-level) where the label names a shape. Labels
pair with launches in order, so filter ncu (-k) to the one kernel each call launches.

SASS mode: the instruction mix of one launch, from ncu's source page (one kernel, -c 1):

  ncu --clock-control none -k regex:gemv -c 1 --section SourceCounters --page source --print-source sass --csv \
      python3 benchmarks/ncu_kernels.py --recipes w4a16 --shapes 8b.gate_up > sass.csv
  python3 benchmarks/ncu_kernels.py --sass "sass.csv=w4a16 8b.gate_up" [--sass ...] --out stem --card ...

writes stem.json / stem.md: per opcode (LOP3, FFMA, ...) the executed warp instructions and thread
instructions per int32 word of weight codes (8 nibbles), one column per CSV, the label naming recipe and
shape first.
"""
import collections
import argparse
import csv
import json
import pathlib
import re
import sys

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import gemm as G  # noqa: E402  (benchmarks/, this script's own folder)

LABEL = re.compile(r"^ncu-label (\S+) (\S+) M=(\d+) call (\S+)$", re.M)
COLUMNS = (("duration us", "Duration"), ("DRAM %", "DRAM Throughput"), ("issue busy %", "Issue Slots Busy"),
           ("IPC", "Executed Ipc Active"), ("regs", "Registers Per Thread"),
           ("occupancy % (theory / achieved)", None), ("no eligible %", "No Eligible"))


def run(recipes: list, shapes: list, ms: list, calls: int) -> None:
    for name in shapes:
        model, layer = name.split(".")
        n, k = G.SHAPES[model][layer]
        for m in ms:
            x = G.rand_x(m, k, seed=n)
            for recipe in recipes:
                w = G.make_weights(recipe, n, k, seed=11)
                op = jax.jit(G.jax_op(recipe))
                print(f"ncu-label {recipe} {name} M={m} call warmup", flush=True)
                jax.block_until_ready(op(x, w))                  # compile + warm-up launch
                for c in range(calls):
                    print(f"ncu-label {recipe} {name} M={m} call {c}", flush=True)
                    jax.block_until_ready(op(x, w))


def _label_text(label: tuple) -> str:
    """A LABEL match (recipe, shape, M, call) as the run mode printed it, less the prefix."""
    return "{} {} M={} call {}".format(*label)


def launches(csv_text: str) -> list:
    """ncu --csv --page details output -> one dict per profiled launch: kernel, grid, block and
    {metric name: (value, unit)}, in ID order. Lines before the CSV header (the program's own output) are
    skipped."""
    lines = csv_text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise ValueError("ncu_kernels --table: no CSV header (a line starting with \"ID\") in the ncu output")
    by_id: dict = {}
    for row in csv.DictReader(lines[start:]):
        if not row.get("ID", "").isdigit():
            continue
        launch = by_id.setdefault(int(row["ID"]), {"kernel": row["Kernel Name"], "grid": row["Grid Size"],
                                                  "block": row["Block Size"], "metrics": {}})
        launch["metrics"][row["Metric Name"]] = (row["Metric Value"], row["Metric Unit"])
    return [by_id[i] for i in sorted(by_id)]


TO_US = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def table(csv_path: str, out_stem: str, unlaunched: str | None = None, card: str = "GPU not named") -> None:
    """Writes out_stem.json / .md from an ncu CSV whose captured stdout holds the run mode's labels (one
    label per launch: the i-th label names the i-th profiled launch when ncu profiled every planned call).
    unlaunched: a regex over labels ("recipe shape M=m call c") of calls that launch no kernel ncu's filter
    takes (e.g. a plan that runs another kernel at that M); those labels are dropped before pairing. card: the
    GPU, named in the markdown's heading (the CSV does not name it)."""
    text = pathlib.Path(csv_path).read_text()
    rows = launches(text)
    labels = [label for label in LABEL.findall(text)
              if not (unlaunched and re.search(unlaunched, _label_text(label)))]
    if labels and len(labels) != len(rows):
        print(f"ncu_kernels: {len(labels)} labelled calls, {len(rows)} profiled launches: rows left unlabelled "
              f"(a call launched more than one kernel, or ncu skipped some)")
        labels = []
    md = [f"# Nsight Compute on {card}: jaxq's planned kernels ({pathlib.Path(csv_path).name})", "",
          "One row per profiled launch (`benchmarks/ncu_kernels.py`); instructions per weight byte are executed "
          "thread instructions over the layer's weight codes.", "",
          "| call | kernel | grid x block | " + " | ".join(c for c, _ in COLUMNS) + " | instructions / weight byte |",
          "|---" * (len(COLUMNS) + 4) + "|"]
    for i, r in enumerate(rows):
        m = r["metrics"]
        get = lambda name: m.get(name, ("n/a", ""))[0]  # noqa: E731
        cells = [get(metric) if metric else f"{get('Theoretical Occupancy')} / {get('Achieved Occupancy')}"
                 for _, metric in COLUMNS]
        if "Duration" in m:
            value, unit = m["Duration"]
            if unit not in TO_US:
                raise ValueError(f"ncu_kernels --table: launch {i} ({r['kernel']}): Duration in unit {unit!r}, "
                                 f"expected one of {sorted(TO_US)}")
            cells[0] = f"{_number(value) * TO_US[unit]:.2f}"
        label = _label_text(labels[i]) if labels else ""
        per_byte = "n/a"
        if labels and "Executed Instructions" in m:
            per_byte = f"{_number(m['Executed Instructions'][0]) * 32 / weight_bytes(*labels[i][:2]):.2f}"
        r["label"] = label
        md.append(f"| {label} | {r['kernel'][:40]} | {r['grid']} x {r['block']} | " + " | ".join(cells)
                  + f" | {per_byte} |")
    pathlib.Path(out_stem + ".json").write_text(json.dumps(rows, indent=1))
    pathlib.Path(out_stem + ".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def sass_mix(csv_text: str) -> tuple:
    """ncu --page source --print-source sass --csv output of one launch -> (kernel name, Counter {opcode:
    executed warp instructions}); the opcode is the SASS mnemonic less its modifiers and predicate."""
    lines = csv_text.splitlines()
    kernel = next((line.split(",")[1].strip('"') for line in lines if line.startswith('"Kernel Name"')), "")
    start = next((i for i, line in enumerate(lines) if line.startswith('"Address"')), None)
    if start is None:
        raise ValueError("ncu_kernels --sass: no source table (a line starting with \"Address\") in the ncu output")
    mix: collections.Counter = collections.Counter()
    for row in csv.DictReader(lines[start:]):
        tokens = (row.get("Source") or "").split()
        executed = (row.get("Instructions Executed") or "").replace(",", "")
        if row.get("Address") == "Address":          # a second launch's table: only the first is read
            break
        if not tokens or not executed.isdigit():
            continue
        opcode = tokens[1] if tokens[0].startswith("@") and len(tokens) > 1 else tokens[0]
        mix[opcode.split(".")[0]] += int(executed)
    return kernel, mix


def sass_table(sources: list, out_stem: str, card: str = "GPU not named", top: int = 16) -> None:
    """sources: (csv path, label "recipe shape [variant]") pairs -> out_stem.json / .md, the opcodes that are
    among the `top` most executed in any source, as thread instructions per int32 word of weight codes."""
    mixes = []
    for path, label in sources:
        kernel, mix = sass_mix(pathlib.Path(path).read_text())
        words = weight_bytes(*label.split()[:2]) / 4
        mixes.append({"label": label, "kernel": kernel, "source": pathlib.Path(path).name,
                      "total_per_word": round(sum(mix.values()) * 32 / words, 2),
                      "per_word": {op: round(c * 32 / words, 2) for op, c in mix.most_common()},
                      "warp_instructions": dict(mix.most_common())})
    ops = []
    for m in mixes:
        ops += [op for op in list(m["per_word"])[:top] if op not in ops]
    md = [f"# SASS instruction mix on {card}", "",
          "Executed thread instructions per int32 word of weight codes (8 four-bit weights), from Nsight Compute's "
          "source page (`benchmarks/ncu_kernels.py --sass`).", "",
          "| opcode | " + " | ".join(m["label"] for m in mixes) + " |", "|---" * (len(mixes) + 1) + "|",
          "| all | " + " | ".join(str(m["total_per_word"]) for m in mixes) + " |"]
    md += [f"| {op} | " + " | ".join(str(m["per_word"].get(op, 0)) for m in mixes) + " |" for op in ops]
    pathlib.Path(out_stem + ".json").write_text(json.dumps(mixes, indent=1))
    pathlib.Path(out_stem + ".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def weight_bytes(recipe: str, shape: str) -> float:
    """Bytes of a layer's weight codes (4-bit: N * K / 2; FP8: N * K; bf16: 2 N K), scales left out."""
    model, layer = shape.split(".")
    n, k = G.SHAPES[model][layer]
    return n * k * (1 if recipe.startswith("fp8") else 2 if recipe == "xla_bf16" else 0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="w4a16")
    parser.add_argument("--shapes", default="8b.gate_up")
    parser.add_argument("--ms", default="1")
    parser.add_argument("--calls", type=int, default=1)
    parser.add_argument("--table", help="an ncu --csv --page details output to tabulate (table mode)")
    parser.add_argument("--out", default="ncu_kernels", help="table mode: the output stem")
    parser.add_argument("--card", default="GPU not named", help="table mode: the GPU, for the heading")
    parser.add_argument("--unlaunched", help="table mode: regex of labels whose calls launch no profiled kernel")
    parser.add_argument("--sass", action="append", default=[],
                        help="SASS mode: 'CSV=recipe shape [variant]' (repeat for columns)")
    args = parser.parse_args()
    if args.sass:
        sass_table([tuple(v.split("=", 1)) for v in args.sass], args.out, args.card)
    elif args.table:
        table(args.table, args.out, args.unlaunched, args.card)
    else:
        run(args.recipes.split(","), args.shapes.split(","), [int(m) for m in args.ms.split(",")], args.calls)


if __name__ == "__main__":
    main()
