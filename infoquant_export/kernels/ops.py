"""Checked Python entry points of the W4A4KV4 kernels (numerics.md sections 1, 3, 4, 5): the public facade.

Every function validates shapes, dtypes, devices and contiguity and raises :class:`KernelInputError` (a one-line
``UserError``) naming the constraint, before anything is launched. Tensors must all be on one CUDA device, or all
on the CPU when the kernels run in Triton's interpreter.

The code lives in sibling modules; this one re-exports their public names:

- ``checks``: ``KernelInputError``, ``FLOAT_DTYPES``, the input checks, ``triton_cdiv``, ``device_cc``;
- ``rows``: ``RowTile`` / ``row_tile`` / ``row_warps``, ``PackedRows``, the prologues (``Prologue``, ``PRE_*``,
  ``rmsnorm_prologue``, ``SWIGLU``), ``quantize_rows``, ``quantize_rows_variant``, ``hadamard``, the fused K step's
  settings (``k_dot``, ``SCRATCH_BYTES``) and the chunked kernel's (``CHUNKED_ABOVE``, ``QUANT_CHUNK``, ...);
- ``k_step``: the float64 ``H_K^T`` step of large-K Hadamards (``k_step``, ``K_STEP_TILE``, ``MAX_GRID_Y``);
- ``kv``: the 4-bit KV cache: ``KVCache4``, ``quantize_kv``, ``dequantize_kv``, ``rope_rows``;
- ``linear``: the W4A4 GEMM: ``PackedWeight``, the ``GEMM_*`` tile tables, the autotuner, ``w4a4_linear``;
- ``attention``: decode attention: ``kv4_decode_attention``, ``decode_tile``, ``decode_splits``.

Settings are read by the module that defines them: assign or patch them there (``rows.SCRATCH_BYTES``), not here.
"""

from __future__ import annotations

from infoquant_export.kernels.attention import (
    DECODE_CC_STAGES,
    DECODE_CC_TILE,
    DECODE_KERNELS,
    DECODE_MMA_STAGES,
    DECODE_MMA_TILE,
    FLOAT_2_23_BITS,
    decode_splits,
    decode_tile,
    kv4_decode_attention,
)
from infoquant_export.kernels.checks import FLOAT_DTYPES, KernelInputError, device_cc, triton_cdiv
from infoquant_export.kernels.k_step import K_STEP_TILE, MAX_GRID_Y, k_step
from infoquant_export.kernels.kv import KVCache4, dequantize_kv, quantize_kv, rope_rows
from infoquant_export.kernels.linear import (
    GEMM_INT_MM_EPILOGUE,
    GEMM_PLANE_TILES,
    GEMM_PLANE_TILES_SM8X,
    GEMM_SPLITK,
    GEMM_TILES,
    GEMM_TILES_SM8X,
    GEMM_TMA_TILES,
    GEMM_WGMMA_PERSISTENT_TILES,
    GEMM_WGMMA_TILES,
    SPLITK_EPILOGUE_BN,
    TUNE_ERRORS,
    W_PLANES_MIN_M,
    PackedWeight,
    gemm_candidates,
    gemm_config,
    gemm_tables,
    linear_candidates,
    tma_eligible,
    w4a4_linear,
)
from infoquant_export.kernels.rows import (
    CHUNK,
    CHUNK_ROTATED,
    CHUNK_STAGES,
    CHUNKED_ABOVE,
    FLOAT64_TENSOR_CORES,
    FUSED_K_ROWS,
    MAX_ROW_TILE,
    PRE_NONE,
    PRE_RMSNORM,
    PRE_ROPE,
    PRE_SCALE,
    PRE_SWIGLU,
    QUANT_CHUNK,
    SCRATCH_BYTES,
    SWIGLU,
    PackedRows,
    Prologue,
    RowTile,
    hadamard,
    k_dot,
    quantize_rows,
    quantize_rows_variant,
    rmsnorm_prologue,
    row_tile,
    row_warps,
)

__all__ = [
    # checks
    "FLOAT_DTYPES", "KernelInputError", "device_cc", "triton_cdiv",
    # rows
    "CHUNK", "CHUNK_ROTATED", "CHUNK_STAGES", "CHUNKED_ABOVE", "FLOAT64_TENSOR_CORES", "FUSED_K_ROWS", "MAX_ROW_TILE",
    "PRE_NONE", "PRE_RMSNORM", "PRE_ROPE", "PRE_SCALE", "PRE_SWIGLU", "QUANT_CHUNK", "SCRATCH_BYTES", "SWIGLU",
    "PackedRows", "Prologue", "RowTile", "hadamard", "k_dot", "quantize_rows", "quantize_rows_variant",
    "rmsnorm_prologue", "row_tile", "row_warps",
    # k_step
    "K_STEP_TILE", "MAX_GRID_Y", "k_step",
    # kv
    "KVCache4", "dequantize_kv", "quantize_kv", "rope_rows",
    # linear
    "GEMM_INT_MM_EPILOGUE", "GEMM_PLANE_TILES", "GEMM_PLANE_TILES_SM8X", "GEMM_SPLITK", "GEMM_TILES",
    "GEMM_TILES_SM8X", "GEMM_TMA_TILES", "GEMM_WGMMA_PERSISTENT_TILES", "GEMM_WGMMA_TILES", "SPLITK_EPILOGUE_BN",
    "TUNE_ERRORS", "W_PLANES_MIN_M",
    "PackedWeight",
    "gemm_candidates", "gemm_config", "gemm_tables", "linear_candidates", "tma_eligible", "w4a4_linear",
    # attention
    "DECODE_CC_STAGES", "DECODE_CC_TILE", "DECODE_KERNELS", "DECODE_MMA_STAGES", "DECODE_MMA_TILE", "FLOAT_2_23_BITS",
    "decode_splits", "decode_tile", "kv4_decode_attention",
]
