"""Kernels with the argument order of TensorRT's ahead-of-time plugins (inputs, scalar arguments, outputs), for
``infoquant_export/trt/plugins/aot.py``. Same arithmetic as ``quantize.py`` (docs/numerics.md sections 1 and 8)."""

import triton
import triton.language as tl

from .quantize import _fwht


@triton.jit
def hadamard_rows_aot_kernel(x_ptr, y_ptr, NB: tl.constexpr, P: tl.constexpr, LOG2P: tl.constexpr,
                             INV_SQRT: tl.constexpr):
    """One row of ``NB`` blocks of size ``P`` (a power of two, Hadamard factor K = 1): FWHT per block in float32,
    then ``* INV_SQRT`` (the float32 constant ``1/sqrt(P)``). Grid: one program per row."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, NB)[:, None] * P + tl.arange(0, P)[None, :]
    x = tl.load(x_ptr + row * (NB * P) + offs).to(tl.float32)
    y = _fwht(x, NB, P, LOG2P) * INV_SQRT
    tl.store(y_ptr + row * (NB * P) + offs, y)
