"""The `jaxq` console script: `jaxq generate | quantize | eval | check | bench`.

`bench` says which issue brings it and exits with status 2.

    jaxq generate --model smollm2-135m --prompt "Hello, my name is" --max-new-tokens 32
    jaxq generate --model DIR_OR_GGUF --prompt "a" --prompt "b" --kv-cache fp8 --calib-text valid.txt
    jaxq quantize --model smollm2-135m --quant w4a16_gptq --group-size 64 --calib-data valid.txt \\
                  --calib-size 64 --export-dir OUT --export-format compressed-tensors
    jaxq quantize --model smollm2-135m --quant w4a16_awq --asymmetric --group-size 64 --calib-data valid.txt \\
                  --export-dir OUT --export-format compressed-tensors   # AWQ with fold="foldable" (jaxq/calib/awq.py)
    jaxq eval --model OUT --data test.txt      # perplexity, windows of 512 tokens (jaxq.eval's definition)
    jaxq check CHECKPOINT_DIR      # exit 0 when the checkpoint is good, 1 with every problem listed

Errors a user can fix (a bad recipe for a layer, unusable calibration data, an export format that cannot
hold the recipe) print one line and exit with status 1.
"""

from __future__ import annotations

import argparse
import sys

_NOT_YET = {
    "bench": "benchmarks (see benchmarks/ for scripts)",
}
QUANT_CHOICES = ("fp8", "fp8_rowwise", "fp8_block", "nvfp4", "mxfp4", "w4a16_awq", "w4a8_awq", "w4a16_gptq",
                 "w4a8_gptq")


def _generate(args) -> int:
    import jaxq  # imported here so `jaxq --help` stays fast

    llm = jaxq.LLM(args.model, kv_cache_dtype=args.kv_cache, dtype=args.dtype)
    if args.calib_text:
        with open(args.calib_text, encoding="utf-8") as f:
            llm.calibrate_kv_scales(f.read())
    texts = llm.generate(args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                         chat=args.chat)
    for prompt, text in zip(args.prompt, texts):
        print(f"{prompt}{text}" if len(args.prompt) == 1 else f"--- {prompt!r}\n{prompt}{text}")
    return 0


def _check(args) -> int:
    from jaxq.io.check import check  # not `import jaxq`: checking needs no generation machinery

    problems = check(args.path)
    for problem in problems:
        print(problem)
    print(f"{args.path}: {len(problems)} problem(s)" if problems else f"{args.path}: OK")
    return 1 if problems else 0


def _quantize(args) -> int:
    import logging

    import jaxq

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    overrides = {k: v for k, v in (("symmetric", False if args.asymmetric else None),
                                   ("act_order", True if args.act_order else None)) if v is not None}
    try:
        recipe = jaxq.get_recipe(args.quant, **overrides)
        awq = _awq_config(recipe, args.export_format)
        model = jaxq.load(args.model, dtype=args.dtype)
        quantized, report = jaxq.quantize(
            model, recipe, calib_data=args.calib_data, calib_size=args.calib_size, calib_seq=args.calib_seq,
            calib_field=args.calib_field, calib_seed=args.calib_seed, kv_cache=args.kv_cache,
            group_size=args.group_size, exclude=args.exclude, awq=awq, return_report=True)
        print(report)
        out = jaxq.export(quantized, args.export_dir, format=args.export_format, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as err:
        print(f"jaxq quantize: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.export_format} checkpoint to {out}")
    return 0


def _awq_config(recipe, export_format: str):
    """AWQConfig for the export format: compressed-tensors stores no pre_quant_scale, so AWQ recipes get
    fold="foldable" (jaxq/calib/awq.py), said on stdout; ValueError before any work for a recipe that format
    has no layout for."""
    from jaxq.calib import AWQConfig
    from jaxq.io.export import compressed_tensors

    if export_format != "compressed-tensors":
        return AWQConfig()
    if not compressed_tensors.has_layout(recipe):
        raise ValueError(f"recipe {recipe.name!r} ({recipe.weight_format} weights, activation "
                         f"{recipe.activation!r}) has no compressed-tensors layout; use --export-format modelopt")
    if recipe.algorithm != "awq":
        return AWQConfig()
    fold = compressed_tensors.AWQ_FOLD
    print(f"AWQ fold {fold!r} for compressed-tensors (no pre_quant_scale): the groups whose smoothing folds into "
          "a norm or the producing linear's rows are smoothed, the others (o_proj under GQA) only clipped and "
          "rounded, as llm-compressor does")
    return AWQConfig(fold=fold)


def _eval(args) -> int:
    import jaxq
    from jaxq.calib.data import read_calibration_text

    try:
        model = jaxq.load(args.model, dtype=args.dtype)
        text, what = read_calibration_text(args.data, args.field)
        ppl = jaxq.perplexity(model, text, args.window, args.max_windows, kv_cache_dtype=args.kv_cache)
    except (ValueError, FileNotFoundError) as err:
        print(f"jaxq eval: error: {err}", file=sys.stderr)
        return 1
    limit = f"the first {args.max_windows} " if args.max_windows else ""
    print(f"perplexity {ppl:.4f} over {limit}non-overlapping windows of {args.window} tokens of {what}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxq", description="LLM quantization and inference for JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text from one or more prompts")
    gen.add_argument("--model", required=True,
                     help="HF checkpoint directory, .gguf file, or embedded model name (smollm2-135m, gemma3-270m)")
    gen.add_argument("--prompt", action="append", required=True, help="repeat for a batch of prompts")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--kv-cache", default="bf16", choices=["bf16", "fp32", "fp8"])
    gen.add_argument("--calib-text", help="text file to calibrate FP8 KV scales on (with --kv-cache fp8)")
    gen.add_argument("--dtype", default="bfloat16", help="params and compute dtype")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    gen.set_defaults(run=_generate)
    qnt = sub.add_parser("quantize", help="quantize a model (calibrating where the recipe needs it) and export it")
    qnt.add_argument("--model", required=True, help="HF checkpoint directory, .gguf file, or embedded model name")
    qnt.add_argument("--quant", required=True, choices=QUANT_CHOICES, help="the recipe (jaxq/recipes.py)")
    qnt.add_argument("--kv-cache", choices=["fp8"], help="also calibrate FP8 KV-cache scales")
    qnt.add_argument("--calib-data", help="calibration text or JSONL file (default: the built-in text, "
                     "jaxq/calib/data.py)")
    qnt.add_argument("--calib-field", default="text", help="the JSONL field holding the text")
    qnt.add_argument("--calib-size", type=int, help="calibration samples (default 512, 64 on a CPU)")
    qnt.add_argument("--calib-seq", type=int, default=512, help="tokens per calibration sample")
    qnt.add_argument("--calib-seed", type=int, default=1234, help="seed of the sample choice")
    qnt.add_argument("--group-size", type=int, help="INT4 group size along K (default 128)")
    qnt.add_argument("--asymmetric", action="store_true", help="INT4 with zero points (AutoAWQ / GPTQ asym)")
    qnt.add_argument("--act-order", action="store_true", help="GPTQ act-order with g_idx")
    qnt.add_argument("--exclude", nargs="+", action="extend", default=[], metavar="REGEX",
                     help="module names to keep unquantized (re.search on model.layers.0.mlp.down_proj ...)")
    qnt.add_argument("--export-dir", required=True)
    qnt.add_argument("--export-format", default="modelopt", choices=["modelopt", "compressed-tensors", "jaxq"],
                     help="see jaxq.export; compressed-tensors quantizes AWQ recipes with AWQConfig(fold='foldable')")
    qnt.add_argument("--overwrite", action="store_true", help="replace a non-empty export directory")
    qnt.add_argument("--dtype", default="bfloat16", help="params and compute dtype while quantizing")
    qnt.set_defaults(run=_quantize)
    ev = sub.add_parser("eval", help="perplexity of a model on a text (jaxq/eval.py's definition)")
    ev.add_argument("--model", required=True, help="HF checkpoint directory, .gguf file, or embedded model name")
    ev.add_argument("--data", required=True, help="text or JSONL file")
    ev.add_argument("--field", default="text", help="the JSONL field holding the text")
    ev.add_argument("--window", type=int, default=512, help="tokens per window")
    ev.add_argument("--max-windows", type=int, help="evaluate only the first N windows")
    ev.add_argument("--kv-cache", choices=["bf16", "fp32", "fp8"], help="run through a KV cache of this dtype")
    ev.add_argument("--dtype", default="bfloat16", help="params and compute dtype")
    ev.set_defaults(run=_eval)
    chk = sub.add_parser("check", help="validate a checkpoint directory without running it (what jaxq.load checks)")
    chk.add_argument("path", help="Hugging Face checkpoint directory (plain or pre-quantized)")
    chk.set_defaults(run=_check)
    for name, what in _NOT_YET.items():
        cmd = sub.add_parser(name, help=f"not yet: {what}")
        cmd.set_defaults(run=lambda args, name=name, what=what: _not_yet(name, what))
    return parser


def _not_yet(name: str, what: str) -> int:
    print(f"jaxq {name}: not yet implemented ({what} comes in a later issue)", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
