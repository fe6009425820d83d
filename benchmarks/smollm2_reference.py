"""SmolLM2-135M (the embedded GGUF) in jaxq against transformers: greedy text and WikiText-2 perplexity.

  PYTHONPATH=. python benchmarks/smollm2_reference.py                # first 64 windows of 512 tokens
  PYTHONPATH=. python benchmarks/smollm2_reference.py --windows 8

Perplexity (jaxq/eval.py's definition): tokens of ../shared/data/wikitext-2/test.txt without special tokens,
non-overlapping windows of 512 from the start, each window predicting its own next tokens. Rows: transformers
float32, jaxq float32, jaxq bf16 with a bf16 KV cache and with an FP8 KV cache (scales calibrated on 8
windows of valid.txt). Writes benchmarks/results/smollm2_reference_<device>.json and .md.

The transformers functions here are also the slow tests' reference (tests/test_api_smollm2.py). The model is
assembled from transformers' own GGUF reader (config, tensor renaming, de-permutation) rather than
`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`, which additionally demands the `accelerate`
package that jaxq does not depend on; the weights are the same.
"""

import argparse
import json
import math
import pathlib
import platform
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext-2"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


def wikitext(split: str) -> str:
    """../shared/data/wikitext-2/<split>.txt, relative to the repository root; FileNotFoundError if absent."""
    path = DATA / f"{split}.txt"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the shared data directory must sit next to the repository")
    return path.read_text(encoding="utf-8")


def hf_gguf_model(gguf_path):
    """transformers' float32 causal LM built from a GGUF file by transformers' own GGUF loader."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf_path = pathlib.Path(gguf_path)
    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"transformers GGUF load: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_token_ids) -> list[int]:
    """transformers greedy continuation (stopping on eos, which it includes), as new token ids."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=list(eos_token_ids), pad_token_id=eos_token_ids[0])
    return out[0, len(prompt_ids):].tolist()


def hf_perplexity(model, windows: np.ndarray) -> float:
    """exp(mean NLL) over windows [N, W] (each predicts its own tokens 1..W-1), float64 accumulation."""
    import torch

    total = 0.0
    with torch.no_grad():
        for row in windows:
            ids = torch.tensor(row[None], dtype=torch.long)
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            total -= logp.gather(-1, ids[0, 1:, None]).sum().item()
    return math.exp(total / (windows.shape[0] * (windows.shape[1] - 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()

    import jax

    import jaxq
    from jaxq.eval import text_token_ids, token_windows
    from jaxq.io.model_cache import embedded_model_path

    path = embedded_model_path("smollm2-135m")
    f32 = jaxq.load(path, dtype="float32")
    windows = token_windows(text_token_ids(f32, wikitext("test")), args.window, args.windows)
    hf = hf_gguf_model(path)

    rows = []

    def row(name, fn):
        start = time.perf_counter()
        ppl = fn()
        rows.append({"model": name, "perplexity": ppl, "seconds": time.perf_counter() - start})
        print(f"{name:40s} ppl {ppl:.4f}  ({rows[-1]['seconds']:.0f} s)", flush=True)

    row("transformers float32", lambda: hf_perplexity(hf, windows))
    row("jaxq float32", lambda: jaxq.perplexity(f32, windows.ravel(), args.window))
    bf16 = jaxq.load(path, dtype="bfloat16")
    row("jaxq bf16, bf16 KV cache", lambda: jaxq.perplexity(bf16, windows.ravel(), args.window, kv_cache_dtype="bf16"))
    fp8 = jaxq.calibrate_kv_scales(bf16, wikitext("valid"), window=args.window, max_windows=8)
    row("jaxq bf16, fp8 KV cache (calibrated)",
        lambda: jaxq.perplexity(fp8, windows.ravel(), args.window, kv_cache_dtype="fp8"))

    greedy = []
    for prompt in PROMPTS:
        ids = f32.tokenizer(prompt).input_ids
        ours = jaxq.generate(f32, ids, max_new_tokens=32, kv_cache_dtype="fp32")
        theirs = hf_greedy(hf, ids, 32, f32.eos_token_ids)
        greedy.append({"prompt": prompt, "identical": ours == theirs, "jaxq": f32.tokenizer.decode(ours),
                       "transformers": f32.tokenizer.decode(theirs)})
        print(f"greedy 32 tokens identical: {ours == theirs}  {prompt!r}")

    device = f"{jax.devices()[0].device_kind} ({platform.processor() or platform.machine()})"
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = jax.devices()[0].platform
    result = {"device": device, "jax": jax.__version__, "window": args.window, "windows": int(windows.shape[0]),
              "perplexity": rows, "greedy": greedy}
    (out / f"smollm2_reference_{tag}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# SmolLM2-135M-Instruct (GGUF Q4_1, dequantised): jaxq vs transformers",
             f"device: {device}, jax {jax.__version__}; WikiText-2 test, {windows.shape[0]} windows of "
             f"{args.window} tokens", "", "| model | perplexity |", "|---|---|"]
    lines += [f"| {r['model']} | {r['perplexity']:.4f} |" for r in rows]
    lines += ["", "| prompt | greedy 32 tokens identical |", "|---|---|"]
    lines += [f"| {g['prompt']!r} | {g['identical']} |" for g in greedy]
    (out / f"smollm2_reference_{tag}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}/smollm2_reference_{tag}.json and .md")


if __name__ == "__main__":
    sys.exit(main())
