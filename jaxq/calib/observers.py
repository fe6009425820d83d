"""Observing the linear layers: a flax method interceptor that records every QDense input under its dotted HF
module name, so models need no capture hooks of their own (jaxq.calib.sequential reduces the records to
statistics: max calibration's per-channel amax, AWQ's mean |x|, GPTQ's second moment)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxq.loaded_model import LoadedModel
from jaxq.nn.qdense import QDense, module_name


def record_inputs(sink: dict):
    """A flax interceptor that appends each QDense call's input to sink[its dotted module name]."""

    def intercept(next_fun, args, kwargs, context):
        if isinstance(context.module, QDense) and context.method_name == "__call__":
            sink.setdefault(module_name(context.module.scope.path), []).append(args[0])
        return next_fun(*args, **kwargs)

    return intercept


def linear_names(model: LoadedModel) -> list[str]:
    """Dotted names of every QDense the model calls, in call order (traced abstractly, no compute)."""
    seen: dict = {}

    def trace(params):
        with nn.intercept_methods(record_inputs(seen)):
            model.module.apply({"params": params}, jnp.zeros((1, 1), jnp.int32))

    jax.eval_shape(trace, model.params)
    return list(seen)
