"""Pre-quantized checkpoints: detect the format, plan which linears are quantized, convert them.

detect              the format from hf_quant_config.json / config.json quantization_config -> a Scheme
scheme              Scheme and TensorSpec, what every format shares (shape/dtype/value rules, exclusions)
modelopt            ModelOpt unified HF export (every quant_algo, exclude_modules, FP8 KV scales)
compressed_tensors  llm-compressor (pack-quantized INT4, float-quantized FP8, NVFP4)
autoawq, gptq       AutoAWQ GEMM, AutoGPTQ / GPTQModel v1 and v2
deepseek_fp8        HF quant_method "fp8" (DeepSeek-V3 128x128 blocks, per-tensor static)
gpt_oss             GPT-OSS MXFP4 experts (tensor-level conversion; no GPT-OSS model yet)
plan                CheckpointPlan: the per-module conversion hf_checkpoint.load_hf_params streams through

jaxq.io.check validates a checkpoint against the plan; jaxq.load checks, then loads through it.
"""
