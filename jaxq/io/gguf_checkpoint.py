"""GGUF (llama.cpp) checkpoints -> an HF-style config and HF-named float tensors -> jaxq params.

A GGUF file carries the model's hyper-parameters as `<arch>.*` metadata, the tokenizer as
`tokenizer.ggml.*` metadata, and block-quantised tensors under llama.cpp names. This module:

1. turns the metadata into the dict an HF `config.json` would hold (`gguf_hf_config`);
2. dequantises every tensor to float32 with `gguf.quants.dequantize` and renames it to its HF name,
   undoing the two changes llama.cpp's converter makes to the HF weights (`gguf_hf_tensors`):
   * Llama: the rows of q_proj / k_proj are permuted per head from HF's rotate-half RoPE layout to
     llama.cpp's interleaved-pair layout; we permute them back.
   * Gemma 3: every RMSNorm weight is stored as `1 + w` (HF keeps `w` and computes `x * (1 + w)`);
     we subtract the 1 again.
3. feeds those HF tensors, one at a time, to the model family's own HF -> params builder
   (`load_gguf_params`), so each model has a single name map and the host never holds the whole
   dequantised model.

The weights arrive dequantised (bf16 by default): GGUF's block formats are a storage format here,
not a jaxq recipe.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import tempfile

import jax.numpy as jnp
import numpy as np

from jaxq.io import model_cache
from models.hf_interop import ParamsBuilder, default_convert, expected_shapes
from models.registry import get_model_family

# GGUF architecture -> (HF `architectures` entry, HF `model_type`).
_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
}

# Per-block GGUF tensor name -> HF name below `model.layers.N.`; `ffn_norm` is the norm before the
# MLP, which Llama calls post_attention_layernorm and Gemma 3 pre_feedforward_layernorm.
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_NAMES_BY_ARCH = {
    "llama": {**_BLOCK_NAMES, "ffn_norm": "post_attention_layernorm"},
    "gemma3": {
        **_BLOCK_NAMES,
        "ffn_norm": "pre_feedforward_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
    },
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def _reader(path):
    import gguf  # optional at import time: only GGUF loading needs it

    return gguf.GGUFReader(str(path))


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _architecture(reader, path) -> str:
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported; jaxq reads {sorted(_ARCHITECTURES)}."
        )
    return arch


def gguf_hf_config(reader, path="<gguf>") -> dict:
    """The HF config.json dict equivalent to a GGUF file's metadata (Llama or Gemma 3).

    Fields a GGUF may lack take the value llama.cpp itself assumes (Gemma 3: local RoPE base 10000, every
    sixth layer global, query scale 1/sqrt(head_dim), except 1/sqrt(hidden/heads) for the 62-layer 27B model).
    """
    arch = _architecture(reader, path)
    hf_arch, model_type = _ARCHITECTURES[arch]

    def get(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    def need(key):
        value = get(key)
        if value is None:
            raise ValueError(f"{path}: GGUF metadata lacks {arch}.{key}; the file is incomplete or not a "
                             f"llama.cpp model file")
        return value

    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise NotImplementedError(
            f"{path}: the GGUF stores per-frequency RoPE factors (rope_freqs.weight, e.g. Llama 3.1 "
            f"scaling); jaxq does not map them to an HF rope_scaling yet. Load the HF checkpoint instead."
        )
    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    layers = int(need("block_count"))
    head_dim = int(get("attention.key_length", get("rope.dimension_count", hidden // heads)))
    vocab = get("vocab_size")
    if vocab is None:  # absent from many GGUFs: the tokenizer's size is the embedding's row count
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    config = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(need("context_length")),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "rope_scaling": _rope_scaling(get),
    }
    for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                             ("pad_token_id", "padding_token_id")):
        value = _field(reader, f"tokenizer.ggml.{gguf_key}")
        if value is not None:
            config[hf_key] = int(value)
    if arch == "llama":
        config["hidden_act"] = "silu"
        config["mlp_bias"] = False
    elif arch == "gemma3":
        sliding = get("attention.sliding_window")
        config.update(
            hidden_activation="gelu_pytorch_tanh",
            rope_local_base_freq=float(get("rope.freq_base_swa", 10000.0)),
            sliding_window=None if sliding is None else int(sliding),
            layer_types=_gemma3_layer_types(get("attention.sliding_window_pattern", 6), layers),
            query_pre_attn_scalar=hidden // heads if layers == 62 else head_dim,
            final_logit_softcapping=None,
            attn_logit_softcapping=None,
        )
    return config


def _gemma3_layer_types(pattern, layers: int) -> list[str]:
    """Per-layer attention kinds from `attention.sliding_window_pattern`: an int n (every n-th layer is
    global) or one bool per layer (True = sliding)."""
    if isinstance(pattern, list):
        return ["sliding_attention" if swa else "full_attention" for swa in pattern]
    return ["full_attention" if (i + 1) % int(pattern) == 0 else "sliding_attention" for i in range(layers)]


def _rope_scaling(get) -> dict | None:
    kind = get("rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling = {"rope_type": kind, "factor": float(get("rope.scaling.factor"))}
    original = get("rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row order for q/k: it stores, within each head, row pairs
    (i, i + D/2) of HF's rotate-half layout next to each other; we put the halves back.
    w: [num_heads * D, K] -> same shape."""
    d_half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, d_half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(arch: str, gguf_name: str) -> str:
    match = _BLOCK_RE.fullmatch(gguf_name)
    if match:
        layer, part, kind = match.groups()
        hf = _BLOCK_NAMES_BY_ARCH[arch].get(part)
        if hf is not None:
            return f"model.layers.{layer}.{hf}.{kind}"
    else:
        base, _, kind = gguf_name.rpartition(".")
        if base in _GLOBAL_NAMES:
            return f"{_GLOBAL_NAMES[base]}.{kind}"
    raise ValueError(
        f"GGUF tensor {gguf_name!r} has no HF name in jaxq's {arch} map; the file may hold a variant "
        f"jaxq does not support (known block tensors: {sorted(_BLOCK_NAMES_BY_ARCH[arch])})."
    )


def gguf_hf_tensors(reader, config: dict, path="<gguf>"):
    """Yield (HF name, HF shape, read) for every tensor in the GGUF file, where read() dequantises it to a
    float32 numpy array in HF orientation ([out, in] for linear weights). The shape comes from the header,
    so a mismatch is reported before any tensor is dequantised."""
    import gguf

    arch = _architecture(reader, path)

    def read(tensor, name):
        w = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            w = _unpermute_rope_rows(w, heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            w = w - 1.0
        return w

    for tensor in reader.tensors:
        name = _hf_name(arch, tensor.name)
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dims fastest-first
        yield name, shape, lambda tensor=tensor, name=name: read(tensor, name)


def load_gguf_params(path, dtype=jnp.bfloat16, convert=default_convert):
    """(family, config, params, hf_config, eos_token_ids) from a GGUF file (Llama or Gemma 3).

    Tensors are dequantised one at a time and handed to the family's ParamsBuilder (the same name map and
    shape checks as the safetensors loader), then cast to dtype on the device.
    """
    path = pathlib.Path(path)
    reader = _reader(path)
    hf_config = gguf_hf_config(reader, path)
    family = get_model_family(hf_config["architectures"])
    config = family.config_class.from_hf_config(hf_config)
    builder = ParamsBuilder(
        family.weight_map(config), expected_shapes(family.module_class(config)), jnp.dtype(dtype), convert
    )
    for name, shape, read in gguf_hf_tensors(reader, hf_config, path):
        builder.add(name, shape, read, str(path))
    return family, config, builder.finish(str(path)), hf_config, gguf_eos_token_ids(reader)


def gguf_eos_token_ids(reader) -> tuple[int, ...]:
    """Token ids that end generation: the GGUF's eos plus its end-of-turn / end-of-message ids."""
    ids = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = _field(reader, f"tokenizer.ggml.{key}")
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return tuple(ids)


def load_gguf_tokenizer(path):
    """The transformers tokenizer built from the GGUF's metadata.

    Building it from GGUF takes seconds to tens of seconds (Gemma's 262k-token vocabulary), so the
    result is saved once under the jaxq cache, keyed by the file's path, size and mtime, and reloaded
    from there.
    """
    from transformers import AutoTokenizer

    path = pathlib.Path(path).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    saved = model_cache.cache_dir() / "tokenizers" / f"{path.stem}-{key}"
    if (saved / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(saved)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    saved.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=saved.parent) as tmp:
        tokenizer.save_pretrained(tmp)
        try:  # atomic: a concurrent loader sees the whole directory or none
            os.rename(tmp, saved)
        except OSError:  # another process saved it first
            pass
    return tokenizer
