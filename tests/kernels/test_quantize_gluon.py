"""The Gluon Hadamard + quantize kernel (``plugins/infoquant_kernels/quantize_gluon.py``) on the CPU: its own source
run on numpy (``gluon_numpy``; Gluon has no interpreter), against the ``tl`` row kernel in Triton's interpreter.
Its FWHT stages are reshapes, permutes, splits and joins of a [W, 32, 32] row whose meaning does not depend on the
layouts, so the same float32 operations in the same order give the same bits. The compiled kernel's bits are
checked on a GPU (``tests/gpu/test_variants_gpu.py::test_gluon_quantize_same_bits``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from infoquant_kernels import quantize_gluon as qg  # noqa: E402

from infoquant_export.kernels import ops  # noqa: E402
from infoquant_export.kernels.rows import _f32, _inv_sqrt  # noqa: E402
from tests.kernels.conftest import DEVICE, INTERPRETER_WARNING  # noqa: E402
from tests.kernels.gluon_numpy import Pointer, gl_numpy, on_numpy  # noqa: E402


def quantize_gluon_on_numpy(x: torch.Tensor, clip: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``quantize_rows_variant(x, 4, clip, None, 1, gluon=True)`` with the kernel's source on numpy, row by row."""
    m, n = x.shape
    warps = n // 1024
    codes = np.zeros(m * n // 2, np.uint8)
    scale = np.zeros(m, np.float32)
    zero = np.zeros(m, np.uint8)
    pid = [0]
    shim = gl_numpy(warps, pid)
    kernel = on_numpy(qg, "hadamard_quantize_gluon_kernel", shim, tl=shim)
    xs = Pointer(x.float().contiguous().reshape(-1).numpy())  # bfloat16 rows as their (exact) float32 values
    for pid[0] in range(m):
        kernel(xs, n, Pointer(codes), n // 2, Pointer(scale), Pointer(zero), _inv_sqrt(n), _f32(clip), _f32(clip),
               W=warps, LOG2W=warps.bit_length() - 1, FAST_DIV=False, ROW=None, LANES=None, WARPS=None, BYTES=None)
    return codes.reshape(m, n // 2), scale, zero


@pytest.mark.filterwarnings(INTERPRETER_WARNING)
@pytest.mark.parametrize("n", [1024, 2048, 4096, 8192])
def test_gluon_quantize_source_on_numpy_same_bits(n):
    """Codes, scales and zero points bit for bit those of the ``tl`` kernel (the numerics primitives' bits,
    tests/kernels/test_quantize.py): float16, bfloat16 and float32 rows, outliers and an all-zero row."""
    x = torch.randn(5, n) * 2
    x[0] *= 40
    x[1, :7] = 300.0
    x[4] = 0
    for xx in (x.half(), x.bfloat16(), x):
        ref = ops.quantize_rows(xx.to(DEVICE), 4, 0.9, None, 1)
        codes, scale, zero = quantize_gluon_on_numpy(xx, 0.9)
        assert np.array_equal(codes, ref.codes.cpu().numpy()), (n, xx.dtype)
        assert np.array_equal(scale.view(np.int32), ref.scale.cpu().numpy().view(np.int32)), (n, xx.dtype)
        assert np.array_equal(zero, ref.zero.cpu().numpy()), (n, xx.dtype)
