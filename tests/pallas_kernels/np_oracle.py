"""Independent NumPy oracles (float64 dequantize-then-matmul) and random quantized operands for the
kernel tests. Nothing here imports pallas_kernels."""
import zlib

import ml_dtypes
import numpy as np

E2M1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float64)


def unpack(packed):
    """uint8 [N, K/2] -> codes [N, K]; low nibble = even k."""
    p = np.asarray(packed).astype(np.int64)
    out = np.empty((p.shape[0], p.shape[1] * 2), np.int64)
    out[:, 0::2] = p & 15
    out[:, 1::2] = p >> 4
    return out


def pack(codes):
    c = np.asarray(codes).astype(np.uint8)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).astype(np.uint8)


def f64(a):
    return np.asarray(a).astype(np.float32).astype(np.float64)


def int4_weight(packed, scale, zero=None, g_idx=None):
    u = unpack(packed).astype(np.float64)
    k = u.shape[1]
    g = np.arange(k) // (k // scale.shape[1]) if g_idx is None else np.asarray(g_idx)
    z = 8.0 if zero is None else f64(zero)[:, g]
    return (u - z) * f64(scale)[:, g]


def nvfp4_weight(packed, block_scale, global_scale):
    return E2M1[unpack(packed)] * np.repeat(f64(block_scale), 16, axis=1) * float(global_scale)


def mxfp4_weight(packed, scale):
    return E2M1[unpack(packed)] * np.repeat(2.0 ** (np.asarray(scale, np.float64) - 127), 32, axis=1)


def e4m3(v):
    return np.clip(np.asarray(v, np.float64), -448, 448).astype(np.float32).astype(ml_dtypes.float8_e4m3fn)


def w4a8(x, packed, weight_scale, input_scale):
    """Grouped fp8 x int4 sum, rescaled per group (pallas_kernels/w4a8.py numerics)."""
    xq = f64(e4m3(f64(x) / float(input_scale)))
    q = unpack(packed) - 8.0
    n, ng = weight_scale.shape
    g = x.shape[1] // ng
    y = sum((xq[:, j * g:(j + 1) * g] @ q[:, j * g:(j + 1) * g].T) * f64(weight_scale)[:, j][None]
            for j in range(ng))
    return y * float(input_scale)


def fp8_x_fp4(xq, x_scale, packed, block_scale, block, global_scale=1.0):
    """E4M3 codes x FP4 weights as pallas_kernels/w4a8_fp4.py computes them: per-block sums of
    codes x E2M1 values, each times its block scale (block 16: E4M3 value, 32: E8M0 2^(u - 127)), summed
    over blocks, times x_scale and global_scale."""
    x, v = f64(xq), E2M1[unpack(packed)]
    bs = np.asarray(block_scale)
    s = f64(bs) if block == 16 else 2.0 ** (bs.astype(np.float64) - 127)
    y = sum((x[:, j * block:(j + 1) * block] @ v[:, j * block:(j + 1) * block].T) * s[:, j][None]
            for j in range(s.shape[1]))
    return y * float(x_scale) * float(global_scale)


def fp8_block(x, wq, w_scale):
    """1x128 dynamic activation quantization and 128x128 block-scaled weights."""
    x = f64(x)
    m, k = x.shape
    y = 0.0
    for b in range(0, k, 128):
        xb = x[:, b:b + 128]
        sx = np.maximum(np.abs(xb).max(axis=1), 1e-4) / 448.0
        xq = f64(e4m3(xb / sx[:, None]))
        sw = np.repeat(f64(w_scale)[:, b // 128], 128)[: wq.shape[0]]
        y = y + (xq @ f64(wq)[:, b:b + 128].T) * sx[:, None] * sw[None, :]
    return y


def rng_for(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def rand_x(rng, m, k, dtype=ml_dtypes.bfloat16):
    return rng.standard_normal((m, k)).astype(dtype)


def rand_e4m3_x(rng, m, k):
    """E4M3 activation codes spread over the format: normals, subnormals, zeros and +-448."""
    v = rng.standard_normal((m, k)) * 2.0 ** rng.integers(-12, 9, (m, k))
    v[rng.random((m, k)) < 0.05] = 0.0
    v[rng.random((m, k)) < 0.01] = 448.0
    return e4m3(v)


def rand_packed(rng, n, k):
    return rng.integers(0, 256, (n, k // 2), dtype=np.uint8)


def check_close(out, ref, tol=1e-2):
    """|out - ref| <= tol * |ref| + tol * rms(ref), every element written (no NaN left from the poison)."""
    out = np.asarray(out).astype(np.float64)
    ref = np.asarray(ref, np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert np.isfinite(out).all(), f"{np.size(out) - np.isfinite(out).sum()} non-finite outputs"
    rms = np.sqrt(np.mean(ref**2))
    err = np.abs(out - ref)
    bound = tol * np.abs(ref) + tol * rms
    worst = np.argmax(err - bound)
    assert (err <= bound).all(), f"max err {err.max():.4g} (rms ref {rms:.4g}) at {np.unravel_index(worst, err.shape)}"
