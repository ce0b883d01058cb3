"""Weight quantization: per-output-channel symmetric scales with an MSE clip search, then RTN or GPTQ.

Both methods produce integer codes and float32 scales defined by ``docs/numerics.md`` section 2; the deployed
weight is exactly ``codes * scale``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infoquant_export.quant.primitives import quantize_weight, signed_range, weight_scale
from infoquant_export.quant.reference_primitives import (
    reference_weight_codes,
    reference_weight_qparams,
    reference_weight_range,
    reference_weight_search_error,
)

CLIP_GRID = 80  # candidates p = 1 - i/100, i = 0..79 (down to 0.21 of the row's max)
CLIP_NORM = 2.4  # error norm of the search, as in GPTQ/QuaRot


@dataclass
class QuantizedWeight:
    """Signed integer codes [out, in] (int8 holding b-bit values) and per-row float32 scales [out, 1]."""

    codes: torch.Tensor
    scale: torch.Tensor
    bits: int

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * self.scale


def mse_clip_scale(w: torch.Tensor, bits: int, search: bool = True) -> torch.Tensor:
    """Per-row scale minimising sum |fq(w) - w|^2.4 over clip ratios p (strict improvement keeps the larger p)."""
    w = w.float()
    best_scale = weight_scale(w, bits)
    if not search:
        return best_scale
    qmin, qmax = signed_range(bits)
    best_err = torch.full_like(best_scale, float("inf"))
    for i in range(CLIP_GRID):
        p = 1.0 - i / 100.0
        scale = weight_scale(w, bits, p)
        q = torch.clamp(torch.round(w / scale), qmin, qmax)
        err = (q * scale - w).abs().pow(CLIP_NORM).sum(dim=-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    return best_scale


def reference_mse_scale(w: torch.Tensor, bits: int, search: bool = True) -> torch.Tensor:
    """The reference's per-row scale: asymmetric range / (2^b - 1), MSE-searched over the same shrink grid with
    the asymmetric (zero-point) error, strict improvement (numerics.md section 7.1)."""
    scale, zero = reference_weight_qparams(w, bits)
    if not search:
        return scale
    best_err = torch.full_like(scale, float("inf"))
    for i in range(CLIP_GRID):
        s, z = reference_weight_qparams(w, bits, 1.0 - i / 100.0)
        err = reference_weight_search_error(w, s, z, bits, CLIP_NORM)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        scale = torch.where(better, s, scale)
    return scale


def weight_grid(grid: str, bits: int) -> tuple[int, int, int]:
    """(qmin, qmax, stored code bits) of a weight grid: ``int`` (true signed b-bit) or ``reference`` (the reference's
    [-2^b, 2^b - 1], stored as b+1-bit int8 codes)."""
    if grid == "reference":
        return (*reference_weight_range(bits), bits + 1)
    return (*signed_range(bits), bits)


def grid_scale(w: torch.Tensor, bits: int, clip_search: bool, grid: str) -> torch.Tensor:
    return reference_mse_scale(w, bits, clip_search) if grid == "reference" else mse_clip_scale(w, bits, clip_search)


def rtn(w: torch.Tensor, bits: int, clip_search: bool = True, grid: str = "int") -> QuantizedWeight:
    """Round-to-nearest with the (optionally MSE-searched) per-channel scale of ``grid``."""
    scale = grid_scale(w, bits, clip_search, grid)
    if grid == "reference":
        return QuantizedWeight(reference_weight_codes(w, scale, bits), scale, weight_grid(grid, bits)[2])
    return QuantizedWeight(quantize_weight(w, scale, bits), scale, bits)


class HessianAccumulator:
    """Running ``H = 2/N * sum x^T x`` over calibration rows: float32 products, float64 accumulation."""

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.h = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        self.h *= self.rows / (self.rows + n)
        self.rows += n
        self.h += (x.T @ x).double() * (2.0 / self.rows)


def gptq(w: torch.Tensor, hessian: torch.Tensor, bits: int, clip_search: bool = True, damp: float = 0.01,
         block_size: int = 128, grid: str = "int") -> QuantizedWeight:
    """GPTQ (Frantar et al.): quantize columns in order, spreading each column's error over the remaining ones
    through the inverse Hessian's upper Cholesky factor; lazy updates in blocks of ``block_size`` columns.

    The scale is searched once on the original weight. Dead inputs (H_ii = 0) get weight 0. Math in float64.
    ``grid`` as in :func:`weight_grid`.
    """
    w = w.double().clone()
    h = hessian.double().clone()
    scale = grid_scale(w.float(), bits, clip_search, grid).double()
    qmin, qmax, code_bits = weight_grid(grid, bits)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros_like(w, dtype=torch.int8)
    n = w.shape[1]
    for start in range(0, n, block_size):
        end = min(start + block_size, n)
        w_block = w[:, start:end].clone()
        err_block = torch.zeros_like(w_block)
        hinv_block = hinv[start:end, start:end]
        for j in range(end - start):
            col = w_block[:, j:j + 1]
            q = torch.clamp(torch.round(col.float() / scale.float()), qmin, qmax)
            codes[:, start + j] = q.squeeze(1).to(torch.int8)
            err = (col - q.double() * scale) / hinv_block[j, j]
            w_block[:, j:] -= err @ hinv_block[j:j + 1, j:]
            err_block[:, j:j + 1] = err
        w[:, end:] -= err_block @ hinv[start:end, end:]
    return QuantizedWeight(codes, scale.float(), code_bits)
