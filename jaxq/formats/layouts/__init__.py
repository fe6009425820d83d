"""On-disk layouts of each producer family, converted to and from the canonical quantized arrays.

`from_<family>_*` take one linear's sibling tensors by their checkpoint names; `to_<family>_*` return
{checkpoint name: array}. One module per family: modelopt, autoawq, gptq, compressed_tensors, gpt_oss,
and fp8 (every producer's FP8 scale shapes). The public names are re-exported by jaxq.formats.
"""
