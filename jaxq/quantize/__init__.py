"""Post-training quantization: `quantize(model, recipe, ...)` (pipeline.py), round-to-nearest weights and
static scales per recipe (weights.py); calibration data, the layer-by-layer driver and AWQ / GPTQ live in
jaxq.calib."""

from jaxq.quantize.pipeline import QuantizeReport, quantize

__all__ = ["QuantizeReport", "quantize"]
