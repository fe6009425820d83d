"""jaxq: LLM quantization for JAX (FP8, NVFP4, MXFP4, INT4) with Pallas kernels for Hopper GPUs.

Public API (see design.md, "The user's API"):
    load(path, dtype)                        -> LoadedModel (HF directory, .gguf file, or embedded model name)
    generate(model, prompt, ...)             -> str | list[str] (or token ids for token-id prompts)
    logits(model, token_ids)                 -> float32 [batch, seq, vocab]
    perplexity(model, text, window=512)      -> float
    calibrate_kv_scales(model, text)         -> LoadedModel with FP8 KV-cache scales
    LLM(path, kv_cache_dtype="bf16")         -> .generate(prompts, max_new_tokens, temperature, ...)
    check(path)                              -> list[Problem] of a checkpoint directory ([] = good; load runs it)
"""

__version__ = "0.1.0"

from jaxq.api import LLM, generate, logits
from jaxq.eval import perplexity
from jaxq.io.check import check
from jaxq.kv_scales import calibrate_kv_scales
from jaxq.loaded_model import LoadedModel, load

__all__ = ["LLM", "LoadedModel", "calibrate_kv_scales", "check", "generate", "load", "logits", "perplexity"]
# Later issues add quantize, export and save here.
