"""KV cache storage: ModelOpt's FP8 op order bit for bit, per-row writes, dropping out-of-range writes."""
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxq.nn.kv_cache import KVCache


def test_fp8_storage_follows_modelopt_op_order():
    """amax = scale * 448, s = 448 / amax, q = e4m3(clamp(x * s)), read back q * (1 / s), all float32."""
    rng = np.random.RandomState(0)
    scale = np.float32(0.0031)  # a calibrated k_scale as in the fixtures (amax / 448), not clamped to 1
    x = (rng.randn(1, 3, 2, 16) * 0.5).astype(np.float32)
    x[0, 0, 0, :2] = [10.0, -10.0]  # |x * s| > 448: must saturate, not become NaN
    cache = KVCache.create(1, 1, 4, 2, 16, jnp.float8_e4m3fn, k_scale=scale, v_scale=scale)
    layer = cache.layer(0).write(jnp.asarray(x), jnp.asarray(x), jnp.arange(3, dtype=jnp.int32)[None])
    s = np.float32(448.0) / (scale * np.float32(448.0))
    q = np.clip(x * s, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    q = q.transpose(0, 2, 1, 3)  # the cache's [B, H_kv, S, D]
    np.testing.assert_array_equal(np.asarray(layer.k[:, :, :3]).view(np.uint8), q.view(np.uint8))
    k, _ = layer.read(jnp.float32)
    np.testing.assert_array_equal(np.asarray(k[:, :, :3]), q.astype(np.float32) * (np.float32(1.0) / s))
    assert np.isfinite(np.asarray(k)).all() and np.asarray(k)[0, 0, 0, 0] == np.float32(448.0) / s


def test_per_row_positions_and_dropped_overflow():
    cache = KVCache.create(2, 2, 4, 2, 3, jnp.float32)  # two kv heads: the write must keep heads apart
    new = jnp.arange(2 * 3 * 2 * 3, dtype=jnp.float32).reshape(2, 3, 2, 3) + 1  # [B, T, H_kv, D]
    cache = cache.replace(lengths=jnp.array([0, 2], jnp.int32))
    layer = cache.layer(1).write(new, new, cache.positions(3))  # row 1 writes positions 2, 3, 4 (4 >= S_max)
    k = np.asarray(layer.k).transpose(0, 2, 1, 3)  # [B, S_max, H_kv, D]
    np.testing.assert_array_equal(k[0, :3], new[0])
    np.testing.assert_array_equal(k[0, 3], 0)
    np.testing.assert_array_equal(k[1, :2], 0)  # untouched: a clamped write would have shifted onto them
    np.testing.assert_array_equal(k[1, 2:], new[1, :2])
    advanced = cache.advance([cache.layer(0), layer], jnp.array([3, 1], jnp.int32))
    assert advanced.lengths.tolist() == [3, 3] and advanced.k[1] is layer.k


def test_nbytes_fp8_is_half_of_bf16():
    sizes = (3, 2, 16, 4, 8)
    assert KVCache.create(*sizes, jnp.float8_e4m3fn).nbytes() * 2 == KVCache.create(*sizes, jnp.bfloat16).nbytes()
    assert KVCache.create(*sizes, jnp.bfloat16).nbytes() == 2 * 3 * (2 * 16 * 4 * 8) * 2
