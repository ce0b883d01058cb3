"""The float64 ``H_K^T`` step of the block Hadamard for large K (numerics.md section 1): ``k_step`` launches
``hadamard_k_step_kernel`` on rows that already had the FWHT of their p-sized blocks."""

from __future__ import annotations

from functools import cache

import torch

from infoquant_export.kernels import kernel_module
from infoquant_export.kernels.checks import (
    KernelInputError,
    _check_contiguous,
    _check_device,
    _check_dtype,
    _f32,
    triton_cdiv,
)
from infoquant_export.transforms.hadamard import hadamard_block


@cache
def _hk_t_padded(k: int, rows: int, cols: int, device: str) -> torch.Tensor:
    """``H_K^T`` as float32 ``[rows, cols]`` (rows, cols >= k), zero padded; the K-step kernels widen it to float64
    (+-1 and 0 are exact in float32: half the bytes of a float64 operand)."""
    out = torch.zeros(rows, cols, dtype=torch.float32)
    out[:k, :k] = torch.tensor(hadamard_block(k), dtype=torch.float32).T
    return out.to(device)


K_STEP_TILE = (64, 16, 64, 4)
"""(BA, BK, BC, warps) of ``hadamard_k_step_kernel``: 64 x 64 float64 accumulators, K steps of 16 (sm_90's DMMA is
m16n8k16). Compiled on the CPU (``kernel-resources.json``): 160-167 registers on sm_80 / sm_90 (DMMA), 142 on
sm_86-89 (an FMA loop: no float64 tensor cores), no spills, 12 resident warps per SM everywhere. Not timed on a GPU
(``--sections variants`` times three more tiles)."""
K_STEP_TILE_FEW_ROWS = (16, 16, 64, 2)
"""The tile for a decode step's few rows (``rows.FEW_ROWS``): one row of 11008 = 172 x 64 is 11 programs of 16 x 64
outputs instead of 3 of 64 x 64, each with the same 11 K steps and a quarter of the work. Compiled: 160 registers
on sm_80 / sm_90, no spills, 12 resident warps, 191 instructions per K step on sm_90 (169 for K_STEP_TILE). The
same values (every float64 summation order rounds to the same float32). ``--sections variants`` times it at 1
and 16 rows against ``K_STEP_TILE``."""
MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y


def k_step(y: torch.Tensor, out: torch.Tensor, k: int, p: int, out_scale: float | None = None,
           tiles: tuple[int, int, int, int] | None = None) -> None:
    """``out[r] = H_K^T @ y[r]`` for float32 rows ``y [R, k * p]`` seen as ``k x p`` (float64 sum rounded once to
    float32, then ``* out_scale`` in float32 when given): ``hadamard_k_step_kernel``."""
    for name, t in (("y", y), ("out", out)):
        _check_dtype(name, t, (torch.float32,))
        _check_contiguous(name, t)
        if t.dim() != 2 or t.shape != y.shape or t.shape[1] != k * p:
            raise KernelInputError(f"the K step takes rows [R, {k} * {p}] in and out, got {name} {tuple(t.shape)}",
                                   "pass y and out of shape [rows, k * p]")
    _check_device(y, out)
    ba, bk, bc, warps = tiles or K_STEP_TILE
    ka, kb = triton_cdiv(k, ba) * ba, triton_cdiv(k, bk) * bk
    ht = _hk_t_padded(k, ka, kb, str(y.device))
    step = max(1, MAX_GRID_Y * bc // p)  # rows per launch: the column tiles are the grid's y axis
    for r0 in range(0, y.shape[0], step):
        rows = min(step, y.shape[0] - r0)
        kernel_module("quantize").hadamard_k_step_kernel[(ka // ba, triton_cdiv(rows * p, bc))](
            y[r0:], out[r0:], ht, rows * p, _f32(out_scale or 1.0), K=k, P=p, LOG2P=p.bit_length() - 1, KB=kb,
            BA=ba, BK=bk, BC=bc, SCALE=out_scale is not None, num_warps=warps, enable_fp_fusion=False)
