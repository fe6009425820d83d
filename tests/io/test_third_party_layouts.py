"""Checkpoints in the layouts no producer tool here can write (AutoAWQ GEMM, GPTQ v1/v2, compressed-tensors
INT4/FP8, DeepSeek FP8, ModelOpt MXFP4 / MIXED_PRECISION), built from jaxq-quantized weights with packings
written here from spec/formats.md (not with jaxq.formats.layouts), and GPT-OSS experts at tensor level.

Each quantized checkpoint loads through jaxq.load; its twin is the same model with every QuantizedWeight
replaced by the weight dequantized in NumPy by the spec's formula. With activation quantization switched
off the logits must be identical: the loader read every code, zero point, scale and group index where the
spec puts it. (One decoder layer keeps the compiles few.)
"""

import json

import flax
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxq
from jaxq.formats import g_idx_from_perm, quantize_fp8, quantize_int4, quantize_mxfp4
from jaxq.io.quantized.gpt_oss import expert_specs, experts_from_gpt_oss
from jaxq.nn.quantized_weight import QuantizedWeight
from models.hf_interop import hf_path

from .test_check_headers import write_safetensors

LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128, hidden_size=256,
             intermediate_size=512, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
E2M1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float32)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
TOKENS = np.random.default_rng(7).integers(0, 128, (2, 24))


def _base_weights(config, seed=0) -> dict[str, np.ndarray]:
    """A random float32 Llama checkpoint of config's sizes (HF names)."""
    rng = np.random.default_rng(seed)
    h, i, d = config["hidden_size"], config["intermediate_size"], config["hidden_size"] // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * d
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    w = {"model.embed_tokens.weight": rng.normal(0, 1, (config["vocab_size"], h)),
         "model.norm.weight": 1 + 0.1 * rng.normal(size=h),
         "lm_head.weight": rng.normal(0, 0.05, (config["vocab_size"], h))}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        w[p + "input_layernorm.weight"] = 1 + 0.1 * rng.normal(size=h)
        w[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.normal(size=h)
        for name, shape in shapes.items():
            w[f"{p}{name}.weight"] = rng.normal(0, 0.05, shape)
    return {k: v.astype(np.float32) for k, v in w.items()}


def _build(tmp_path, config, quantization_config, convert, extra_files=None, extra_tensors=None):
    """Write the quantized checkpoint: convert(module, W) -> ({suffix: tensor}, W dequantized) for every linear.
    Returns (its directory, {module: W dequantized})."""
    tensors, dequantized = _base_weights(config), {}
    if config["tie_word_embeddings"]:
        del tensors["lm_head.weight"]
    tensors.update(extra_tensors or {})
    for layer in range(config["num_hidden_layers"]):
        for linear in LINEARS:
            module = f"model.layers.{layer}.{linear}"
            quantized, dequantized[module] = convert(module, tensors.pop(f"{module}.weight"))
            tensors.update({f"{module}.{k}": v for k, v in quantized.items()})
    path = tmp_path / "quantized"
    path.mkdir()
    (path / "config.json").write_text(
        json.dumps({**config, **({"quantization_config": quantization_config} if quantization_config else {})}))
    for file, content in (extra_files or {}).items():
        (path / file).write_text(json.dumps(content))
    write_safetensors(path / "model.safetensors", tensors)
    return path, dequantized


def _quantized_weights(model):
    return [w for w in jax.tree.leaves(model.params, is_leaf=lambda x: isinstance(x, QuantizedWeight))
            if isinstance(w, QuantizedWeight)]


def _weight_only(model):
    """The model with every QuantizedWeight's activation quantization switched off."""
    off = lambda w: w.replace(recipe=w.recipe.replace(activation="none")) if isinstance(w, QuantizedWeight) else w
    return model.replace(params=jax.tree.map(off, model.params, is_leaf=lambda x: isinstance(x, QuantizedWeight)))


def _twin(model, dequantized):
    """The model with each QuantizedWeight replaced by the NumPy-dequantized float32 weight."""
    flat = flax.traverse_util.flatten_dict(model.params, is_leaf=lambda _, x: isinstance(x, QuantizedWeight))
    for module, w in dequantized.items():
        path = hf_path(f"{module}.weight")
        assert isinstance(flat[path], QuantizedWeight), module
        flat[path] = jnp.asarray(w, jnp.float32)
    return model.replace(params=flax.traverse_util.unflatten_dict(flat))


def _assert_same_logits(quant_dir, dequantized, recipe_name=None, **recipe_fields):
    """check passes, every linear loads as a QuantizedWeight of recipe_name (with recipe_fields), and the
    weight-only logits equal the twin's. Returns the loaded model."""
    assert jaxq.check(quant_dir) == []
    quant = jaxq.load(quant_dir, "float32")
    weights = _quantized_weights(quant)
    assert len(weights) == len(dequantized)
    if recipe_name is not None:
        assert {w.recipe.name for w in weights} == {recipe_name}
    for field, value in recipe_fields.items():
        assert {getattr(w.recipe, field) for w in weights} == {value}, field
    np.testing.assert_array_equal(np.asarray(jaxq.logits(_weight_only(quant), TOKENS)),
                                  np.asarray(jaxq.logits(_twin(quant, dequantized), TOKENS)))
    return quant


# ----------------------------------------------------------------------------------------- INT4 packings
def _codes(t) -> np.ndarray:
    """jaxq's Int4Tensor codes u [N, K] (its documented layout: low nibble = even k)."""
    p = np.asarray(t.packed)
    return np.stack([p & 0xF, p >> 4], -1).reshape(p.shape[0], -1).astype(np.uint32)


def _words(codes: np.ndarray, order=tuple(range(8))) -> np.ndarray:
    """Eight 4-bit codes per int32 along the last axis: nibble slot i of word c holds element 8c + order[i]."""
    c = codes.astype(np.uint32).reshape(*codes.shape[:-1], -1, 8)
    return sum(c[..., order[i]] << np.uint32(4 * i) for i in range(8)).astype(np.uint32).view(np.int32)


def _int4_parts(t):
    """(u [N, K], z [N, G], s [N, G] float32, g [K]) of an Int4Tensor; a symmetric one has zero 8."""
    u, s = _codes(t), np.asarray(t.scale).astype(np.float32)
    z = np.full(s.shape, 8, np.uint32) if t.zero is None else np.asarray(t.zero).astype(np.uint32)
    k = u.shape[1]
    g = np.arange(k) // t.group_size if t.g_idx is None else np.asarray(t.g_idx)
    return u, z, s, g


def _int4_dequantized(t) -> np.ndarray:
    """W[n, k] = (u[n, k] - z[n, g(k)]) * s[n, g(k)] (spec 7)."""
    u, z, s, g = _int4_parts(t)
    return (u.astype(np.float32) - z[:, g].astype(np.float32)) * s[:, g]


def test_autoawq_gemm(tmp_path):
    def convert(module, w):
        t = quantize_int4(w, 128, scheme="autoawq", scale_dtype=jnp.float16)
        u, z, s, _ = _int4_parts(t)
        return {"qweight": _words(u.T, AWQ_ORDER), "qzeros": _words(z.T, AWQ_ORDER),
                "scales": s.T.astype(np.float16)}, _int4_dequantized(t)
    config = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm",
              "modules_to_not_convert": None}
    _assert_same_logits(*_build(tmp_path, LLAMA, config, convert), "w4a16_awq", symmetric=False)


@pytest.mark.parametrize("version, sym, act_order", [(1, True, True), (1, False, False), (2, True, False),
                                                    (2, False, True)])
def test_gptq(tmp_path, version, sym, act_order):
    rng = np.random.default_rng(3)

    def convert(module, w):
        g_idx = g_idx_from_perm(rng.permutation(w.shape[1]), 128) if act_order else None
        t = quantize_int4(w, 128, scheme="gptq" if sym else "gptq_asym", g_idx=g_idx, scale_dtype=jnp.float16)
        u, z, s, g = _int4_parts(t)
        stored_zero = z - 1 if version == 1 else z  # v1 ("gptq") stores zero - 1
        return {"qweight": _words(u).T.copy(), "qzeros": _words(stored_zero.T), "scales": s.T.astype(np.float16),
                "g_idx": g.astype(np.int32)}, _int4_dequantized(t)
    config = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": act_order, "sym": sym,
              "checkpoint_format": "gptq" if version == 1 else "gptq_v2"}
    quant = _assert_same_logits(*_build(tmp_path, LLAMA, config, convert), "w4a16_gptq", symmetric=sym,
                                act_order=act_order)
    assert all((w.weight.g_idx is not None) == act_order for w in _quantized_weights(quant))


def test_gptq_quantize_config_json(tmp_path):
    """AutoGPTQ writes its config beside config.json (quantize_config.json, no quant_method)."""
    def convert(module, w):
        t = quantize_int4(w, 128, scheme="gptq", scale_dtype=jnp.float16)
        u, z, s, g = _int4_parts(t)
        return {"qweight": _words(u).T.copy(), "qzeros": _words((z - 1).T), "scales": s.T.astype(np.float16),
                "g_idx": g.astype(np.int32)}, _int4_dequantized(t)
    extra = {"quantize_config.json": {"bits": 4, "group_size": 128, "desc_act": False, "sym": True}}
    _assert_same_logits(*_build(tmp_path, LLAMA, None, convert, extra), "w4a16_gptq")


def _compressed_tensors_config(fmt, weights, input_activations=None):
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "ignore": ["lm_head"], "kv_cache_scheme": None, "sparsity_config": {},
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": input_activations, "format": fmt}}}


@pytest.mark.parametrize("sym, actorder", [(True, None), (False, None), (True, "group")])
def test_compressed_tensors_pack_quantized(tmp_path, sym, actorder):
    rng = np.random.default_rng(5)

    def convert(module, w):
        g_idx = g_idx_from_perm(rng.permutation(w.shape[1]), 128) if actorder else None
        t = quantize_int4(w, 128, scheme="compressed_tensors" if sym else "compressed_tensors_asym", g_idx=g_idx,
                          scale_dtype=jnp.bfloat16)
        u, z, s, g = _int4_parts(t)
        tensors = {"weight_packed": _words(u), "weight_scale": s.astype(ml_dtypes.bfloat16),
                   "weight_shape": np.array(w.shape, np.int64)}
        if not sym:  # zero points packed along the output dim: row 8r + j in nibble j of [r, g]
            tensors["weight_zero_point"] = _words(z.T).T.copy()
        if actorder:
            tensors["weight_g_idx"] = g.astype(np.int32)
        return tensors, _int4_dequantized(t)
    weights = {"type": "int", "num_bits": 4, "strategy": "group", "group_size": 128, "symmetric": sym,
               "actorder": actorder, "dynamic": False}
    recipe = "w4a16_gptq" if sym else "w4a16_awq"
    _assert_same_logits(*_build(tmp_path, LLAMA, _compressed_tensors_config("pack-quantized", weights), convert),
                        recipe, symmetric=sym, act_order=actorder == "group")


# ----------------------------------------------------------------------------------------- FP8
def _fp8(w, granularity):
    """(E4M3 codes as ml_dtypes, float32 scale, dequantized W = code * scale broadcast, spec 7)."""
    t = quantize_fp8(w, granularity)
    q, s = np.asarray(t.data), np.asarray(t.scale, np.float32)
    n, k = w.shape
    full = {"tensor": lambda: s, "channel": lambda: s[:, None],
            "block": lambda: np.repeat(np.repeat(s, 128, 0), 128, 1)[:n, :k]}[granularity]()
    return q, s, q.astype(np.float32) * full


@pytest.mark.parametrize("strategy, activations, recipe, activation", [
    ("channel", {"type": "float", "num_bits": 8, "strategy": "token", "dynamic": True}, "fp8_rowwise", "fp8_token"),
    ("tensor", {"type": "float", "num_bits": 8, "strategy": "tensor", "dynamic": False}, "fp8", "fp8_static"),
    ("block", {"type": "float", "num_bits": 8, "strategy": "group", "group_size": 128, "dynamic": True},
     "fp8_block", "fp8_group"),
])
def test_compressed_tensors_float_quantized(tmp_path, strategy, activations, recipe, activation):
    def convert(module, w):
        q, s, dequantized = _fp8(w, strategy)
        scale = s.reshape(1) if strategy == "tensor" else s.reshape(-1, 1) if strategy == "channel" else s
        tensors = {"weight": q, "weight_scale": scale}
        if strategy == "tensor":
            tensors["input_scale"] = np.array([0.02], np.float32)
        return tensors, dequantized
    weights = {"type": "float", "num_bits": 8, "strategy": strategy, "symmetric": True, "dynamic": False,
               **({"block_structure": [128, 128]} if strategy == "block" else {})}
    config = _compressed_tensors_config("float-quantized", weights, activations)
    _assert_same_logits(*_build(tmp_path, LLAMA, config, convert), recipe, activation=activation)


def test_deepseek_fp8_blocks_with_partial_edges(tmp_path):
    """quant_method fp8, 128x128 blocks, weight_scale_inv [ceil(N/128), ceil(K/128)]: hidden 320 and
    intermediate 448 leave partial edge blocks in both dimensions."""
    config = {**LLAMA, "hidden_size": 320, "intermediate_size": 448, "num_attention_heads": 5,
              "num_key_value_heads": 1}

    def convert(module, w):
        q, s, dequantized = _fp8(w, "block")
        assert s.shape == (-(-w.shape[0] // 128), -(-w.shape[1] // 128))
        return {"weight": q, "weight_scale_inv": s}, dequantized
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    quant_dir, dequantized = _build(tmp_path, config, qc, convert)
    quant = _assert_same_logits(quant_dir, dequantized, "fp8_block", activation="fp8_group")
    # With its dynamic 1x128 FP8 activations the model stays close to the dequantized one.
    with_acts = np.asarray(jaxq.logits(quant, TOKENS))
    plain = np.asarray(jaxq.logits(_twin(quant, dequantized), TOKENS))
    assert np.linalg.norm(with_acts - plain) / np.linalg.norm(plain) < 0.05


# ----------------------------------------------------------------------------------------- ModelOpt
def _mxfp4_dequantized(packed, scale):
    """e2m1(nibble, low = even k) * 2**(scale - 127) per block of 32 (spec 7)."""
    codes = np.stack([packed & 0xF, packed >> 4], -1).reshape(*packed.shape[:-1], -1)
    values = E2M1[codes].reshape(*scale.shape, 32)
    return (values * np.exp2(scale.astype(np.float32) - 127)[..., None]).reshape(codes.shape)


def _modelopt_int4(module, w, group_size, rng):
    """ModelOpt INT4: two's-complement nibbles packed along N (rows 2i low, 2i + 1 high), scale [N, K/G], and on
    o_proj / down_proj a pre_quant_scale (powers of two, so folding it into W is exact)."""
    t = quantize_int4(w, group_size, scheme="modelopt")
    u, _, s, _ = _int4_parts(t)
    q = (u.astype(np.int32) - 8) & 0xF
    tensors = {"weight": (q[0::2] | (q[1::2] << 4)).astype(np.uint8), "weight_scale": s}
    dequantized = _int4_dequantized(t)
    if module.endswith(("o_proj", "down_proj")):
        pqs = np.exp2(rng.integers(-2, 3, w.shape[1])).astype(np.float32)
        tensors["pre_quant_scale"] = pqs.astype(ml_dtypes.bfloat16)
        dequantized = dequantized * pqs
    return tensors, dequantized


def test_modelopt_mixed_precision_mxfp4_and_int4_awq(tmp_path):
    """MIXED_PRECISION: attention MXFP4 (q/k/v named by their fused qkv_proj), MLP W4A16_AWQ."""
    rng = np.random.default_rng(11)

    def convert(module, w):
        if "self_attn" in module:
            t = quantize_mxfp4(w)
            packed, scale = np.asarray(t.packed), np.asarray(t.scale)
            return {"weight": packed, "weight_scale": scale}, _mxfp4_dequantized(packed, scale)
        return _modelopt_int4(module, w, 128, rng)
    layers = {"model.layers.0.self_attn.qkv_proj": {"quant_algo": "MXFP4"},
              "model.layers.*.self_attn.o_proj": {"quant_algo": "mxfp4"}}
    layers.update({f"model.layers.0.mlp.{p}": {"quant_algo": "W4A16_AWQ", "group_size": 128}
                   for p in ("gate_proj", "up_proj", "down_proj")})
    hf_quant = {"producer": {"name": "modelopt", "version": "0.47.0"},
                "quantization": {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None,
                                 "quantized_layers": layers}}
    quant = _assert_same_logits(*_build(tmp_path, LLAMA, None, convert, {"hf_quant_config.json": hf_quant}))
    assert sorted(w.recipe.name for w in _quantized_weights(quant)) == ["mxfp4"] * 4 + ["w4a16_awq"] * 3


def test_modelopt_int4_awq_group_64_tied_embeddings_kv_scales(tmp_path):
    """SmolLM2-like traits: hidden 320 = 5 groups of 64, tied embeddings (the exporter still lists lm_head in
    exclude_modules but writes no lm_head.weight), FP8 KV scales well below 1."""
    config = {**LLAMA, "hidden_size": 320, "intermediate_size": 448, "num_attention_heads": 5,
              "num_key_value_heads": 1, "tie_word_embeddings": True}
    rng = np.random.default_rng(13)
    kv = {f"model.layers.0.self_attn.{p}_proj.{p}_scale": np.array(s, np.float32)
          for p, s in (("k", 0.02), ("v", 3e-3))}
    hf_quant = {"producer": {"name": "modelopt", "version": "0.47.0"},
                "quantization": {"quant_algo": "W4A16_AWQ", "group_size": 64, "has_zero_point": False,
                                 "pre_quant_scale": True, "kv_cache_quant_algo": "FP8",
                                 "exclude_modules": ["lm_head", "model.embed_tokens"]}}
    quant = _assert_same_logits(*_build(tmp_path, config, None, lambda m, w: _modelopt_int4(m, w, 64, rng),
                                        {"hf_quant_config.json": hf_quant}, kv), "w4a16_awq", group_size=64)
    np.testing.assert_array_equal(np.asarray(quant.kv_scales), np.array([[0.02], [3e-3]], np.float32))


# ----------------------------------------------------------------------------------------- GPT-OSS
def test_gpt_oss_experts_blocks_scales_and_gate_up_deinterleave():
    e, i, h = 2, 64, 96
    rng = np.random.default_rng(2)
    gate_up = rng.normal(0, 1, (e, 2 * i, h)).astype(np.float32)  # rows 2j = gate_j, 2j + 1 = up_j
    down = rng.normal(0, 1, (e, h, i)).astype(np.float32)
    tensors = {}
    for name, w in (("gate_up_proj", gate_up), ("down_proj", down)):
        t = quantize_mxfp4(w)
        tensors[f"{name}_blocks"] = np.asarray(t.packed).reshape(*np.asarray(t.scale).shape, 16)
        tensors[f"{name}_scales"] = np.asarray(t.scale)
    tensors["gate_up_proj_bias"] = rng.normal(size=(e, 2 * i)).astype(ml_dtypes.bfloat16)
    tensors["down_proj_bias"] = rng.normal(size=(e, h)).astype(ml_dtypes.bfloat16)
    for suffix, spec in expert_specs(e, i, h).items():
        assert tensors[suffix].shape in spec.shapes, suffix
    experts = experts_from_gpt_oss({k: jnp.asarray(v) for k, v in tensors.items()}, jnp.float32)
    # Independent decode of the file: [E, R, K/32, 16] bytes -> [E, R, K], low nibble first.
    full = {n: _mxfp4_dequantized(tensors[f"{n}_blocks"].reshape(*tensors[f"{n}_scales"].shape[:-1], -1),
                                  tensors[f"{n}_scales"]) for n in ("gate_up_proj", "down_proj")}
    expected = {"gate_proj": full["gate_up_proj"][:, 0::2], "up_proj": full["gate_up_proj"][:, 1::2],
                "down_proj": full["down_proj"]}
    bias = tensors["gate_up_proj_bias"].astype(np.float32)
    expected_bias = {"gate_proj": bias[:, 0::2], "up_proj": bias[:, 1::2],
                     "down_proj": tensors["down_proj_bias"].astype(np.float32)}
    for name, w in expected.items():
        weight = experts[name]["weight"]
        assert weight.recipe.name == "mxfp4" and weight.shape == w.shape
        np.testing.assert_array_equal(np.asarray(weight.weight.dequantize(jnp.float32)), w)
        np.testing.assert_array_equal(np.asarray(experts[name]["bias"]), expected_bias[name])
