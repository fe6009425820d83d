"""FP8 KV-cache scales calibrated on text: per layer k_scale = amax(k after RoPE) / 448 and v_scale =
amax(v) / 448, ModelOpt's max calibration of its k/v bmm quantizers (exported as k_scale / v_scale).

The keys and values are read back from a float32 KV cache the model wrote, so they are exactly what
attention consumes (after RoPE, before any GQA repeat) and the models need no capture hook.
"""

import functools

import jax
import jax.numpy as jnp

from jaxq.eval import text_token_ids, token_windows
from jaxq.formats.elements import E4M3_MAX
from jaxq.loaded_model import LoadedModel


@functools.partial(jax.jit, static_argnames=("module", "family", "config"))
def _kv_amax(module, family, config, params, tokens):
    """Per-layer amax of |k after RoPE| and |v| over tokens [B, T]: run them through a float32 cache of length T
    (the cache holds exactly the keys/values attention uses) and reduce it. Returns ([L], [L]) float32."""
    cache = family.init_kv_cache(config, tokens.shape[0], tokens.shape[1], jnp.float32)
    _, cache = module.apply({"params": params}, tokens, cache=cache,
                            logits_index=jnp.zeros(tokens.shape[0], jnp.int32))  # skip the [B, T, V] logits
    amax = lambda xs: jnp.stack([jnp.max(jnp.abs(x)) for x in xs])
    return amax(cache.k), amax(cache.v)


def calibrate_kv_scales(model: LoadedModel, text_or_ids, window: int = 512, max_windows: int = 8) -> LoadedModel:
    """The model with `kv_scales` calibrated on text (or token ids): up to max_windows windows of `window`
    tokens (jaxq.eval.token_windows), each run from position 0; amax is the maximum over all of them."""
    windows = token_windows(text_token_ids(model, text_or_ids), window, max_windows)
    k_amax = v_amax = jnp.zeros((model.num_layers,), jnp.float32)
    for row in windows:
        k, v = _kv_amax(model.module, model.family, model.config, model.params, jnp.asarray(row[None]))
        k_amax, v_amax = jnp.maximum(k_amax, k), jnp.maximum(v_amax, v)
    # A layer whose keys or values are all zero would get scale 0 and divide by it; the tiny floor avoids that.
    tiny = jnp.finfo(jnp.float32).tiny
    return model.replace(kv_scales=(jnp.maximum(k_amax / E4M3_MAX, tiny), jnp.maximum(v_amax / E4M3_MAX, tiny)))
