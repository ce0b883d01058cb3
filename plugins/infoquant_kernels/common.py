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
def quantize_code(v, zero_int, QMAX: tl.constexpr):
    """``clamp(round(v) + z, 0, QMAX)`` as uint8 for float32 ``v`` (|v| < 2^22) and an int32 zero point: the same
    integer as ``round_half_even`` and float clamping, read from the bits of ``v + 1.5 * 2^23`` (0x4B400000 + round(v))
    with integer add / min / max, so no float -> int conversion (a quarter-rate instruction) per element."""
    n = (v + 12582912.0).to(tl.int32, bitcast=True) + (zero_int - 0x4B400000)
    return tl.minimum(tl.maximum(n, 0), QMAX).to(tl.uint8)


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


# Word-parallel unpacking (compiled code only; Triton's interpreter has no inline assembly): four packed bytes in
# one 32-bit register per asm instance (``pack=4``), every byte lane computed independently, so the result does not
# depend on which four bytes Triton groups. Low nibbles: ``w & 0x0F0F0F0F``; high nibbles: ``(w >> 4) & 0x0F0F0F0F``
# (the bits shifted in from the next byte are masked away). Two's-complement nibbles are sign-extended per byte by
# OR-ing ``(sign bit 0x08 of the lane) * 30 = 0xF0`` (no carry across lanes: 0xF0 < 0x100). 10 PTX integer
# instructions per 4 bytes instead of Triton's byte-by-byte extraction and re-packing (PRMT per byte).
# ($0, $1: the low / high output words, $2: the packed input word.)
UNPACK_UNSIGNED_PTX = tl.constexpr("{ and.b32 $0, $2, 0x0F0F0F0F; shr.u32 $1, $2, 4; and.b32 $1, $1, 0x0F0F0F0F; }")
UNPACK_SIGNED_PTX = tl.constexpr(
    "{ .reg .b32 t, m; and.b32 t, $2, 0x08080808; mul.lo.u32 t, t, 30; and.b32 $0, $2, 0x0F0F0F0F; "
    "or.b32 $0, $0, t; and.b32 m, $2, 0x80808080; shr.u32 m, m, 4; mul.lo.u32 m, m, 30; shr.u32 t, $2, 4; "
    "and.b32 t, t, 0x0F0F0F0F; or.b32 $1, t, m; }")


@triton.jit
def unpack_unsigned_words(packed):
    """``unpack_unsigned`` four bytes at a time (compiled code only)."""
    return tl.inline_asm_elementwise(UNPACK_UNSIGNED_PTX, "=r,=r,r", [packed], dtype=(tl.int8, tl.int8),
                                     is_pure=True, pack=4)


@triton.jit
def unpack_signed_words(packed):
    """``unpack_signed`` four bytes at a time (compiled code only)."""
    return tl.inline_asm_elementwise(UNPACK_SIGNED_PTX, "=r,=r,r", [packed], dtype=(tl.int8, tl.int8),
                                     is_pure=True, pack=4)


@triton.jit
def unpack_a(packed, WORDS: tl.constexpr):
    """Activation codes (unsigned nibbles) -> (low, high) int8; ``WORDS``: the word-parallel form."""
    if WORDS:
        return unpack_unsigned_words(packed)
    else:
        return unpack_unsigned(packed)


@triton.jit
def unpack_w(packed, WORDS: tl.constexpr):
    """Weight codes (two's-complement nibbles) -> (low, high) int8; ``WORDS``: the word-parallel form."""
    if WORDS:
        return unpack_signed_words(packed)
    else:
        return unpack_signed(packed)


@triton.jit
def div_by(x, s, inv_s, FAST: tl.constexpr):
    """``x / s`` rounded to nearest even (IEEE float32 division, ``tl.div_rn``) for float32 ``x``, given
    ``inv_s = div_rn(1, s)``. ``FAST`` (compiled code only: Triton's interpreter rounds inside ``tl.fma``, so it
    passes False): ``q0 = x * inv_s``, the exact residual ``r = fma(-q0, s, x)``
    and ``fma(r, inv_s, q0)`` -- three instructions where ``div.rn.f32`` is a reciprocal, four FMAs, a range check
    and a branch. Markstein's theorem: with ``inv_s`` within half an ulp of ``1/s`` and ``q0`` within one ulp of
    ``x/s``, that last FMA is the correctly rounded quotient, as long as nothing underflows. Below |x| = 2^-100 the
    residual can underflow and the quotient be one ulp off; with a scale >= 1e-8 such a quotient is below 2^-73
    and its code the same. tests/kernels/test_div_by.py checks it in exact arithmetic; the GPU tests compare the
    compiled kernels' codes with the primitives'."""
    if FAST:
        q0 = x * inv_s
        return tl.fma(tl.fma(-q0, s, x), inv_s, q0)
    else:
        return tl.div_rn(x, s)
