"""gptq_core: beats round to nearest on correlated inputs, equals a column-by-column NumPy GPTQ, act-order
g_idx, asymmetric zero points; the integration raises the damping of a singular Hessian and says so."""
import logging

import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.calib import gptq_core
from jaxq.calib.gptq import GPTQConfig, gptq_quantize
from jaxq.calib.sequential import InputStats
from jaxq.formats import quantize_int4, sort_by_g_idx
from jaxq.formats.int4 import Int4Tensor
from jaxq.recipes import get_recipe


def correlated_layer(n, k, t, seed=0):
    """W [n, k] and inputs X [t, k] whose channels are correlated and of unequal scale (as LLM activations)."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(k, k)) / np.sqrt(k) + np.eye(k)
    x = (rng.normal(size=(t, k)) * rng.uniform(0.2, 3.0, size=k)) @ mix
    return rng.normal(size=(n, k)).astype(np.float32), x.astype(np.float32)


def stats_of(x):
    x = jnp.asarray(x)
    return InputStats(x.shape[0], jnp.max(jnp.abs(x), 0), jnp.mean(jnp.abs(x), 0), x.T @ x / x.shape[0])


def output_mse(x, w, wq):
    return float(np.mean((x @ (np.asarray(w) - np.asarray(wq)).T) ** 2))


@pytest.mark.parametrize("recipe", [get_recipe("w4a16_gptq", group_size=32),
                                    get_recipe("w4a16_gptq", group_size=32, symmetric=False),
                                    get_recipe("w4a16_gptq", group_size=32, act_order=True)])
@pytest.mark.parametrize("order", ["static", "natural"])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(recipe, order):
    w, x = correlated_layer(48, 128, 1024)
    t, notes = gptq_quantize("l", w, stats_of(x), recipe, GPTQConfig(order=order))
    rtn = quantize_int4(w, 32, scheme="gptq" if recipe.symmetric else "gptq_asym")
    assert notes == []
    assert output_mse(x, w, t.dequantize()) < 0.7 * output_mse(x, w, rtn.dequantize())


def numpy_gptq(w, h, group, damp, sym):
    """GPTQ one column at a time (no lazy blocks), float64, natural order, each group's grid from its
    columns' current values: the algorithm gptq_core implements in blocks. Grids: ModelOpt's symmetric
    s = amax / 7 (no exact .5 ties, which float32 and float64 would break differently) or GPTQ's asymmetric."""
    w, h = w.astype(np.float64).copy(), h.astype(np.float64)
    k = h.shape[0]
    hd = h + damp * np.mean(np.diag(h)) * np.eye(k)
    u = np.linalg.cholesky(np.linalg.inv(hd)).T
    codes = np.zeros_like(w)
    scales, zeros = [], []
    for i in range(k):
        if i % group == 0:
            g = w[:, i:i + group]
            lo, hi = np.minimum(g.min(1), 0), np.maximum(g.max(1), 0)
            s = np.abs(g).max(1) / 7 if sym else (hi - lo) / 15
            z = np.full_like(s, 8.0) if sym else np.round(-lo / s)
            scales.append(s)
            zeros.append(z)
        codes[:, i] = np.clip(np.round(w[:, i] / s) + z, 0, 15)
        err = (w[:, i] - (codes[:, i] - z) * s) / u[i, i]
        w[:, i:] -= np.outer(err, u[i, i:])
    return codes, np.stack(scales, 1), np.stack(zeros, 1)


@pytest.mark.parametrize("sym", [True, False])
def test_blocked_gptq_equals_the_column_by_column_reference(sym):
    w, x = correlated_layer(6, 32, 256, seed=1)
    h = x.T @ x / len(x)
    perm = gptq_core.processing_order(jnp.asarray(h), "natural")
    u = gptq_core.inverse_cholesky(jnp.asarray(h), 0.01)
    res = gptq_core.gptq(jnp.asarray(w), jnp.asarray(h), u, perm, group_size=8,
                         scheme="modelopt" if sym else "gptq_asym", order="natural", block_size=16)
    codes, scales, zeros = numpy_gptq(w, h, 8, 0.01, sym)
    np.testing.assert_array_equal(np.asarray(res.codes), codes)
    np.testing.assert_allclose(np.asarray(res.scale), scales, rtol=1e-5)
    if sym:
        assert res.zero is None
    else:
        np.testing.assert_array_equal(np.asarray(res.zero), zeros)


def test_act_order_g_idx_is_valid_and_follows_the_hessian_diagonal():
    w, x = correlated_layer(16, 128, 512, seed=2)
    recipe = get_recipe("w4a16_gptq", group_size=32, act_order=True)
    t, _ = gptq_quantize("l", w, stats_of(x), recipe, GPTQConfig())
    g_idx = np.asarray(t.g_idx)
    assert sorted(np.bincount(g_idx).tolist()) == [32] * 4
    order = np.argsort(-np.diag(x.T @ x), kind="stable")
    np.testing.assert_array_equal(g_idx[order], np.arange(128) // 32)
    # the formats' own act-order layout: sorting by g_idx (what kernels do) keeps every value
    contiguous, perm = sort_by_g_idx(t)
    np.testing.assert_array_equal(np.asarray(contiguous.dequantize()), np.asarray(t.dequantize())[:, perm])


def test_asymmetric_zero_points_are_in_range():
    w, x = correlated_layer(16, 64, 512, seed=3)
    w = w + 0.5  # one-sided rows need real zero points
    t, _ = gptq_quantize("l", w, stats_of(x), get_recipe("w4a16_gptq", group_size=32, symmetric=False),
                         GPTQConfig())
    assert isinstance(t, Int4Tensor) and t.zero.dtype == jnp.uint8
    assert 0 <= int(t.zero.min()) < 8 and int(t.zero.max()) <= 15  # shifted rows: zero points below 8
    assert np.all(np.isfinite(np.asarray(t.scale))) and float(t.scale.min()) > 0


def test_singular_hessian_raises_the_damping_and_reports_it(caplog):
    w, x = correlated_layer(8, 32, 512, seed=4)
    x[:, 5] = x[:, 4]  # duplicated channel: H is singular
    x[:, 7] = 0.0  # a dead channel is handled without damping (H_77 = 1, zero weights)
    with caplog.at_level(logging.WARNING):
        t, notes = gptq_quantize("model.layers.3.mlp.down_proj", w, stats_of(x), get_recipe("w4a16_gptq", group_size=32),
                                 GPTQConfig(damp_percent=1e-9))
    assert notes and "model.layers.3.mlp.down_proj: GPTQ damping raised from 1e-09" in notes[0]
    assert notes[0] in caplog.text
    assert np.all(np.isfinite(np.asarray(t.dequantize())))
    assert np.all(np.asarray(t.dequantize())[:, 7] == 0)


def test_unusable_statistics_are_refused_naming_the_layer():
    w, x = correlated_layer(8, 32, 64)
    bad = stats_of(x)
    bad.second_moment = bad.second_moment.at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match="layer model.layers.0.self_attn.q_proj: GPTQ needs finite input"):
        gptq_quantize("model.layers.0.self_attn.q_proj", w, bad, get_recipe("w4a16_gptq", group_size=32), GPTQConfig())
    with pytest.raises(ValueError, match="GPTQ is implemented for INT4 recipes"):
        gptq_quantize("l", w, stats_of(x), get_recipe("nvfp4"), GPTQConfig())


def test_a_column_dependent_to_rounding_counts_as_singular():
    """Two equal input channels make H singular; whether float32 rounding leaves the Cholesky pivot a tiny
    positive or a negative number, inverse_cholesky reports it (NaN) at damping 1e-9 and factors it at 0.01,
    where U^T U inverts the damped H."""
    _, x = correlated_layer(4, 32, 512, seed=9)
    x[:, 11] = x[:, 3]
    h = jnp.asarray(x.T @ x / x.shape[0])
    assert not np.isfinite(np.asarray(gptq_core.inverse_cholesky(h, 1e-9))).any()
    u = np.asarray(gptq_core.inverse_cholesky(h, 0.01), np.float64)
    damped = np.asarray(h, np.float64) + 0.01 * np.mean(np.diag(h)) * np.eye(32)
    np.testing.assert_allclose(u.T @ u @ damped, np.eye(32), atol=2e-3)
