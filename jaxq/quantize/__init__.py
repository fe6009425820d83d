"""Post-training quantization: `quantize(model, recipe, ...)` (pipeline.py), round-to-nearest weights and
static scales per recipe (weights.py), max calibration of layer inputs (calibrate.py)."""

from jaxq.quantize.pipeline import QuantizeReport, quantize

__all__ = ["QuantizeReport", "quantize"]
