"""Flax building blocks the models are made of.

qdense      QDense and `qmatmul`, the hook quantized weights plug into
embed       Embed (token table; `attend` is the tied output projection)
rms_norm    RMSNorm (LLaMA and Gemma conventions)
rope        RopeConfig, inv_frequencies (transformers' rope types), rope_tables, apply_rope
attention   Attention (GQA, q/k norm, cache), dot_product_attention, causal_mask, softcap
kv_cache    KVCache / LayerKV (compute dtype or FP8 E4M3, ModelOpt's op order)
mlp         GatedMLP
decoder     call-contract plumbing shared by the causal LMs (positions, masks, cache bookkeeping)
"""
