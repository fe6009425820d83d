"""RoPE inverse frequencies against transformers' ROPE_INIT_FUNCTIONS, and the rotation against HF's."""
import numpy as np
import pytest
import torch
import transformers as tf
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from jaxq.nn.rope import RopeConfig, apply_rope, inv_frequencies, rope_tables

HEAD_DIM, MAX_POS = 64, 256
ROPES = {
    "llama3": dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=32),
    "linear": dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
    "yarn": dict(rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=32),
    "yarn_mscale": dict(rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=32,
                        mscale=0.707, mscale_all_dim=0.707, beta_fast=16, truncate=False),
    "dynamic": dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0),
}


def _hf_config(params):
    return tf.LlamaConfig(hidden_size=HEAD_DIM * 2, num_attention_heads=2, max_position_embeddings=MAX_POS,
                          rope_parameters=dict(params))


@pytest.mark.parametrize("name", sorted(ROPES))
def test_inv_freq_matches_transformers(name):
    rope = RopeConfig.from_hf(ROPES[name], 10000.0, MAX_POS)
    seq_len = 3 * MAX_POS  # beyond max_position_embeddings: dynamic NTK grows its base
    ref, ref_scaling = ROPE_INIT_FUNCTIONS[rope.rope_type](_hf_config(ROPES[name]), "cpu", seq_len=seq_len)
    inv_freq, scaling = inv_frequencies(rope, HEAD_DIM, MAX_POS, np.int32(seq_len))
    assert inv_freq.dtype == np.float32 and scaling == pytest.approx(ref_scaling, rel=1e-12)
    # float32 pow differs by an ulp between torch's vectorised kernel and numpy's powf: allow 4 ulp
    np.testing.assert_allclose(np.asarray(inv_freq), ref.numpy(), rtol=4 * 2**-23)


def test_dynamic_keeps_default_frequencies_within_max_positions():
    rope = RopeConfig.from_hf(ROPES["dynamic"], 10000.0, MAX_POS)
    default, _ = inv_frequencies(RopeConfig(rope_theta=10000.0), HEAD_DIM, MAX_POS)
    within, _ = inv_frequencies(rope, HEAD_DIM, MAX_POS, np.int32(MAX_POS))
    np.testing.assert_array_equal(np.asarray(within), np.asarray(default))


def test_rotation_matches_transformers():
    rng = np.random.RandomState(0)
    q = rng.randn(2, 5, 3, HEAD_DIM).astype(np.float32)  # [B, T, H, D]
    positions = np.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]], np.int32)
    inv_freq, scaling = inv_frequencies(RopeConfig.from_hf(ROPES["yarn"], 0, MAX_POS), HEAD_DIM, MAX_POS)
    cos, sin = rope_tables(positions, inv_freq, scaling, np.float32)
    ref, _ = apply_rotary_pos_emb(torch.tensor(q).transpose(1, 2), torch.tensor(q).transpose(1, 2),
                                  torch.tensor(np.asarray(cos)), torch.tensor(np.asarray(sin)))
    np.testing.assert_allclose(np.asarray(apply_rope(q, cos, sin)), ref.transpose(1, 2).numpy(), atol=1e-6)
