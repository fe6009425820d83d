"""Gemma 3 text decoder (transformers' Gemma3ForCausalLM, and the text part of Gemma3ForConditionalGeneration).

Differences from LLaMA, all as data here: embeddings scaled by sqrt(hidden) (rounded to the compute dtype),
RMSNorm scale (1 + w), four norms per layer (input, post_attention, pre_feedforward, post_feedforward:
the sublayer outputs are normed before the residual add), per-head q/k norm, scores scaled by
query_pre_attn_scalar**-0.5, GeGLU (gelu_pytorch_tanh) MLP, sliding-window ("sliding_attention") layers
with their own RoPE base (rope_local_base_freq) between global layers (rope_theta + rope_scaling), and
optional final logit softcapping.

Call contract: see jaxq/nn/decoder.py. Params use HF names (models/hf_interop.py); linear weights [out, in].
"""
import dataclasses
import math
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

_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers")
_SLIDING, _FULL = "sliding_attention", "full_attention"


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
    """Field names as in HF Gemma3TextConfig, whose defaults these are (older config.json files omit them).

    rope_parameters: RoPE of the global (full_attention) layers; rope_local_parameters: of the
    sliding-window layers. layer_types: per layer "sliding_attention" or "full_attention".
    """

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    vocab_size: int = 262_208
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131_072
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    query_pre_attn_scalar: float = 256
    sliding_window: int = 4096
    layer_types: tuple[str, ...] | None = None
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    rope_parameters: RopeConfig = RopeConfig(rope_theta=1_000_000.0)
    rope_local_parameters: RopeConfig = RopeConfig(rope_theta=10_000.0)

    def __post_init__(self):
        activation(self.hidden_activation)
        if self.attn_logit_softcapping is not None:
            # transformers' Gemma3Attention stores but never applies it (Gemma 2 does); released Gemma 3
            # configs set it null. Refuse rather than pick one of two numerics silently.
            raise ValueError(
                f"attn_logit_softcapping={self.attn_logit_softcapping}: Gemma 3 in transformers ignores it; "
                "set it to null in config.json to load this checkpoint with transformers' numerics"
            )
        if self.layer_types is None:  # transformers' default: every 6th layer is global
            pattern = tuple(_FULL if (i + 1) % 6 == 0 else _SLIDING for i in range(self.num_hidden_layers))
            object.__setattr__(self, "layer_types", pattern)
        if len(self.layer_types) != self.num_hidden_layers or set(self.layer_types) - {_SLIDING, _FULL}:
            raise ValueError(f"layer_types {self.layer_types} do not fit {self.num_hidden_layers} layers")

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> "Gemma3Config":
        """From Gemma3TextConfig's config.json, or Gemma3Config's (its text_config, as transformers'
        Gemma3ForConditionalGeneration runs it: without final logit softcapping)."""
        if "text_config" in hf:
            text = dict(hf["text_config"] or {})
            text.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", True))
            # transformers' Gemma3ForConditionalGeneration head never applies final_logit_softcapping.
            hf = {**text, "final_logit_softcapping": None}
        if hf.get("use_bidirectional_attention"):
            raise ValueError("Gemma 3 with use_bidirectional_attention is not supported (encoder use)")
        max_pos = hf.get("max_position_embeddings", cls.max_position_embeddings)
        rope = hf.get("rope_parameters") or {}
        if _FULL in rope or _SLIDING in rope:  # transformers v5: one dict per layer type
            full, local = rope.get(_FULL), rope.get(_SLIDING)
        else:  # v4: rope_theta + rope_scaling for global layers, rope_local_base_freq for local ones
            full, local = hf.get("rope_scaling"), {"rope_theta": hf.get("rope_local_base_freq", 10_000.0)}
        resolved: dict[str, Any] = {
            "rope_parameters": RopeConfig.from_hf(full, hf.get("rope_theta", 1_000_000.0), max_pos),
            "rope_local_parameters": RopeConfig.from_hf(local, 10_000.0, max_pos),
        }
        if hf.get("layer_types") is not None:
            resolved["layer_types"] = tuple(hf["layer_types"])
        else:
            period = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
            n = hf.get("num_hidden_layers", 0)
            resolved["layer_types"] = tuple(_FULL if (i + 1) % period == 0 else _SLIDING for i in range(n))
        return config_from_hf(cls, hf, _REQUIRED, **resolved)

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        return tuple(self.sliding_window if t == _SLIDING else None for t in self.layer_types)


class Gemma3DecoderLayer(nn.Module):
    config: Gemma3Config
    dtype: Any = None

    @nn.compact
    def __call__(self, x, cos, sin, mask, kv=None, positions=None):
        cfg = self.config

        def norm(name):
            return RMSNorm(cfg.rms_norm_eps, unit_offset=True, name=name)

        attn = Attention(
            num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim,
            scale=cfg.query_pre_attn_scalar**-0.5,
            qkv_bias=cfg.attention_bias,
            out_bias=cfg.attention_bias,
            qk_norm=True,
            norm_eps=cfg.rms_norm_eps,
            norm_unit_offset=True,
            dtype=self.dtype,
            name="self_attn",
        )
        h, kv = attn(norm("input_layernorm")(x), cos, sin, mask, kv, positions)
        x = x + norm("post_attention_layernorm")(h)
        mlp = GatedMLP(cfg.intermediate_size, cfg.hidden_activation, dtype=self.dtype, name="mlp")
        return x + norm("post_feedforward_layernorm")(mlp(norm("pre_feedforward_layernorm")(x))), kv


class Gemma3TextModel(nn.Module):
    """params["model"]: embed_tokens, layers_<i>, norm. Returns final-normed hidden states and written KV."""

    config: Gemma3Config
    dtype: Any = None

    def setup(self):
        cfg = self.config
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, self.dtype)
        self.layers = [Gemma3DecoderLayer(cfg, self.dtype) for _ in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, unit_offset=True)

    def embed(self, tokens):
        """tokens [B, T] -> the hidden states [B, T, hidden] entering layer 0."""
        h = self.embed_tokens(tokens)
        # transformers multiplies by sqrt(hidden) rounded to the embedding dtype (bf16: sqrt(2048) -> 45.25).
        return h * jnp.asarray(math.sqrt(self.config.hidden_size), jnp.float32).astype(h.dtype)

    def rope(self, positions, dtype):
        """Per layer, the (cos, sin) tables of positions [B, T] (global and sliding layers differ)."""
        cfg = self.config
        seq_len = jnp.max(positions) + 1
        tables = {}
        for kind, rope in ((_FULL, cfg.rope_parameters), (_SLIDING, cfg.rope_local_parameters)):
            if kind in cfg.layer_types:
                inv_freq, scaling = inv_frequencies(rope, cfg.head_dim, cfg.max_position_embeddings, seq_len)
                tables[kind] = rope_tables(positions, inv_freq, scaling, dtype)
        return [tables[kind] for kind in cfg.layer_types]

    def __call__(self, tokens, positions, masks, cache):
        h = self.embed(tokens)  # [B, T, hidden]
        masks = [masks[w] for w in self.config.layer_windows]
        h, written = run_layers(self.layers, h, self.rope(positions, h.dtype), masks, cache, positions)
        return self.norm(h), written


class Gemma3ForCausalLM(nn.Module):
    """Gemma 3 causal LM. dtype: compute dtype; None = the embedding table's dtype.

    __call__(tokens [B, T] int32, cache=None, num_new=None, attention_mask=None, logits_index=None)
      -> (float32 logits [B, T, V] or [B, 1, V], updated KVCache or None); contract in jaxq/nn/decoder.py.
    Sliding-window layers keep a full-length cache and mask by position (no ring buffer).
    """

    config: Gemma3Config
    dtype: Any = None
    layerwise = Layerwise(
        Gemma3TextModel, Gemma3DecoderLayer,
        norm_inputs=(("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                     ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"))),
        norm_unit_offset=True,
    )

    @nn.compact
    def __call__(self, tokens, cache: KVCache | None = None, num_new=None, attention_mask=None, logits_index=None):
        return causal_lm_forward(
            Gemma3TextModel(self.config, self.dtype, name="model"), self.config, self.dtype,
            tokens, cache, num_new, attention_mask, logits_index, self.config.final_logit_softcapping,
        )


def weight_map(config: Gemma3Config, multimodal: bool = False) -> WeightMap:
    """Every HF tensor name and its params path (identity transforms). multimodal: names as
    Gemma3ForConditionalGeneration saves them (language_model prefixes); the vision tower is dropped."""
    attn = ["q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "q_norm.weight", "k_norm.weight"]
    if config.attention_bias:
        attn += ["q_proj.bias", "k_proj.bias", "v_proj.bias", "o_proj.bias"]
    norms = ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"]
    layer = [f"{n}.weight" for n in norms] + [f"self_attn.{n}" for n in attn]
    layer += [f"mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    names += [f"model.layers.{i}.{n}" for i in range(config.num_hidden_layers) for n in layer]
    ignored = [r"rotary_emb\.inv_freq$"]
    if config.tie_word_embeddings:
        ignored.append(r"^(language_model\.)?lm_head\.weight$")
    else:
        names.append("lm_head.weight")
    renames: tuple[tuple[str, str], ...] = ()
    if multimodal:
        # transformers v5 saves model.language_model.*, v4 saved language_model.model.* / language_model.lm_head.
        renames = ((r"^model\.language_model\.", "model."), (r"^language_model\.model\.", "model."),
                   (r"^language_model\.lm_head\.", "lm_head."))
        ignored.append(r"^(model\.)?(vision_tower|multi_modal_projector)\.")
    return WeightMap({n: WeightEntry(hf_path(n)) for n in names}, renames=renames, ignored=tuple(ignored))
