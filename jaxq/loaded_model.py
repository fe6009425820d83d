"""`LoadedModel`, what `jaxq.load` returns, and `load` itself: one object that carries everything generation,
evaluation and (later) quantization need, so the public functions take a single argument.

    model = jaxq.load("smollm2-135m")            # an embedded model name
    model = jaxq.load("path/to/hf_checkpoint")   # a directory with config.json + safetensors, plain or
                                                 # pre-quantized (ModelOpt, compressed-tensors, AutoAWQ, GPTQ, FP8)
    model = jaxq.load("path/to/model.gguf")      # a GGUF file, or a directory holding exactly one
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any

import jax
import jax.numpy as jnp

from jaxq.io import check, gguf_checkpoint, hf_checkpoint, model_cache
from models.registry import ModelFamily, get_model_family


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model ready to run.

    params: the params pytree (HF names, see models/hf_interop.py), in `dtype`.
    config: the family's frozen config (models/<family>.py); hf_config: the config.json dict it came from.
    module: the Flax module, `module.apply({"params": params}, tokens, cache=..., ...)` (jaxq/nn/decoder.py).
    tokenizer: a transformers tokenizer, or None (random-weight models): then only token ids work.
    eos_token_ids: generation stops on any of them. pad_token_id: filler for right-padded prompts.
    kv_scales: (k_scale [L], v_scale [L]) float32 FP8 KV dequant multipliers (ModelOpt's amax / 448), from the
      checkpoint or `jaxq.calibrate_kv_scales`; None when unknown (an FP8 cache then uses 1.0 and warns).
    quantization: the weight quantization the params carry (a jaxq.recipes.QuantConfig for a pre-quantized
      checkpoint: which module has which recipe); None for unquantized params.
    source: where the model came from (for messages).
    kernel_rows: whether run_params carries the GPU kernels' scale rows (True: faster calls for the memory of
      a second copy of the W4A16 / W4A8 scales, 1/32 of the packed weights for bf16 scales of groups of 128,
      1/8 for groups of 32, twice that with zero points; `model.replace(kernel_rows=False)` runs params as
      they are).
    """

    params: Any
    config: Any
    hf_config: dict
    family: ModelFamily
    module: Any
    tokenizer: Any
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    dtype: Any
    kv_scales: tuple[jax.Array, jax.Array] | None = None
    quantization: Any = None
    source: str = ""
    kernel_rows: bool = True

    @property
    def max_positions(self) -> int:
        """The longest sequence (prompt + generated tokens) the model's positions allow."""
        return int(self.config.max_position_embeddings)

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @functools.cached_property
    def run_params(self) -> Any:
        """params as generation, serving and evaluation run them: on a Hopper GPU the W4A16 / W4A8 weights
        also carry their kernels' scale rows (jaxq.nn.kernel_dispatch.with_kernel_rows), built on first use
        and kept; elsewhere, or with kernel_rows False, params itself. Save and quantize read params."""
        from jaxq.nn.kernel_dispatch import with_kernel_rows

        return with_kernel_rows(self.params) if self.kernel_rows else self.params

    def replace(self, **changes) -> "LoadedModel":
        return dataclasses.replace(self, **changes)


def from_params(family: ModelFamily, config, params, hf_config: dict, *, tokenizer=None,
                eos_token_ids=(), pad_token_id=None, source="<params>") -> LoadedModel:
    """A LoadedModel around params already in memory (random weights in tests and benchmarks, converters).

    eos_token_ids default to hf_config's eos_token_id (int or list); pad_token_id to hf_config's, else the
    first eos id, else 0. The dtype is read from the params' embedding table.
    """
    if not eos_token_ids:
        eos = hf_config.get("eos_token_id")
        eos_token_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
    if pad_token_id is None:
        pad_token_id = hf_config.get("pad_token_id")
    if pad_token_id is None:
        pad_token_id = eos_token_ids[0] if eos_token_ids else 0
    dtype = params["model"]["embed_tokens"]["weight"].dtype
    return LoadedModel(
        params=params, config=config, hf_config=hf_config, family=family, module=family.module_class(config),
        tokenizer=tokenizer, eos_token_ids=tuple(int(i) for i in eos_token_ids), pad_token_id=int(pad_token_id),
        dtype=jnp.dtype(dtype), source=source,
    )


def random_model(hf_config: dict, dtype: Any = "bfloat16", seed: int = 0) -> LoadedModel:
    """A model of hf_config's architecture and sizes with random weights (the family's own initialisers),
    created directly in dtype on the default device: for tests and for benchmarks of real shapes
    (Llama-3.1-8B-sized params need 16 GB in bf16). No tokenizer: prompts must be token ids."""
    family = get_model_family(hf_config["architectures"])
    config = family.config_class.from_hf_config(hf_config)
    module = family.module_class(config)
    init = jax.jit(lambda key: jax.tree.map(lambda p: p.astype(dtype),
                                            module.init(key, jnp.zeros((1, 1), jnp.int32))["params"]))
    return from_params(family, config, init(jax.random.key(seed)), hf_config, source=f"<random {family.name}>")


def load(path: str | pathlib.Path, dtype: Any = "bfloat16") -> LoadedModel:
    """Load a model for generation and evaluation.

    path: an embedded model name (`jaxq.io.model_cache.EMBEDDED_MODELS`: "smollm2-135m", "gemma3-270m";
      fetched on first use), a Hugging Face checkpoint directory (config.json + safetensors), a .gguf file
      or a directory that holds exactly one .gguf file. A checkpoint directory is validated first, as
      `jaxq check` does (jaxq.io.check), and refused with every problem listed (CheckpointError); a
      pre-quantized one loads its quantized linears as QuantizedWeight params and its FP8 KV scales.
      A directory written by `jaxq.save` (jaxq.io.native) restores exactly what was saved.
    dtype: the params' and compute dtype ("bfloat16", "float32", ...). GGUF weights are dequantised into it;
      quantized weights keep their formats.
    """
    dtype = jnp.dtype(dtype)
    if isinstance(path, str) and path in model_cache.EMBEDDED_MODELS:
        return _load_gguf(model_cache.embedded_model_path(path), dtype)
    path = pathlib.Path(path)
    from jaxq.io import native  # here: native builds on this module

    if native.is_native(path):
        return native.load(path, dtype)
    if path.is_dir() and (path / "config.json").exists():
        return _load_hf(path, dtype)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _load_gguf(ggufs[0], dtype)
        if len(ggufs) > 1:
            raise ValueError(f"{path} holds {len(ggufs)} GGUF files {[g.name for g in ggufs]}; pass one file")
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, dtype)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist and is not an embedded model name ({sorted(model_cache.EMBEDDED_MODELS)})"
        )
    raise ValueError(
        f"{path}: not a checkpoint jaxq can load; pass a directory with config.json + *.safetensors, a .gguf "
        f"file, or one of {sorted(model_cache.EMBEDDED_MODELS)}"
    )


def _load_gguf(path: pathlib.Path, dtype) -> LoadedModel:
    family, config, params, hf_config, eos_ids = gguf_checkpoint.load_gguf_params(path, dtype)
    tokenizer = gguf_checkpoint.load_gguf_tokenizer(path)
    return from_params(family, config, params, hf_config, tokenizer=tokenizer, eos_token_ids=eos_ids,
                       source=str(path))


def _load_hf(path: pathlib.Path, dtype) -> LoadedModel:
    from transformers import AutoTokenizer, GenerationConfig

    inspection = check.inspect_checkpoint(path)
    if inspection.problems:
        raise check.CheckpointError(path, inspection.problems)
    plan = inspection.plan
    family, config, params = hf_checkpoint.load_hf_params(path, dtype, modules=plan)
    hf_config = hf_checkpoint.read_hf_config(path)
    has_tokenizer = any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False) if has_tokenizer else None
    eos_ids = ()
    if (path / "generation_config.json").exists():  # chat models list their end-of-turn ids here
        eos = GenerationConfig.from_pretrained(path).eos_token_id
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
    model = from_params(family, config, params, hf_config, tokenizer=tokenizer, eos_token_ids=eos_ids,
                        source=str(path))
    return model if plan is None else model.replace(kv_scales=plan.kv_scales(), quantization=plan.quant_config())
