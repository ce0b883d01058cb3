"""Triton kernels for the online W4A4KV4 ops (docs/numerics.md): one source for compiled GPUs and the interpreter.

Kernels only (``@triton.jit``); the checked Python entry points are in ``infoquant_export.kernels``. Every kernel
computes the numerics definition step by step: float32 element-wise ops, IEEE round-to-nearest division
(``tl.div_rn``), round half to even, integer-exact GEMMs, float64 for the Hadamard's K-axis sums.
"""

KERNEL_ABI_VERSION = 1
