"""Device helpers shared by the kernels."""

import triton
import triton.language as tl

# 1.5 * 2^23: adding and subtracting it rounds a float32 of magnitude < 2^22 to an integer, half to even (the FPU's
# rounding mode), in compiled code and in the interpreter alike (libdevice ``rint`` has no interpreter version).
ROUND_MAGIC = 12582912.0


@triton.jit
def round_half_even(x):
    """Round float32 ``x`` (|x| < 2^22) to the nearest integer, ties to even (numerics.md: ``round``)."""
    return (x + 12582912.0) - 12582912.0


@triton.jit
def unpack_unsigned(packed):
    """uint8 bytes -> (low nibbles, high nibbles) as int8 in [0, 15] (elements 2i and 2i+1, numerics.md 4)."""
    return (packed & 15).to(tl.int8), (packed >> 4).to(tl.int8)


@triton.jit
def unpack_signed(packed):
    """uint8 bytes of two's-complement nibbles -> (low, high) as int8 in [-8, 7]."""
    lo = (packed << 4).to(tl.int8, bitcast=True) >> 4
    hi = packed.to(tl.int8, bitcast=True) >> 4
    return lo, hi
