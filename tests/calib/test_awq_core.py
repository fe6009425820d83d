"""awq_core: the searched smoothing beats round to nearest on a layer with outlier input channels, clipping
never hurts and helps heavy-tailed weights, and the output-error identity the search relies on."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.calib import awq_core
from jaxq.quantize.weights import fake_quant_weight
from jaxq.recipes import get_recipe

RECIPE = get_recipe("w4a16_awq", group_size=32)
FQ = functools.partial(fake_quant_weight, recipe=RECIPE)


def outlier_layer(n=64, k=128, t=2048, seed=0):
    """W [n, k] and inputs X [t, k] where 1 channel in 32 is 30x larger than the rest (as in LLM activations)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(t, k)).astype(np.float32)
    x[:, 8::32] *= 30.0
    return jnp.asarray(rng.normal(size=(n, k)).astype(np.float32)), jnp.asarray(x)


def test_output_error_is_the_mean_squared_output_error():
    w, x = outlier_layer(8, 32, 256)
    delta = FQ(w) - w
    direct = jnp.mean(jnp.sum((x @ delta.T) ** 2, axis=1)) / 8
    assert float(awq_core.output_error(delta, x.T @ x / 256)) == pytest.approx(float(direct), rel=1e-4)


def test_alpha_grid():
    assert awq_core.alpha_grid(0.1) == tuple(i / 10 for i in range(11))
    assert awq_core.alpha_grid(1.0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="must divide 1"):
        awq_core.alpha_grid(0.3)


def test_searched_scale_beats_round_to_nearest_on_outlier_channels():
    w, x = outlier_layer()
    sigma, act_mean = x.T @ x / x.shape[0], jnp.mean(jnp.abs(x), axis=0)
    s, losses = jax.jit(awq_core.search_scale, static_argnums=(3, 4, 5))(w, act_mean, sigma, FQ,
                                                                         awq_core.alpha_grid(0.1), 32)
    rtn = float(awq_core.output_error(FQ(w) - w, sigma))
    awq = float(awq_core.output_error(FQ(w * s) / s - w, sigma))
    assert awq == pytest.approx(float(jnp.min(losses)), rel=1e-5)
    assert awq < 0.5 * rtn
    assert float(s[72]) > 1.5 * float(jnp.median(s))  # salient channels are scaled up before rounding
    assert bool(jnp.all(jnp.isfinite(s))) and float(jnp.min(s)) > 0


@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_search_never_hurts_and_helps_heavy_tailed_weights(symmetric):
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.laplace(size=(32, 128)).astype(np.float32))
    _, x = outlier_layer(32, 128, 1024, seed=2)
    sigma = x.T @ x / x.shape[0]
    recipe = RECIPE.replace(symmetric=symmetric)
    fq = functools.partial(fake_quant_weight, recipe=recipe)
    ratios = tuple(round(1 - 0.05 * i, 2) for i in range(11))
    clipped, best = awq_core.search_clip(w, sigma, fq, 32, ratios, symmetric)
    assert best.shape == (32, 4) and float(best.min()) >= 0.5 and float(best.max()) <= 1.0
    assert float(jnp.mean(best)) < 1.0  # some groups clip
    before, after = (float(awq_core.output_error(fq(v) - w, sigma)) for v in (w, clipped))
    assert after < 0.95 * before

