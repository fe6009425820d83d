"""Input validation shared by the quantizers and layout converters.

Every check raises ValueError naming the calling function, the argument, the expected and the actual
value. Shape and dtype checks always run (shapes are static under jit); value checks (NaN/Inf, integer
ranges) run only on concrete arrays and are skipped for tracers.
"""

import jax
import jax.numpy as jnp


def is_concrete(x) -> bool:
    """True when x holds values (not a tracer inside jit/vmap/grad)."""
    return not isinstance(x, jax.core.Tracer)


def check_floating(fn: str, name: str, x) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{fn}: {name} has dtype {x.dtype}, expected a floating dtype (float32/bfloat16/float16)")


def check_dtype(fn: str, name: str, x, *dtypes) -> None:
    if x.dtype not in [jnp.dtype(d) for d in dtypes]:
        expected = " or ".join(jnp.dtype(d).name for d in dtypes)
        raise ValueError(f"{fn}: {name} has dtype {x.dtype}, expected {expected}")


def check_rank(fn: str, name: str, x, min_ndim: int) -> None:
    if x.ndim < min_ndim:
        raise ValueError(f"{fn}: {name} has shape {tuple(x.shape)}, expected at least {min_ndim} dims")


def check_multiple(fn: str, name: str, dim: str, size: int, multiple: int, what: str) -> None:
    if size % multiple:
        raise ValueError(f"{fn}: {name} has {dim}={size}, expected a multiple of {multiple} ({what})")


def check_shape(fn: str, name: str, x, expected: tuple, why: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{fn}: {name} has shape {tuple(x.shape)}, expected {tuple(expected)} ({why})")


def check_packed_fp4(fn: str, packed_name: str, packed, scale_name: str, scale, scale_dtype, block: int) -> None:
    """Packed FP4 parts: packed uint8 [..., N, K/2] and one scale of scale_dtype per block of K."""
    check_dtype(fn, packed_name, packed, jnp.uint8)
    check_rank(fn, packed_name, packed, 2)
    check_dtype(fn, scale_name, scale, scale_dtype)
    k = 2 * packed.shape[-1]
    check_multiple(fn, packed_name, "K", k, block, f"block size, K = 2 * {packed_name}.shape[-1]")
    check_shape(fn, scale_name, scale, (*packed.shape[:-1], k // block), f"one scale per {block} elements of K={k}")


def per_matrix_scale(fn: str, name: str, scale, packed):
    """A checkpoint's per-tensor scale as float32 of shape packed.shape[:-2] (one per trailing [N, K]
    matrix); a size-1 scale ([] or [1]) of a 2-D tensor becomes []."""
    scale = jnp.asarray(scale)
    check_floating(fn, name, scale)
    batch = tuple(packed.shape[:-2])
    if scale.size == 1 and not batch:
        return scale.reshape(()).astype(jnp.float32)
    check_shape(fn, name, scale, batch, "one scale per trailing [N, K] matrix")
    return scale.astype(jnp.float32)


def check_quantizer_input(fn: str, name: str, x, min_ndim: int, block: int = 1, what: str = "") -> None:
    """What every quantizer needs: a finite floating array of at least min_ndim dims whose last axis (K)
    is a multiple of `block` (`what` names the block in the message)."""
    check_floating(fn, name, x)
    check_rank(fn, name, x, min_ndim)
    check_multiple(fn, name, "K", x.shape[-1], block, what)
    check_finite(fn, name, x)


def check_choice(fn: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{fn}: {name}={value!r}, expected one of {tuple(choices)}")


def check_finite(fn: str, name: str, x) -> None:
    """Reject NaN/Inf in a concrete array (a quantizer would silently turn them into garbage codes)."""
    if is_concrete(x):
        bad = int(_count_nonfinite(x))
        if bad:
            raise ValueError(f"{fn}: {name} contains {bad} NaN/Inf values of {x.size}, expected finite values")


def check_positive(fn: str, name: str, x) -> None:
    """Reject zero, negative or non-finite values in a concrete array of scales."""
    if is_concrete(x) and x.size and not bool(jnp.all((x > 0) & jnp.isfinite(x))):
        raise ValueError(f"{fn}: {name} has values in [{float(jnp.min(x))}, {float(jnp.max(x))}], expected finite values > 0")


@jax.jit
def _min_max(x):
    return jnp.min(x), jnp.max(x)


@jax.jit
def _count_nonfinite(x):
    return jnp.sum(~jnp.isfinite(x))


def check_range(fn: str, name: str, x, lo: int, hi: int) -> None:
    """Reject integers outside [lo, hi] in a concrete array."""
    if is_concrete(x) and x.size:
        x_min, x_max = (int(v) for v in _min_max(x))
        if x_min < lo or x_max > hi:
            raise ValueError(f"{fn}: {name} has values in [{x_min}, {x_max}], expected values in [{lo}, {hi}]")
