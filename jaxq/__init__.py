"""jaxq: LLM quantization for JAX (FP8, NVFP4, MXFP4, INT4) with Pallas kernels for Hopper GPUs."""

__version__ = "0.1.0"
