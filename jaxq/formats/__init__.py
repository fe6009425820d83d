"""Number formats as quantized arrays: one pytree type per layout, quantize / dequantize, and converters
to and from every producer's on-disk layout (jaxq.formats.layouts). Formulas: spec/formats.md.

Types (each with .dequantize(dtype) and the dequantisation formula in its docstring):
  FP8Tensor    E4M3 data, float32 scales per tensor / channel / token / 1 x b group / b x b block
  NVFP4Tensor  E2M1 nibbles, E4M3 scale per 16, float32 global scale
  MXFP4Tensor  E2M1 nibbles, E8M0 scale per 32
  Int4Tensor   unsigned 4-bit codes packed along K, scale (and zero point) per group, optional g_idx
"""

from jaxq.formats.elements import (E2M1_MAX, E2M1_VALUES, E4M3_MAX, decode_e2m1, decode_e8m0, encode_e2m1,
                                   encode_e8m0, exact_divide, pack_nibbles, round_to, to_e4m3, unpack_nibbles)
from jaxq.formats.fp8 import FP8Tensor, fake_quant_fp8_static, quantize_fp8, quantize_fp8_static_modelopt
from jaxq.formats.int4 import Int4Tensor, g_idx_from_perm, perm_from_g_idx, quantize_int4, sort_by_g_idx
from jaxq.formats.layouts.autoawq import from_autoawq, to_autoawq
from jaxq.formats.layouts.compressed_tensors import (compressed_tensors_global_scale, from_compressed_tensors_int4,
                                                     from_compressed_tensors_nvfp4, to_compressed_tensors_int4,
                                                     to_compressed_tensors_nvfp4)
from jaxq.formats.layouts.fp8 import fp8_checkpoint_scale, fp8_from_checkpoint
from jaxq.formats.layouts.gpt_oss import (deinterleave_gate_up, from_gpt_oss_mxfp4, interleave_gate_up,
                                          to_gpt_oss_mxfp4)
from jaxq.formats.layouts.gptq import from_gptq, to_gptq
from jaxq.formats.layouts.modelopt import (from_modelopt_int4, from_modelopt_mxfp4, from_modelopt_nvfp4,
                                           to_modelopt_int4, to_modelopt_mxfp4, to_modelopt_nvfp4)
from jaxq.formats.mxfp4 import MXFP4Tensor, quantize_mxfp4
from jaxq.formats.nvfp4 import NVFP4Tensor, fake_quant_nvfp4, global_scale_from_amax, quantize_nvfp4

__all__ = [
    "E2M1_MAX", "E2M1_VALUES", "E4M3_MAX", "FP8Tensor", "Int4Tensor", "MXFP4Tensor", "NVFP4Tensor",
    "compressed_tensors_global_scale", "decode_e2m1", "decode_e8m0", "deinterleave_gate_up", "encode_e2m1",
    "encode_e8m0", "exact_divide", "fake_quant_fp8_static", "fake_quant_nvfp4", "fp8_checkpoint_scale",
    "fp8_from_checkpoint", "from_autoawq", "from_compressed_tensors_int4", "from_compressed_tensors_nvfp4",
    "from_gpt_oss_mxfp4", "from_gptq", "from_modelopt_int4", "from_modelopt_mxfp4", "from_modelopt_nvfp4",
    "g_idx_from_perm", "global_scale_from_amax", "interleave_gate_up", "pack_nibbles", "perm_from_g_idx",
    "quantize_fp8", "quantize_fp8_static_modelopt", "quantize_int4", "quantize_mxfp4", "quantize_nvfp4",
    "round_to", "sort_by_g_idx", "to_autoawq",
    "to_compressed_tensors_int4", "to_compressed_tensors_nvfp4", "to_e4m3", "to_gpt_oss_mxfp4", "to_gptq",
    "to_modelopt_int4", "to_modelopt_mxfp4", "to_modelopt_nvfp4", "unpack_nibbles",
]
