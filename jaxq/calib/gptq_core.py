"""GPTQ, the maths: quantize a linear weight column by column, pushing each column's rounding error onto the
columns not yet quantized through the inverse Hessian of the layer's least-squares objective.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023 (arXiv:2210.17323): Algorithm 1 (Cholesky form of the inverse Hessian, lazy batch
updates in blocks of 128 columns) and its act-order extension ("desc_act"); steps as in spec/formats.md 6.5.

Objective, for W [N, K] and calibration inputs X [T, K]: minimise ||X W^T - X Q^T||^2 over grid points Q,
whose Hessian per output row is H = 2 X^T X / T (any positive multiple gives the same result: only the
damping is relative to mean(diag H)). Everything here is float32 jnp; `gptq` is jitted per shape.

INT4 grid: every group of `group_size` columns has a scale s and zero point z per row (from
jaxq.formats.quantize_int4's scheme, i.e. the producer's rounding convention), codes
u = clip(round(w / s) + z, 0, 15) and values (u - z) * s. Column processing orders:
  natural: columns 0..K-1; a group's (s, z) come from its columns' current, error-updated values when its
           first column is reached (AutoGPTQ desc_act=False; here the update of columns earlier in the same
           128-block is included, so the blocked result equals the column-by-column algorithm exactly).
  static:  columns in descending diag(H), groups still k // G with (s, z) computed up front from the
           original W (llm-compressor's actorder="static"; the stored layout needs no g_idx).
  group:   columns in descending diag(H); group j is processed columns j*G..(j+1)*G-1, (s, z) as in
           natural; the layout needs g_idx[k] = (position of k in that order) // G (AutoGPTQ desc_act=True).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxq.formats import quantize_int4
from jaxq.formats.int4 import SYMMETRIC_ZERO, g_idx_from_perm
from jaxq.quantize.weights import int4_codes

ORDERS = ("natural", "static", "group")


class GPTQResult(NamedTuple):
    """codes: uint8 [N, K] unsigned INT4 codes in the original column order; scale: float32 [N, K/G];
    zero: float32 [N, K/G] or None (symmetric: 8); g_idx: int32 [K] ("group" order) or None (g(k) = k // G);
    error: float32 [] the objective tr((W - Q) H (W - Q)^T) / N with the undamped H (for reports)."""

    codes: jax.Array
    scale: jax.Array
    zero: jax.Array | None
    g_idx: jax.Array | None
    error: jax.Array


def prepare_hessian(h, w):
    """Dead inputs (H_kk = 0: the channel never fired) get H_kk = 1 and a zero weight column, as the
    reference does, so the Cholesky factorisation exists and the column quantizes to 0. Returns (H, W)."""
    dead = jnp.diag(h) == 0
    return h + jnp.diag(dead.astype(h.dtype)), jnp.where(dead[None, :], 0.0, w)


def processing_order(h, order: str):
    """The column order perm (perm[j] = the j-th column processed): identity for "natural", descending
    diag(H) (stable) for "static" and "group"."""
    if order not in ORDERS:
        raise ValueError(f"gptq: order={order!r}, expected one of {ORDERS}")
    k = h.shape[0]
    return jnp.arange(k, dtype=jnp.int32) if order == "natural" else jnp.argsort(-jnp.diag(h), stable=True)


# A Cholesky pivot whose square is under this fraction of its diagonal entry (64 float32 ulps) leaves a column
# that is, to rounding, a combination of the earlier ones: H is singular there, whichever sign the rounding
# gave the pivot (an exactly duplicated input channel with damping 1e-9 gives 1.8e-7; damping 0.01 keeps every
# pivot above 1e-2 * mean(diag H) / H_jj).
PIVOT_FLOOR = 64 * float(jnp.finfo(jnp.float32).eps)


@jax.jit
def inverse_cholesky(h, damp):
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, i.e. U^T U = H_damped^-1, float32 [K, K].
    All NaN when H_damped is not numerically positive definite (a pivot of its Cholesky factor L with
    L_jj^2 < PIVOT_FLOOR * H_damped_jj, or none): the caller raises damp and retries."""
    k = h.shape[0]
    eye = jnp.eye(k, dtype=h.dtype)
    damped = h + damp * jnp.mean(jnp.diag(h)) * eye
    lower = jnp.linalg.cholesky(damped)
    definite = jnp.all(jnp.diag(lower) ** 2 >= PIVOT_FLOOR * jnp.diag(damped))
    u = jnp.linalg.cholesky(jax.scipy.linalg.cho_solve((lower, True), eye)).T
    return jnp.where(definite, u, jnp.nan)


@functools.partial(jax.jit, static_argnames=("group_size", "scheme", "order", "block_size"))
def gptq(w, h, u, perm, *, group_size: int, scheme: str, order: str = "natural", block_size: int = 128) -> GPTQResult:
    """GPTQ-quantize w [N, K] float32 with its Hessian h [K, K] (both after prepare_hessian, original column
    order), perm = processing_order(h, order) and u = inverse_cholesky(h[perm][:, perm], damp).

    group_size G divides K (G = K: one group per row, grid from the original W). scheme: a
    jaxq.formats.quantize_int4 scheme (symmetric ones return zero None). order: module docstring.
    Columns go in blocks (lazy batch updates): one group per block when grids follow the updated weights,
    else the largest divisor of K up to block_size. One loop body is compiled per shape.
    """
    n, k = w.shape
    dynamic = order != "static" and group_size < k
    wp = w[:, perm]
    if dynamic:
        block = group_size
        col_scale = col_zero = None
    else:  # every column's grid from the original W, in its original group k // G
        ref = quantize_int4(w, group_size, scheme=scheme)
        col_scale, col_zero = ref.scale[:, perm // group_size], _zeros(ref)[:, perm // group_size]
        block = max(b for b in range(1, min(block_size, k) + 1) if k % b == 0)
    symmetric = quantize_int4(w[:1, :group_size], group_size, scheme=scheme).zero is None

    def one_block(b, carry):
        wp, codes, scales, zeros = carry
        c0 = b * block
        wb = lax.dynamic_slice_in_dim(wp, c0, block, axis=1)
        if dynamic:  # the group's grid from its columns' values updated by every earlier block
            grid = quantize_int4(wb, group_size, scheme=scheme)
            scales, zeros = scales.at[:, b].set(grid.scale[:, 0]), zeros.at[:, b].set(_zeros(grid)[:, 0])
            s, z = jnp.broadcast_to(grid.scale, wb.shape), jnp.broadcast_to(_zeros(grid), wb.shape)
        else:
            s = lax.dynamic_slice_in_dim(col_scale, c0, block, axis=1)
            z = lax.dynamic_slice_in_dim(col_zero, c0, block, axis=1)
        qb, errb = _quantize_block(wb, lax.dynamic_slice(u, (c0, c0), (block, block)), s, z)
        codes = lax.dynamic_update_slice_in_dim(codes, qb, c0, axis=1)
        # Lazy batch update of the later columns (U's rows are zero left of the diagonal, so earlier columns
        # are untouched; the block's own columns change but are already quantized).
        wp = wp - _dot(errb, lax.dynamic_slice_in_dim(u, c0, block, axis=0))
        return wp, codes, scales, zeros

    groups = k // group_size
    init = (wp, jnp.zeros_like(wp), jnp.zeros((n, groups), jnp.float32), jnp.zeros((n, groups), jnp.float32))
    _, codes, scales, zeros = lax.fori_loop(0, k // block, one_block, init)
    codes = codes[:, jnp.argsort(perm)].astype(jnp.uint8)
    if dynamic:
        scale, zero = scales, None if symmetric else zeros
        g_idx = g_idx_from_perm(perm, group_size) if order == "group" else None
    else:
        scale, zero, g_idx = ref.scale, None if symmetric else _zeros(ref), None
    z = jnp.full_like(scale, SYMMETRIC_ZERO) if zero is None else zero
    delta = (codes - _expand(z, g_idx, group_size)) * _expand(scale, g_idx, group_size) - w
    return GPTQResult(codes, scale, zero, g_idx, jnp.sum(_dot(delta, h) * delta) / n)


def _quantize_block(wb, ub, s, z):
    """One block of columns with grid (s, z) [N, B] and the block's factor ub [B, B]: quantize column c and
    move its error onto the block's later columns, w[:, c:] -= err * U[c, c:] (U is upper triangular, so
    earlier columns keep their values). Returns (codes [N, B], errors / U_cc [N, B])."""

    def column(c, carry):
        wb, qb, errb = carry
        col = lax.dynamic_index_in_dim(wb, c, axis=1, keepdims=False)  # [N]
        sc = lax.dynamic_index_in_dim(s, c, axis=1, keepdims=False)
        zc = lax.dynamic_index_in_dim(z, c, axis=1, keepdims=False)
        code = int4_codes(col, sc, zc)
        err = (col - (code - zc) * sc) / ub[c, c]
        wb = wb - err[:, None] * ub[c][None, :]
        qb = lax.dynamic_update_index_in_dim(qb, code, c, axis=1)
        errb = lax.dynamic_update_index_in_dim(errb, err, c, axis=1)
        return wb, qb, errb

    _, qb, errb = lax.fori_loop(0, wb.shape[1], column, (wb, jnp.zeros_like(wb), jnp.zeros_like(wb)))
    return qb, errb


def _dot(a, b):
    return jnp.matmul(a, b, precision=lax.Precision.HIGHEST)  # full float32 on GPUs too (TF32 is the default)


def _zeros(t):
    """An Int4Tensor's zero points as float32 (8 everywhere for symmetric)."""
    if t.zero is None:
        return jnp.full(t.scale.shape, SYMMETRIC_ZERO, jnp.float32)
    return t.zero.astype(jnp.float32)


def _expand(per_group, g_idx, group_size):
    """[N, K/G] -> [N, K] along the column -> group map."""
    if g_idx is not None:
        return jnp.take(per_group, g_idx, axis=1)
    return jnp.repeat(per_group, group_size, axis=1)
