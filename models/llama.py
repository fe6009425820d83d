"""LLaMA-architecture decoders: LLaMA 2/3/3.1, Mistral, SmolLM2, Qwen2/2.5 and Qwen3.

Per layer: x += o_proj(attn(input_layernorm(x))); x += mlp(post_attention_layernorm(x)). Variants differ
only in data: GQA sizes, head_dim, RoPE scaling, attention/MLP biases (Qwen2: q/k/v bias), per-head q/k
RMSNorm before RoPE (Qwen3), sliding windows (Mistral, Qwen with use_sliding_window), tied embeddings.

Call contract: see jaxq/nn/decoder.py. Params use HF names (models/hf_interop.py); linear weights [out, in].
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxq.nn.attention import Attention
from jaxq.nn.decoder import Layerwise, causal_lm_forward, run_layers
from jaxq.nn.embed import Embed
from jaxq.nn.kv_cache import KVCache
from jaxq.nn.mlp import GatedMLP, activation
from jaxq.nn.rms_norm import RMSNorm
from jaxq.nn.rope import RopeConfig, inv_frequencies, rope_tables
from models.hf_interop import WeightEntry, WeightMap, config_from_hf, hf_path

_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Sizes and switches, field names as in HF config.json; defaults are transformers' LlamaConfig ones.

    model_type picks the variant's fixed traits: "qwen2" adds q/k/v biases, "qwen3" per-head q/k RMSNorm.
    layer_types: per layer "full_attention" or "sliding_attention" (the latter uses sliding_window).
    rope_parameters: a RopeConfig (from HF `rope_parameters`, or v4's rope_theta + rope_scaling).
    num_key_value_heads and head_dim default to num_attention_heads and hidden_size // num_attention_heads.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_parameters: RopeConfig = RopeConfig()
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    model_type: str = "llama"

    def __post_init__(self):
        if self.model_type not in _MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not a LLaMA variant; supported: {_MODEL_TYPES}")
        activation(self.hidden_act)  # fail at config time, not inside a trace
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.layer_types is None:
            sliding = self.model_type == "mistral" and self.sliding_window is not None
            kind = "sliding_attention" if sliding else "full_attention"
            object.__setattr__(self, "layer_types", (kind,) * self.num_hidden_layers)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> "LlamaConfig":
        """From a config.json dict (transformers v4 or v5 layout); unknown keys are ignored."""
        model_type = hf.get("model_type", "llama")
        rope = RopeConfig.from_hf(
            hf.get("rope_parameters") or hf.get("rope_scaling"),
            hf.get("rope_theta", 10000.0),
            hf.get("max_position_embeddings", 2048),
        )
        resolved: dict[str, Any] = {"rope_parameters": rope, "model_type": model_type}
        if hf.get("layer_types") is not None:
            resolved["layer_types"] = tuple(hf["layer_types"])
        elif model_type in ("qwen2", "qwen3"):
            # Qwen: sliding window only if use_sliding_window, on layers >= max_window_layers.
            window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
            start = hf.get("max_window_layers", 28)
            resolved["layer_types"] = tuple(
                "sliding_attention" if window is not None and i >= start else "full_attention"
                for i in range(hf["num_hidden_layers"])
            )
        if model_type == "llama":
            resolved["sliding_window"] = None  # LLaMA config.json may carry one that transformers ignores
        return config_from_hf(cls, hf, _REQUIRED, **resolved)

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """Per layer: the sliding window or None (full causal attention)."""
        return tuple(self.sliding_window if t == "sliding_attention" else None for t in self.layer_types)


class LlamaDecoderLayer(nn.Module):
    config: LlamaConfig
    dtype: Any = None

    @nn.compact
    def __call__(self, x, cos, sin, mask, kv=None, positions=None):
        cfg = self.config
        attn = Attention(
            num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim,
            scale=cfg.head_dim**-0.5,
            qkv_bias=cfg.attention_bias or cfg.model_type == "qwen2",
            out_bias=cfg.attention_bias,
            qk_norm=cfg.model_type == "qwen3",
            norm_eps=cfg.rms_norm_eps,
            dtype=self.dtype,
            name="self_attn",
        )
        h, kv = attn(RMSNorm(cfg.rms_norm_eps, name="input_layernorm")(x), cos, sin, mask, kv, positions)
        x = x + h
        mlp = GatedMLP(cfg.intermediate_size, cfg.hidden_act, cfg.mlp_bias, self.dtype, name="mlp")
        return x + mlp(RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm")(x)), kv


class LlamaModel(nn.Module):
    """params["model"]: embed_tokens, layers_<i>, norm. Returns final-normed hidden states and written KV."""

    config: LlamaConfig
    dtype: Any = None

    def setup(self):
        cfg = self.config
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, self.dtype)
        self.layers = [LlamaDecoderLayer(cfg, self.dtype) for _ in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps)

    def embed(self, tokens):
        """tokens [B, T] -> the hidden states [B, T, hidden] entering layer 0."""
        return self.embed_tokens(tokens)

    def rope(self, positions, dtype):
        """Per layer, the (cos, sin) tables of positions [B, T]."""
        cfg = self.config
        inv_freq, scaling = inv_frequencies(
            cfg.rope_parameters, cfg.head_dim, cfg.max_position_embeddings, jnp.max(positions) + 1
        )
        return [rope_tables(positions, inv_freq, scaling, dtype)] * cfg.num_hidden_layers

    def __call__(self, tokens, positions, masks, cache):
        h = self.embed(tokens)  # [B, T, hidden]
        masks = [masks[w] for w in self.config.layer_windows]
        h, written = run_layers(self.layers, h, self.rope(positions, h.dtype), masks, cache, positions)
        return self.norm(h), written


class LlamaForCausalLM(nn.Module):
    """LLaMA-family causal LM. dtype: compute dtype; None = the embedding table's dtype.

    __call__(tokens [B, T] int32, cache=None, num_new=None, attention_mask=None, logits_index=None)
      -> (float32 logits [B, T, V] or [B, 1, V] with logits_index, updated KVCache or None);
    the full contract is in jaxq/nn/decoder.py. params["lm_head"]["weight"] [V, hidden] exists only when
    tie_word_embeddings is false; otherwise the embedding table is the output projection.
    """

    config: LlamaConfig
    dtype: Any = None
    layerwise = Layerwise(
        LlamaModel, LlamaDecoderLayer,
        norm_inputs=(("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                     ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))),
    )

    @nn.compact
    def __call__(self, tokens, cache: KVCache | None = None, num_new=None, attention_mask=None, logits_index=None):
        return causal_lm_forward(
            LlamaModel(self.config, self.dtype, name="model"), self.config, self.dtype,
            tokens, cache, num_new, attention_mask, logits_index,
        )


def weight_map(config: LlamaConfig) -> WeightMap:
    """Every HF tensor name of the checkpoint and its params path (all identity: HF orientation is kept)."""
    attn = ["q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"]
    if config.attention_bias or config.model_type == "qwen2":
        attn += ["q_proj.bias", "k_proj.bias", "v_proj.bias"]
    if config.attention_bias:
        attn += ["o_proj.bias"]
    if config.model_type == "qwen3":
        attn += ["q_norm.weight", "k_norm.weight"]
    mlp = ["gate_proj.weight", "up_proj.weight", "down_proj.weight"]
    if config.mlp_bias:
        mlp += ["gate_proj.bias", "up_proj.bias", "down_proj.bias"]
    layer = ["input_layernorm.weight", "post_attention_layernorm.weight"]
    layer += [f"self_attn.{n}" for n in attn] + [f"mlp.{n}" for n in mlp]
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    names += [f"model.layers.{i}.{n}" for i in range(config.num_hidden_layers) for n in layer]
    ignored = [r"rotary_emb\.inv_freq$"]
    if config.tie_word_embeddings:
        ignored.append(r"^lm_head\.weight$")  # some exporters save the tied copy; it equals embed_tokens
    else:
        names.append("lm_head.weight")
    return WeightMap({n: WeightEntry(hf_path(n)) for n in names}, ignored=tuple(ignored))

