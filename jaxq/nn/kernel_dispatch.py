"""Which kernel runs a quantized matmul: a small registry that `qmatmul` consults at trace time.

A `Kernel` claims QuantizedWeights by a predicate (recipe, weight layout), one backend and a range of M
(rows of x, static at trace time); `can_use` checks the exact shapes and dtypes. `select_kernel` returns
the most recently registered kernel that claims a call, or None, and `qmatmul` then runs its float32
reference (jaxq.nn.qdense.quantized_matmul_reference). The built-in entries below wire the Pallas/XLA
GEMMs of pallas_kernels (imported only when a kernel runs) for backend "gpu", so a CPU always takes the
reference path.

Kernel numerics against the reference (all accumulate in float32; see the pallas_kernels docstrings):
  nvfp4 / mxfp4 weight-only, fp8_block, fp8_rowwise, and w4a16 at M = 1 or off Hopper: the reference's up
    to summation order and the final rounding (FP8 activation codes come from jaxq.nn.activation_quant).
  w4a16 from M = 2 on Hopper (pallas_kernels.w4a16_mgpu): scales rounded to bf16 and each dequantized
    weight (q - z) * s rounded once to bf16 before the bf16 MMA, as Marlin and TensorRT-LLM's W4A16
    kernels do: each weight within 2**-8 of itself, so an output may differ by 2**-8 (|x| @ |W|^T).
  fp8 (static): x_q = e4m3(x / input_scale), the TRT-LLM/vLLM run-time order, not ModelOpt's
    x * (448 / amax), which differs at FP8 ties (frequent with bf16 inputs).
  nvfp4 W4A4, mxfp4 with FP8 input: the activation fake quant runs in float32 and is rounded to x.dtype
    (bf16) for the W4A16-style kernel (Hopper has no FP4 tensor cores).
  w4a8: pallas_kernels.w4a8 keeps the INT4 weights exact and rescales per group, so it skips the
    reference's FP8 rounding of W with weight_scale_2, and quantizes x as e4m3(x / input_scale) itself.
  Groups (select_group: q, k, v or gate, up in one launch) compute each weight's product as its own call's
    kernel does, up to the K split of the wider [M, sum N] plan (summation order).
  At large M, pallas_kernels.dispatch may pick its 'xla_dequant' path for the 4-bit recipes: weights
    dequantized to bf16 (about 2**-9 relative per weight) and one cuBLAS GEMM.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax

from jaxq.formats import FP8Tensor, Int4Tensor, MXFP4Tensor, NVFP4Tensor
from jaxq.nn.activation_quant import apply_pre_quant_scale, fake_quant_activation, quantize_activation_fp8
from jaxq.nn.quantized_weight import QuantizedWeight

KernelFn = Callable[[jax.Array, QuantizedWeight], jax.Array]  # (x [M, K], weight) -> y [M, N] in x.dtype


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One registered GEMM. matches(weight) picks the recipes/layouts it serves; can_use(x, weight)
    checks shapes and dtypes (the kernel module's can_use_*); fn computes y [M, N] in x.dtype."""

    name: str
    matches: Callable[[QuantizedWeight], bool]
    fn: KernelFn
    backend: str = "gpu"
    min_m: int = 1
    max_m: int | None = None
    can_use: Callable[[jax.Array, QuantizedWeight], bool] = lambda x, w: True  # noqa: E731

    def claims(self, x: jax.Array, weight: QuantizedWeight, backend: str) -> bool:
        m = x.shape[0]
        in_range = self.min_m <= m and (self.max_m is None or m <= self.max_m)
        return self.backend == backend and in_range and self.matches(weight) and self.can_use(x, weight)


_KERNELS: list[Kernel] = []


def register_kernel(name: str, matches: Callable[[QuantizedWeight], bool], fn: KernelFn, *,
                    backend: str = "gpu", min_m: int = 1, max_m: int | None = None,
                    can_use: Callable[[jax.Array, QuantizedWeight], bool] | None = None) -> Kernel:
    """Register a kernel (a later registration wins over earlier ones that claim the same call);
    re-registering a name replaces it. Returns the Kernel (pass it to `unregister_kernel`)."""
    unregister_kernel(name)
    kernel = Kernel(name, matches, fn, backend, min_m, max_m, *([can_use] if can_use else []))
    _KERNELS.append(kernel)
    return kernel


def unregister_kernel(name: str) -> None:
    _KERNELS[:] = [k for k in _KERNELS if k.name != name]


def registered_kernels() -> tuple[Kernel, ...]:
    return tuple(_KERNELS)


def select_kernel(x: jax.Array, weight: QuantizedWeight, backend: str | None = None) -> Kernel | None:
    """The kernel for x [M, K] @ weight^T on `backend` (default: jax.default_backend()), or None."""
    backend = backend or jax.default_backend()
    return next((k for k in reversed(_KERNELS) if k.claims(x, weight, backend)), None)


# ------------------------------------------------------------------------------------------------
# Built-in GPU kernels. The 4-bit ones go through pallas_kernels.dispatch.quantized_matmul, which picks the
# Pallas kernel or an XLA path per (recipe, M bucket) from its measured table; the FP8 ones get their
# activation codes from jaxq.nn.activation_quant, so those match the reference bit for bit. Each entry is
# guarded by the kernel module's can_use_* (an unusable call stays on the reference path).


def _bf16_input(x, w: QuantizedWeight):
    """x after smoothing and the recipe's activation fake quant, in x.dtype (input of a bf16-MMA kernel)."""
    return fake_quant_activation(apply_pre_quant_scale(x, w.pre_quant_scale), w.recipe.activation,
                                 w.input_scale).astype(x.dtype)


def _dispatch(recipe: str, x, weights: dict):
    from pallas_kernels.dispatch import quantized_matmul
    return quantized_matmul(x, recipe, weights)


def _with_rows(weights: dict, w: QuantizedWeight) -> dict:
    """The kernel's weights dict plus the Mosaic kernels' scale rows where w carries them (with_kernel_rows)."""
    return weights if w.kernel_rows is None else {**weights, "mgpu_rows": w.kernel_rows}


def _w4a16(x, w):
    t = w.weight
    weights = _with_rows({"packed": t.packed, "scale": t.scale, "zero": t.zero}, w)
    return _dispatch("w4a16", _bf16_input(x, w), weights)


def _w4a16_ok(x, w):
    from pallas_kernels.w4a16 import can_use_w4a16_matmul
    t = w.weight
    return can_use_w4a16_matmul(x, t.packed, t.scale, t.zero)


def _fp4(x, w):
    t = w.weight
    if isinstance(t, NVFP4Tensor):
        weights = {"packed": t.packed, "block_scale": t.block_scale, "global_scale": t.global_scale}
        return _dispatch("nvfp4", _bf16_input(x, w), weights)
    return _dispatch("mxfp4", _bf16_input(x, w), {"packed": t.packed, "scale": t.scale})


def _fp4_ok(x, w):
    from pallas_kernels.fp4 import MXFP4, NVFP4, can_use_fp4_matmul
    t = w.weight
    if isinstance(t, NVFP4Tensor):
        return t.global_scale.ndim == 0 and can_use_fp4_matmul(NVFP4, x, t.packed, t.block_scale)
    return can_use_fp4_matmul(MXFP4, x, t.packed, t.scale)


def _w4a8(x, w):
    t = w.weight
    weights = _with_rows({"packed": t.packed, "weight_scale": t.scale, "input_scale": w.input_scale}, w)
    # the smoothed x stays float32: the kernel's FP8 quantization then reads the value the reference does
    return _dispatch("w4a8", apply_pre_quant_scale(x, w.pre_quant_scale), weights).astype(x.dtype)


def _w4a8_ok(x, w):
    from pallas_kernels.w4a8 import can_use_w4a8_matmul
    t = w.weight
    return t.zero is None and can_use_w4a8_matmul(x, t.packed, t.scale)


def _fp8_xla(x, w):
    """Per-tensor and rowwise FP8 on XLA's cuBLASLt FP8 GEMM, from quantize_activation_fp8's codes."""
    from pallas_kernels.fp8 import fp8_matmul_xla
    xq = quantize_activation_fp8(apply_pre_quant_scale(x, w.pre_quant_scale), w.recipe.activation, w.input_scale)
    return fp8_matmul_xla(xq.data, xq.scale, w.weight.data, w.weight.scale, out_dtype=x.dtype)


def _fp8_block(x, w):
    """The block-scaled FP8 kernels on pallas_kernels.dispatch.plan's path and tiles: Triton at small M,
    the Mosaic GPU kernel at large M."""
    from pallas_kernels.dispatch import fp8_block_prequantized, plan
    xq = quantize_activation_fp8(apply_pre_quant_scale(x, w.pre_quant_scale), "fp8_group")
    p = plan("fp8_block", x.shape[0], w.shape[0], x.shape[1])
    return fp8_block_prequantized(xq.data, xq.scale, w.weight.data, w.weight.scale, p, x.dtype)


def _fp8_weight(granularity: str, activation: str):
    def matches(w):
        t = w.weight
        return (isinstance(t, FP8Tensor) and t.granularity == granularity and t.data.ndim == 2
                and w.recipe.activation == activation and (granularity != "block" or t.block_size == 128))
    return matches


register_kernel("pallas_w4a16", lambda w: isinstance(w.weight, Int4Tensor) and w.weight.g_idx is None
                and w.recipe.activation == "none", _w4a16, can_use=_w4a16_ok)
register_kernel("pallas_fp4", lambda w: isinstance(w.weight, (NVFP4Tensor, MXFP4Tensor))
                and w.recipe.activation in ("none", "nvfp4", "fp8_static"), _fp4, can_use=_fp4_ok)
register_kernel("pallas_w4a8", lambda w: isinstance(w.weight, Int4Tensor) and w.weight.g_idx is None
                and w.recipe.activation == "fp8_static" and w.weight_scale_2 is not None, _w4a8, can_use=_w4a8_ok)
register_kernel("pallas_fp8_block", _fp8_weight("block", "fp8_group"), _fp8_block)
register_kernel("xla_fp8", _fp8_weight("tensor", "fp8_static"), _fp8_xla)
register_kernel("xla_fp8_rowwise", _fp8_weight("channel", "fp8_token"), _fp8_xla)


def _mosaic_recipe(w: QuantizedWeight) -> str | None:
    """'w4a16' / 'w4a8' where a 2-D weight is claimed by the W4A16 / W4A8 kernels and fits the Mosaic GPU
    kernel's shape rules (which read scale rows per K-step), else None."""
    from pallas_kernels import w4a16_mgpu

    t = w.weight
    if not isinstance(t, Int4Tensor) or t.packed.ndim != 2:
        return None
    names = {"pallas_w4a16": "w4a16", "pallas_w4a8": "w4a8"}
    recipe = next((names[kernel.name] for kernel in _KERNELS if kernel.name in names and kernel.matches(w)), None)
    n, k = t.shape
    if recipe is None or t.group_size not in (w4a16_mgpu.GROUPS if recipe == "w4a16" else (w4a16_mgpu.GROUP,)):
        return None
    return recipe if w4a16_mgpu.can_use(2, n, k, t.group_size) else None


GroupFn = Callable[[jax.Array, list], jax.Array]  # (x [M, K], weights) -> y [M, sum N] in x.dtype


def select_group(x: jax.Array, weights: list, backend: str | None = None) -> GroupFn | None:
    """One launch for x [M, K] @ W^T over several weights that share x (q, k, v; gate, up), or None where they
    should run as separate qmatmul calls. A group needs every weight claimed by the W4A16 kernel, or every one
    by the W4A8 kernel (each with its own input_scale), with the same group size, packing and symmetry, no
    smoothing (pre_quant_scale) or act-order (g_idx), and a grouped plan from
    pallas_kernels.dispatch.group_plan (the word GEMV at M=1, W4A8 on a row of E4M3 codes per weight; the
    Mosaic GPU kernels on Hopper from M=2)."""
    from pallas_kernels import _mgpu
    from pallas_kernels.dispatch import group_plan, quantized_matmul_group

    backend = backend or jax.default_backend()
    if backend != "gpu" or len(weights) < 2 or not all(isinstance(w, QuantizedWeight) for w in weights):
        return None
    names = {getattr(select_kernel(x, w, backend), "name", None) for w in weights}
    recipe = {"pallas_w4a16": "w4a16", "pallas_w4a8": "w4a8"}.get(names.pop()) if len(names) == 1 else None
    if recipe is None:
        return None
    first = weights[0].weight
    for w in weights:
        t = w.weight
        if (w.pre_quant_scale is not None or t.packed.ndim != 2 or t.group_size != first.group_size
                or t.packed.dtype != first.packed.dtype or (t.zero is None) != (first.zero is None)):
            return None
    ns = tuple(w.weight.shape[0] for w in weights)
    plan = group_plan(recipe, x.shape[0], ns, x.shape[1], first.group_size, mosaic=_mgpu.is_hopper())
    if plan is None:
        return None

    def arrays(w):
        t = w.weight
        if recipe == "w4a8":
            return _with_rows({"packed": t.packed, "weight_scale": t.scale, "input_scale": w.input_scale}, w)
        return _with_rows({"packed": t.packed, "scale": t.scale, "zero": t.zero}, w)

    def run(x2, ws):
        return quantized_matmul_group(x2, recipe, tuple(arrays(w) for w in ws), plan)

    return run


def with_kernel_rows(params):
    """params with kernel_rows set on every QuantizedWeight that the W4A16 / W4A8 Mosaic GPU kernels may run:
    their scale rows (pallas_kernels.dispatch.with_step_rows) built once, so that no call transposes the
    scales (an XLA pass of about 2 us per call on an H100). Extra memory: the rows, bf16 scale (and zero) per
    group, f32 per group for W4A8. Off a Hopper GPU, params come back as they are."""
    from pallas_kernels import _mgpu
    from pallas_kernels.dispatch import with_step_rows

    if not _mgpu.is_hopper():
        return params

    def prepare(w):
        recipe = _mosaic_recipe(w) if isinstance(w, QuantizedWeight) else None
        if recipe is None:
            return w
        t = w.weight
        weights = ({"scale": t.scale, "zero": t.zero} if recipe == "w4a16"
                   else {"weight_scale": t.scale, "input_scale": w.input_scale})
        return w.replace(kernel_rows=tuple(with_step_rows(recipe, weights)["mgpu_rows"]))

    return jax.tree.map(prepare, params, is_leaf=lambda node: isinstance(node, QuantizedWeight))
