"""Max calibration of the linear layers' inputs (ModelOpt `max`, spec 6.2): run the unquantized model over
calibration windows and record, per QDense, the per-channel amax of its input over all tokens.

Per-channel amax [K] rather than a scalar, so a smoothing vector applied later (AWQ's pre_quant_scale s)
gives the smoothed input's amax as max_c(amax[c] * |s[c]|) without another pass (spec 6.3 step 4).
The capture is a flax method interceptor around QDense.__call__: models need no hooks of their own.
"""

from __future__ import annotations

import functools
import logging
import os
import pathlib
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxq.eval import text_token_ids, token_windows
from jaxq.loaded_model import LoadedModel
from jaxq.nn.qdense import QDense, module_name

log = logging.getLogger(__name__)


def calibration_windows(model: LoadedModel, calib_data: str | os.PathLike | Sequence[int] | np.ndarray,
                        calib_size: int, calib_seq: int) -> np.ndarray:
    """[n, calib_seq] int32 token windows, n <= calib_size, from the start of calib_data: a text, a path
    to a text file (a pathlib.Path, or a one-line str naming an existing file), or token ids."""
    if isinstance(calib_data, os.PathLike) or (isinstance(calib_data, str) and "\n" not in calib_data
                                               and os.path.isfile(calib_data)):
        calib_data = pathlib.Path(calib_data).read_text(encoding="utf-8")
    windows = token_windows(text_token_ids(model, calib_data), calib_seq, calib_size)
    if len(windows) < calib_size:
        log.info("calibration data holds %d windows of %d tokens (calib_size=%d asked)", len(windows),
                 calib_seq, calib_size)
    return windows


def _record_inputs(sink: dict):
    """A flax interceptor that stores each QDense call's input under its dotted HF module name."""

    def intercept(next_fun, args, kwargs, context):
        if isinstance(context.module, QDense) and context.method_name == "__call__":
            sink.setdefault(module_name(context.module.scope.path), []).append(args[0])
        return next_fun(*args, **kwargs)

    return intercept


def linear_names(model: LoadedModel) -> list[str]:
    """Dotted names of every QDense the model calls, in call order (traced abstractly, no compute)."""
    seen: dict = {}

    def trace(params):
        with nn.intercept_methods(_record_inputs(seen)):
            model.module.apply({"params": params}, jnp.zeros((1, 1), jnp.int32))

    jax.eval_shape(trace, model.params)
    return list(seen)


@functools.partial(jax.jit, static_argnames="module")
def _window_amax(module, params, tokens):
    """{name: per-channel amax [K] float32 of the layer's input over tokens [B, T]}."""
    inputs: dict = {}
    with nn.intercept_methods(_record_inputs(inputs)):
        module.apply({"params": params}, tokens)
    return {name: functools.reduce(jnp.maximum, (jnp.max(jnp.abs(x.astype(jnp.float32)).reshape(-1, x.shape[-1]),
                                                         axis=0) for x in xs))
            for name, xs in inputs.items()}


def input_amax(model: LoadedModel, windows: np.ndarray, progress: bool = True) -> dict[str, jax.Array]:
    """Per-channel input amax [K] of every QDense, max over all windows (each run from position 0)."""
    from tqdm.auto import tqdm

    amax: dict[str, jax.Array] = {}
    for row in tqdm(windows, desc="calibrate (max)", unit="window", disable=not progress):
        for name, a in _window_amax(model.module, model.params, jnp.asarray(row[None])).items():
            amax[name] = jnp.maximum(amax[name], a) if name in amax else a
    return amax
