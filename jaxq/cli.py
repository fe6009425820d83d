"""The `jaxq` console script: `jaxq generate | quantize | eval | check | bench`.

`generate` and `check` work so far; the others say which issue brings them and exit with status 2.

    jaxq generate --model smollm2-135m --prompt "Hello, my name is" --max-new-tokens 32
    jaxq generate --model DIR_OR_GGUF --prompt "a" --prompt "b" --kv-cache fp8 --calib-text valid.txt
    jaxq check CHECKPOINT_DIR      # exit 0 when the checkpoint is good, 1 with every problem listed
"""

from __future__ import annotations

import argparse
import sys

_NOT_YET = {
    "quantize": "quantization recipes and export",
    "eval": "evaluation beyond jaxq.perplexity",
    "bench": "benchmarks (see benchmarks/ for scripts)",
}


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
