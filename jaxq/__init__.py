"""jaxq: LLM quantization for JAX (FP8, NVFP4, MXFP4, INT4) with Pallas kernels for Hopper GPUs.

Public API (see design.md, "The user's API"):
    load(path, dtype)                        -> LoadedModel (HF directory, .gguf file, or embedded model name)
    generate(model, prompt, ...)             -> str | list[str] (or token ids for token-id prompts)
    logits(model, token_ids)                 -> float32 [batch, seq, vocab]
    perplexity(model, text, window=512)      -> float
    calibrate_kv_scales(model, text)         -> LoadedModel with FP8 KV-cache scales
    LLM(path, kv_cache_dtype="bf16")         -> .generate(prompts, max_new_tokens, temperature, ...)
    check(path)                              -> list[Problem] of a checkpoint directory ([] = good; load runs it)
    quantize(model, recipe, calib_data=...)  -> LoadedModel with QuantizedWeight linears (jaxq/quantize/)
    save(model, directory)                   -> native orbax checkpoint; load(directory) restores it
    export(model, out_dir, format)           -> a ModelOpt / compressed-tensors / plain HF / native checkpoint
    get_recipe(name, **overrides), Recipe, QuantConfig: what quantize takes (jaxq/recipes.py)
"""

__version__ = "0.1.0"

from jaxq.api import LLM, generate, logits
from jaxq.eval import perplexity
from jaxq.io.check import check
from jaxq.io.export import export
from jaxq.io.native import save
from jaxq.kv_scales import calibrate_kv_scales
from jaxq.loaded_model import LoadedModel, load
from jaxq.quantize import quantize
from jaxq.recipes import QuantConfig, Recipe, get_recipe

__all__ = ["LLM", "LoadedModel", "QuantConfig", "Recipe", "calibrate_kv_scales", "check", "export", "generate",
           "get_recipe", "load", "logits", "perplexity", "quantize", "save"]
