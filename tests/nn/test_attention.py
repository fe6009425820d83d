"""Grouped-query attention against a NumPy reference that repeats k/v per head, and the mask rules."""
import jax
import jax.numpy as jnp
import numpy as np

from jaxq.nn.attention import causal_mask, dot_product_attention, softcap


def _reference(q, k, v, mask, scale, cap):
    """float64 NumPy: repeat kv heads (query head h -> kv head h // group), softcap, mask, softmax."""
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scores = np.einsum("bthd,bshd->bhts", q, k) * scale
    if cap is not None:
        scores = cap * np.tanh(scores / cap)
    scores = np.where(mask[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", probs, v)


def test_gqa_with_mask_and_softcap_matches_reference():
    rng = np.random.RandomState(0)
    q = rng.randn(2, 5, 6, 8)  # [B, T, H, D]
    k, v = rng.randn(2, 7, 2, 8), rng.randn(2, 7, 2, 8)  # [B, S, H_kv, D] for the reference
    positions = np.array([[2, 3, 4, 5, 6], [0, 1, 2, 3, 4]])
    valid = np.array([[1] * 7, [1, 1, 1, 1, 0, 0, 0]])
    mask = np.asarray(causal_mask(jnp.asarray(positions), jnp.asarray(np.tile(np.arange(7), (2, 1))),
                                  jnp.asarray(valid), sliding_window=3))
    for cap in (None, 2.0):
        with jax.default_matmul_precision("highest"):  # a GPU's default float32 matmul is TF32-class
            heads_first = lambda x: jnp.asarray(x.transpose(0, 2, 1, 3), jnp.float32)  # [B, H_kv, S, D]
            got = dot_product_attention(jnp.asarray(q, jnp.float32), heads_first(k), heads_first(v),
                                        jnp.asarray(mask), 0.3, cap)
        np.testing.assert_allclose(np.asarray(got), _reference(q, k, v, mask, 0.3, cap), atol=2e-6)


def test_causal_mask_rules():
    q_pos = jnp.array([[4]])
    kv_pos = jnp.arange(6)[None]
    # causal: keys at positions <= 4; window 3: 4 - j < 3 -> j in {2, 3, 4} (transformers' convention)
    assert causal_mask(q_pos, kv_pos)[0, 0].tolist() == [True] * 5 + [False]
    assert causal_mask(q_pos, kv_pos, sliding_window=3)[0, 0].tolist() == [False, False, True, True, True, False]
    valid = jnp.array([[1, 0, 1, 1, 1, 1]])
    assert causal_mask(q_pos, kv_pos, valid)[0, 0].tolist() == [True, False, True, True, True, False]


def test_fully_masked_row_is_finite():
    q = k = v = jnp.ones((1, 1, 2, 4))
    out = dot_product_attention(q, k, v, jnp.zeros((1, 1, 1), bool), 1.0)
    assert np.isfinite(np.asarray(out)).all()


def test_softcap_bounds_and_identity():
    x = jnp.array([-100.0, -1.0, 0.0, 1.0, 100.0])
    assert np.abs(np.asarray(softcap(x, 5.0))).max() <= 5.0
    np.testing.assert_array_equal(np.asarray(softcap(x, None)), np.asarray(x))


def test_bf16_gqa_runs_op_by_op_and_follows_float32():
    """Outside jit (each op compiled alone, as an eager model.apply runs it) bf16 attention with grouped heads
    must run on every backend (XLA CPU has no bf16 dot that permutes its output) and follow float32."""
    rng = np.random.RandomState(3)
    q = jnp.asarray(rng.randn(2, 1, 6, 16), jnp.float32)
    k, v = jnp.asarray(rng.randn(2, 2, 40, 16), jnp.float32), jnp.asarray(rng.randn(2, 2, 40, 16), jnp.float32)
    mask = jnp.ones((2, 1, 40), bool)
    want = np.asarray(dot_product_attention(q, k, v, mask, 0.25))
    bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    got = np.asarray(dot_product_attention(*bf16, mask, 0.25).astype(jnp.float32))
    np.testing.assert_allclose(got, want, atol=3e-2, rtol=3e-2)
