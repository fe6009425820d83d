"""Pallas (Triton lowering) GEMM kernels for quantized weights; each module holds a kernel, a jitted
wrapper with static tuning knobs, and a pure-jnp reference. Depends on jax only."""
