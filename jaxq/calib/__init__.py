"""Calibration for jaxq.quantize: data, layer-by-layer driver and the PTQ algorithms.

    calibration_tokens(model, source, num_samples, seq_len, seed, field)  [N, L] token windows   (data.py)
    run_sequential(model, tokens, quantize_layer, wanted)   one decoder layer at a time         (sequential.py)
    AWQConfig, GPTQConfig                                   the algorithms' knobs, for jaxq.quantize(awq=, gptq=)
    awq_core, gptq_core                                     the maths, citing the papers
"""

from jaxq.calib.awq import AWQConfig
from jaxq.calib.data import calibration_tokens
from jaxq.calib.gptq import GPTQConfig
from jaxq.calib.sequential import InputStats, run_sequential

__all__ = ["AWQConfig", "GPTQConfig", "InputStats", "calibration_tokens", "run_sequential"]
