"""The W4A4 GEMM (numerics.md section 4): :class:`PackedWeight`, the tile tables per architecture, the autotuner
and ``w4a4_linear``."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from infoquant_export.kernels import interpreted, kernel_module
from infoquant_export.kernels.checks import (
    FLOAT_DTYPES,
    KernelInputError,
    _check_contiguous,
    _check_device,
    _check_dtype,
    device_cc,
    triton_cdiv,
)
from infoquant_export.kernels.rows import PackedRows
from infoquant_export.quant.primitives import pack_int4, unpack_int4


@dataclass
class PackedWeight:
    """A linear layer's 4-bit weight for the GEMM kernel: codes ``[N, K/2]`` uint8 (numerics.md section 4, the ONNX
    INT4 layout), per-channel scale ``[N]`` float32, code row sums ``[N]`` int32 (zero-point correction), bias."""

    codes: torch.Tensor
    scale: torch.Tensor
    rowsum: torch.Tensor
    bias: torch.Tensor | None = None
    planes: torch.Tensor | None = None
    """Optional unpacked copy for the prefill GEMM (``with_planes``): int8 ``[N, K]``, each row the even-k codes
    then the odd-k codes. Twice the bytes of ``codes``; used for M >= ``W_PLANES_MIN_M`` (memory for speed)."""

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1] * 2

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> PackedWeight:
        """From integer codes ``[N, K]`` in [-8, 7] (any dtype holding integers) and scales ``[N]`` / ``[N, 1]``."""
        ints = codes.round().to(torch.int8) if codes.is_floating_point() else codes.to(torch.int8)
        if ints.dim() != 2 or ints.shape[1] % 64:
            raise KernelInputError(f"weight codes {tuple(ints.shape)}: the GEMM needs [out, in] with in % 64 == 0",
                                   "pad the input dimension to a multiple of 64 or use the fake-quant model")
        return cls(pack_int4(ints).contiguous(), scale.reshape(-1).float().contiguous(),
                   ints.to(torch.int32).sum(dim=1).to(torch.int32).contiguous(),
                   None if bias is None else bias.float().contiguous())

    def unpacked(self) -> torch.Tensor:
        return unpack_int4(self.codes)

    def to(self, device: torch.device | str) -> PackedWeight:
        return PackedWeight(self.codes.to(device), self.scale.to(device), self.rowsum.to(device),
                            None if self.bias is None else self.bias.to(device),
                            None if self.planes is None else self.planes.to(device))

    def with_planes(self) -> PackedWeight:
        """This weight plus its int8 planes (``planes``), built from ``codes`` on their device."""
        lo = (self.codes << 4).view(torch.int8) >> 4
        hi = self.codes.view(torch.int8) >> 4
        return PackedWeight(self.codes, self.scale, self.rowsum, self.bias, torch.cat([lo, hi], dim=1).contiguous())


GEMM_TILES = {  # (BM, BN, BK2, GROUP_M, num_warps, num_stages); the first is the default, the rest autotune options
    # M <= 16: weight-bandwidth bound (measured on H100: 16x32x128 was the fastest of 5, 1.2x FP16 cuBLAS)
    "small": [(16, 32, 128, 1, 4, 4), (16, 32, 256, 1, 4, 3), (16, 64, 128, 1, 4, 4), (16, 64, 256, 1, 4, 3),
              (16, 16, 256, 1, 2, 4)],
    "mid": [(128, 64, 64, 8, 4, 4), (128, 128, 64, 8, 8, 3), (64, 64, 128, 8, 4, 4), (64, 128, 64, 8, 4, 4)],
    # large M: tensor-core bound (H100: 256x128x128 / 8 warps was the fastest of 6 on all three 7B shapes)
    "large": [(256, 128, 128, 8, 8, 3), (256, 128, 64, 8, 8, 3), (128, 256, 128, 8, 8, 3), (128, 256, 64, 8, 8, 3)],
}
_TUNED: dict[tuple, dict[str, int]] = {}

# Operand-layout variants (w4a4_gemm_v2_kernel), used when an operand comes as int8 planes (PackedRows.planes from
# quantize_rows_variant(planes=True), PackedWeight.with_planes()). "SWAP" puts the weight on the left of the MMA
# (read from registers by wgmma); it is chosen when only the activation is planar (the weight is unpacked in
# registers). The first tile per bucket is the default, the rest autotune options.
GEMM_PLANE_TILES = {
    "small": [(16, 32, 128, 1, 4, 4), (16, 64, 128, 1, 4, 4)],
    # measured on an H200 (docs/bench/variants-h200.json): 64x128x128 fastest at M = 256 on 2 of 3 7B shapes
    "mid": [(64, 128, 128, 8, 4, 4), (128, 64, 64, 8, 4, 4), (128, 128, 64, 8, 8, 4)],
    # 128x256x64 fastest at M = 2048 on all three; 128x256x128/3 stages and 128x128x128/4 stages need 288 / 256 KB
    # of shared memory (> 227 KB on sm_90): removed
    "large": [(128, 256, 64, 8, 8, 4), (256, 128, 64, 8, 8, 4)],
}
# Tensor-descriptor (TMA) tiles of w4a4_gemm_tma_kernel, autotune options on sm_90 next to the pointer kernels
# (config "TMA": 1). Chosen statically (no GPU): no register spills and <= 227 KB of shared memory for every operand
# layout, from `python tools/compile_kernels.py --variants` (ptxas -v, sm_90a); the pointer kernels' large tiles
# spill 128-552 bytes per thread. Not yet timed on a GPU: the autotuner decides per shape.
GEMM_TMA_TILES = {
    "small": [(16, 32, 128, 1, 4, 4), (16, 64, 128, 1, 4, 4)],
    "mid": [(128, 64, 64, 8, 4, 4), (64, 128, 128, 8, 4, 4), (128, 128, 64, 8, 8, 5)],
    "large": [(128, 256, 64, 8, 8, 4), (256, 128, 64, 8, 8, 4), (128, 128, 64, 8, 8, 5)],
}
GEMM_WGMMA_TILES = ((128, 256, 64, 8, 8, 4), (256, 128, 64, 8, 8, 4), (128, 128, 64, 8, 4, 3), (64, 128, 64, 8, 4, 4))
"""Tiles (BM, BN, BK2, GROUP_M, warps, stages) of the Gluon sm_90 GEMM (config ``"WGMMA": 1``, int8 planes of
both operands), which keeps one group of int8 warpgroup MMAs queued behind the running one; Triton's ``tl.dot``
waits for each K step's int8 MMAs to finish (its pipeliner keeps only float32 accumulators in flight). The
tensor-descriptor kernel's M = 2048 tiles, a 128 x 128 tile two programs of which fit one SM, and an M = 256 tile.
A benchmark variant, and an autotune candidate only with ``WGMMA_CANDIDATES``, until a GPU has run it.
``"PERSISTENT": 1`` with it runs
``w4a4_gemm_wgmma_persistent_kernel``: one program per SM over the tiles, the next tile's loads during this tile's
epilogue (``GEMM_WGMMA_PERSISTENT_TILES``: 3 stages, as the output tile's buffer stays allocated)."""
GEMM_WGMMA_PERSISTENT_TILES = ((128, 256, 64, 8, 8, 3), (256, 128, 64, 8, 8, 3))
WGMMA_CANDIDATES = False
"""Opt-in: the Gluon GEMM's tiles (``GEMM_WGMMA_TILES`` for M > 16, and the persistent ones for M > 256) join the
autotune candidates on sm_90 when both operands are planes. Each such candidate is checked against the default's
bits on the call's own data before it is timed, and dropped (``TUNE_ERRORS``) if they differ. Off until a GPU has
run the kernel (``tools/bench_kernels.py`` turns it on for its ``w4a4kv4_planes_wgmma_ms`` prefill row)."""
W_PLANES_MIN_M = 17  # below, a weight's packed codes are read even when it has planes (half the bytes)
GEMM_SPLITK = {"tiles": [(16, 32, 128, 1, 4, 4), (16, 64, 128, 1, 4, 4)], "splits": (2, 4, 8)}
"""Split-K autotune candidates for M <= 16 (packed operands): each tile with each split count
(``w4a4_gemm_splitk_kernel`` + ``w4a4_splitk_epilogue_kernel``; same bits). Not timed yet: only the autotuner
picks them, when faster."""
SPLITK_EPILOGUE_BN = 128
GEMM_INT_MM_EPILOGUE = {"BM": 32, "BN": SPLITK_EPILOGUE_BN}
"""Epilogue tile of the ``INT_MM`` config: ``torch._int_mm`` (cuBLASLt's int8 GEMM with int32 accumulation on a
GPU: exact, so the same accumulator) on the int8 planes of both operands -- each row ``[even | odd]`` elements, so
one int8 GEMM of depth K gives ``acc`` -- then ``w4a4_splitk_epilogue_kernel`` (one split) applies the epilogue.
The H200 measured Triton's plane GEMM at 1.10-1.30x FP16 at M = 2048; a library IMMA kernel may do better, at
the cost of an int32 [M, N] round trip through memory. An autotune candidate (same bits); not timed yet."""

# sm_80-89 (A100, RTX 30/40, Orin): mma.sync keeps both operand fragments and the accumulator in registers, and
# sm_86/89 give a block 99 KB of shared memory. Compiled for sm_80 and sm_89 (ptxas -v, no GPU), the sm_90 tables
# above spill there (256x128x128 packed: 3.3 KB per thread on sm_89, 18.7 KB on sm_80) or do not launch (the plane
# tiles' 128-192 KB); these tiles compile without spills within 99 KB on sm_80/86/87/89 (tests/kernels/test_aot.py).
# Not yet timed on such a GPU: the first of each bucket is a static choice, the autotuner picks among them.
GEMM_TILES_SM8X = {
    "small": [t for t in GEMM_TILES["small"] if t != (16, 64, 256, 1, 4, 3)],  # that one spills 8 B on sm_80
    "mid": [(64, 128, 64, 8, 4, 4), (128, 128, 64, 8, 8, 3), (64, 64, 128, 8, 4, 4)],  # 128x64x64: 32 B spill, sm_80
    "large": [(128, 256, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4), (128, 128, 64, 8, 8, 3)],
}
GEMM_PLANE_TILES_SM8X = {
    "small": GEMM_PLANE_TILES["small"],
    "mid": [(128, 64, 64, 8, 4, 4), (64, 64, 128, 8, 4, 4), (128, 128, 64, 8, 8, 3)],
    "large": [(128, 256, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4)],
}


def gemm_tables(cc: int | None) -> tuple[dict[str, list[tuple]], dict[str, list[tuple]]]:
    """(packed tiles, plane tiles) for compute capability ``cc`` (e.g. 89); None (the interpreter) and sm_90+
    get the sm_90 tables."""
    if cc is not None and cc < 90:
        return GEMM_TILES_SM8X, GEMM_PLANE_TILES_SM8X
    return GEMM_TILES, GEMM_PLANE_TILES


def _bucket(m: int) -> str:
    return "small" if m <= 16 else "mid" if m <= 256 else "large"


def gemm_candidates(m: int, k2: int, tiles: dict[str, list[tuple]] | None = None) -> list[dict[str, int]]:
    """Tile configs for M rows and K/2 packed bytes whose BK2 divides K/2 (the default first)."""
    tiles = GEMM_TILES if tiles is None else tiles
    keys = ("BM", "BN", "BK2", "GROUP_M", "num_warps", "num_stages")
    fits = [dict(zip(keys, t, strict=True)) for t in tiles[_bucket(m)] if k2 % t[2] == 0]
    return fits or [dict(zip(keys, (*tiles[_bucket(m)][0][:2], 32, *tiles[_bucket(m)][0][3:]),
                             strict=True))]


def gemm_config(m: int, k2: int, cc: int | None = None) -> dict[str, int]:
    """The default tile config (no autotuning) on compute capability ``cc``."""
    return gemm_candidates(m, k2, gemm_tables(cc)[0])[0]


TUNE_ERRORS: dict[tuple, str] = {}
"""(autotune key, candidate) -> the error a non-default candidate raised while being timed (it was skipped)."""


def _autotune(key: tuple, run: Callable[[dict[str, int]], object], candidates: list[dict[str, int]],
              timer: Callable[[Callable[[], object]], float] | None = None,
              same_bits: Callable[[dict[str, int]], bool] | None = None) -> dict:
    """Time each candidate once per key and keep the fastest. Any config computes the same bits (integer
    accumulation), so tuning changes speed only. The default ``timer`` is ``timing.gpu_ms``: GPU time of a CUDA-graph
    replay with L2 flushed, as ``tools/bench_kernels.py`` measures and a served decode step runs. (Eager timing
    counted the host's launch overhead, which made the two-launch split-K configs lose at M = 1 although their GPU
    time was 16-34 % lower on an H200.) A candidate that cannot run (out of shared memory, or any other error of a
    non-default candidate, e.g. a tensor-descriptor tile on an untested driver) is skipped and its error kept in
    ``TUNE_ERRORS``; the default's errors propagate. ``same_bits(cfg)`` (called for the candidates of kernels no GPU
    has validated, config ``"WGMMA"``) must hold before such a candidate is timed."""
    if key not in _TUNED:
        from triton.runtime.errors import OutOfResources

        if timer is None:
            from infoquant_export.kernels.timing import gpu_ms

            def timer(fn: Callable[[], object]) -> float:
                return gpu_ms(fn, warmup=3, rep=15)

        def timed(cfg: dict[str, int]) -> float:
            try:
                if cfg.get("WGMMA") and same_bits is not None and not same_bits(cfg):
                    TUNE_ERRORS[(key, tuple(sorted(cfg.items())))] = "different bits from the default config"
                    return math.inf
                return timer(lambda: run(cfg))
            except OutOfResources:  # a tile this GPU's shared memory cannot hold
                return math.inf
            except Exception as exc:
                if cfg is candidates[0]:
                    raise
                TUNE_ERRORS[(key, tuple(sorted(cfg.items())))] = f"{type(exc).__name__}: {exc}"[:300]
                return math.inf

        _TUNED[key] = min(candidates, key=timed)
    return _TUNED[key]


def w4a4_linear(act: PackedRows, weight: PackedWeight, residual: torch.Tensor | None = None,
                out_dtype: torch.dtype = torch.float32, config: dict[str, int] | None = None) -> torch.Tensor:
    """``((acc - z_a * rowsum) * s_a) * s_w + bias (+ residual)`` with ``acc = q_a @ codes_w^T`` in int32.

    Returns ``[M, N]`` in ``out_dtype``; bit-identical to ``integer_linear`` (+ residual) in float32. On a GPU the
    tile config is autotuned once per (M bucket, N, K, dtypes, GPU) among the tiles of ``gemm_tables(cc)`` and, on
    sm_90, ``GEMM_TMA_TILES`` (``INFOQUANT_GEMM_AUTOTUNE=0`` keeps the default); ``config`` forces one. Planar
    operands (``act.planes``; ``weight.planes`` when M >= ``W_PLANES_MIN_M``) run ``w4a4_gemm_v2_kernel`` with the
    plane tiles (same bits); a ``config`` may also set ``"W_PLANES"`` (0/1: use the weight's planes), ``"SWAP"``
    (0/1), ``"TMA"`` (1: ``w4a4_gemm_tma_kernel``; with ``"PERSISTENT": 1`` one program per SM looping over the
    output tiles), ``"SPLITS"`` (2, 4, ...: split-K, ``GEMM_SPLITK``) and
    ``"INT_MM"`` (1: ``torch._int_mm`` on both operands' planes + the epilogue kernel, ``GEMM_INT_MM_EPILOGUE``).
    """
    if act.bits != 4:
        raise KernelInputError(f"the W4A4 GEMM takes 4-bit activations, got {act.bits}-bit",
                               "quantize the activations with bits=4")
    _check_dtype("activation codes", act.codes, (torch.int8,) if act.planes else (torch.uint8,))
    _check_dtype("weight codes", weight.codes, (torch.uint8,))
    _check_dtype("out_dtype", torch.empty(0, dtype=out_dtype), FLOAT_DTYPES)
    for name, t in (("activation codes", act.codes), ("weight codes", weight.codes)):
        _check_contiguous(name, t)
    m, k2 = act.codes.shape[0], act.k2
    n = weight.out_features
    if weight.planes is not None:
        _check_dtype("weight planes", weight.planes, (torch.int8,))
        _check_contiguous("weight planes", weight.planes)
        if weight.planes.shape != (n, 2 * weight.codes.shape[1]):
            raise KernelInputError(f"weight planes {tuple(weight.planes.shape)} do not match codes "
                                   f"{tuple(weight.codes.shape)}", "build them with PackedWeight.with_planes()")
    if weight.codes.shape[1] != k2:
        raise KernelInputError(f"activation has {2 * k2} features but the weight expects {weight.in_features}",
                               "quantize the matching input")
    if k2 % 32:
        raise KernelInputError(f"in_features {2 * k2} is not a multiple of 64", "pad the layer to a multiple of 64")
    tensors = [act.codes, act.scale, act.zero, weight.codes, weight.scale, weight.rowsum]
    if weight.planes is not None:
        tensors.append(weight.planes)
    if weight.bias is not None:
        tensors.append(weight.bias)
    if residual is not None:
        _check_contiguous("residual", residual)
        _check_dtype("residual", residual, FLOAT_DTYPES)
        if residual.shape != (m, n):
            raise KernelInputError(f"residual {tuple(residual.shape)} does not match the output ({m}, {n})",
                                   "pass the residual as [tokens, out_features]")
        tensors.append(residual)
    _check_device(*tensors)
    y = torch.empty(m, n, dtype=out_dtype, device=act.codes.device)

    w_planes_default = weight.planes is not None and m >= W_PLANES_MIN_M

    def run(cfg: dict[str, int]) -> None:
        cfg = dict(cfg)
        use_wp = bool(cfg.pop("W_PLANES", w_planes_default))
        swap = bool(cfg.pop("SWAP", act.planes and not use_wp))
        tma = bool(cfg.pop("TMA", 0))
        persistent = bool(cfg.pop("PERSISTENT", 0))
        splits = int(cfg.pop("SPLITS", 1))
        int_mm = bool(cfg.pop("INT_MM", 0))
        if cfg.pop("WGMMA", 0):
            if not (act.planes and use_wp) or swap or tma or splits > 1 or int_mm:
                raise KernelInputError("config WGMMA=1 takes int8 planes of both operands and no other mode",
                                       "quantize with planes=True and use weight.with_planes(), or drop WGMMA")
            if act.codes.shape[1] < (cfg["num_stages"] - 1) * 2 * cfg["BK2"]:
                raise KernelInputError(f"config WGMMA=1 with {cfg['num_stages']} stages prefetches "
                                       f"{cfg['num_stages'] - 1} K steps of {2 * cfg['BK2']}, more than in_features "
                                       f"{act.codes.shape[1]}", "use fewer stages or a smaller BK2")
            if interpreted() or device_cc(y.device) != 90 or not tma_eligible(act, weight, y, residual):
                raise KernelInputError("config WGMMA=1 is the sm_90 Gluon kernel (wgmma and TMA, 16-byte aligned "
                                       "rows; Triton's interpreter cannot run it)", "drop WGMMA from the config")
            _launch_wgmma(act, weight, y, residual, cfg, persistent)
            return
        if use_wp and weight.planes is None:
            raise KernelInputError("config W_PLANES=1 but the weight has no planes", "use weight.with_planes()")
        grid = (triton_cdiv(m, cfg["BM"]) * triton_cdiv(n, cfg["BN"]),)
        # WORDS: word-parallel nibble unpacking (inline PTX: compiled code on NVIDIA GPUs only; same bits as the
        # interpreter's byte form, which ROCm builds of torch / Triton also get)
        common = dict(HAS_BIAS=weight.bias is not None, HAS_RES=residual is not None, enable_fp_fusion=False,
                      WORDS=not interpreted() and torch.version.hip is None)
        bias = weight.bias if weight.bias is not None else weight.scale
        res = residual if residual is not None else y
        res_stride = residual.stride(0) if residual is not None else 0

        def epilogue(part: torch.Tensor, splits: int, bm: int) -> None:
            """``w4a4_splitk_epilogue_kernel``: the int32 accumulator ``part`` (summed over ``splits``) -> y."""
            bn = SPLITK_EPILOGUE_BN
            kernel_module("gemm").w4a4_splitk_epilogue_kernel[(triton_cdiv(m, bm) * triton_cdiv(n, bn),)](
                part, act.scale, act.zero, weight.scale, weight.rowsum, bias, res, y, m, n, res_stride, y.stride(0),
                SPLITS=splits, HAS_BIAS=common["HAS_BIAS"], HAS_RES=common["HAS_RES"], BM=bm, BN=bn, num_warps=4,
                enable_fp_fusion=False)

        if persistent and not tma:
            raise KernelInputError("config PERSISTENT=1 is a mode of the tensor-descriptor kernel", "add TMA=1")
        if tma:
            if swap or not tma_eligible(act, weight, y, residual):
                raise KernelInputError("config TMA=1 needs SWAP=0, 16-byte aligned tensors and rows of a multiple "
                                       "of 16 bytes", "drop TMA from the config")
            from triton.tools.tensor_descriptor import TensorDescriptor

            w_codes = weight.planes if use_wp else weight.codes
            tiles = ([cfg["BM"], cfg["BK2"]], [cfg["BN"], cfg["BK2"]], [cfg["BM"], cfg["BN"]])
            # PERSISTENT: one program per SM (3 in the interpreter, so that a program takes several tiles)
            sms = 1
            if persistent:
                sms = torch.cuda.get_device_properties(y.device).multi_processor_count if y.is_cuda else 3
            kernel_module("gemm").w4a4_gemm_tma_kernel[(min(grid[0], sms),) if persistent else grid](
                TensorDescriptor.from_tensor(act.codes, tiles[0]), act.scale, act.zero,
                TensorDescriptor.from_tensor(w_codes, tiles[1]), weight.scale, weight.rowsum, bias,
                TensorDescriptor.from_tensor(res, tiles[2]), TensorDescriptor.from_tensor(y, tiles[2]), m, n, k2,
                A_PLANES=act.planes, W_PLANES=use_wp, PERSISTENT=persistent, NUM_SMS=sms,
                **common, **cfg)
            return
        if int_mm:  # the library's int8 GEMM (cuBLASLt IMMA on a GPU) on the planes, then the epilogue kernel
            if not (act.planes and weight.planes is not None) or (y.is_cuda and m <= 16):
                raise KernelInputError("config INT_MM=1 takes int8 planes of both operands and, on a GPU, M > 16",
                                       "quantize with planes=True, use weight.with_planes(), or drop INT_MM")
            acc = torch._int_mm(act.codes, weight.planes.t())  # [even | odd] . [even | odd] = acc, exact int32
            epilogue(acc, 1, cfg["BM"])
            return
        if splits > 1:
            if act.planes or use_wp or swap or splits & (splits - 1):
                raise KernelInputError(f"config SPLITS={splits} takes packed operands and a power-of-two split "
                                       "count", "drop SPLITS from the config")
            mod = kernel_module("gemm")
            chunk = triton_cdiv(triton_cdiv(k2, splits), cfg["BK2"]) * cfg["BK2"]
            part = torch.empty(splits, m, n, dtype=torch.int32, device=y.device)
            mod.w4a4_gemm_splitk_kernel[(grid[0], splits)](
                act.codes, weight.codes, part, m, n, k2, chunk, act.codes.stride(0), weight.codes.stride(0),
                WORDS=common["WORDS"], **cfg)
            epilogue(part, splits, cfg["BM"])
            return
        if not (act.planes or use_wp or swap):  # the packed operands of the default kernel
            kernel_module("gemm").w4a4_gemm_kernel[grid](
                act.codes, act.scale, act.zero, weight.codes, weight.scale, weight.rowsum, bias, res, y,
                m, n, k2, act.codes.stride(0), weight.codes.stride(0), res_stride, y.stride(0), **common, **cfg)
            return
        w_codes = weight.planes if use_wp else weight.codes
        kernel_module("gemm").w4a4_gemm_v2_kernel[grid](
            act.codes, act.scale, act.zero, w_codes, weight.scale, weight.rowsum, bias, res, y,
            m, n, k2, act.codes.stride(0), k2 if act.planes else 0, w_codes.stride(0), k2 if use_wp else 0,
            res_stride, y.stride(0), A_PLANES=act.planes, W_PLANES=use_wp, SWAP=swap, **common, **cfg)

    if config is None:
        planar = act.planes or w_planes_default
        cc = device_cc(y.device)
        int_mm_ok = act.planes and weight.planes is not None and n % 8 == 0  # K = 2 * k2: a multiple of 64
        tma_ok = tma_eligible(act, weight, y, residual)
        wgmma_ok = WGMMA_CANDIDATES and act.planes and w_planes_default and tma_ok
        candidates = linear_candidates(m, k2, planar, cc, tma_ok, int_mm_ok, wgmma_ok)
        config = candidates[0]
        if len(candidates) > 1 and not interpreted() and os.environ.get("INFOQUANT_GEMM_AUTOTUNE", "1") != "0":
            key = tune_key(m, n, k2, out_dtype, weight.bias is not None, residual is not None, act.planes,
                           w_planes_default, cc)

            def same_bits(cfg: dict[str, int]) -> bool:
                run(candidates[0])
                ref = y.clone()
                run(cfg)
                return torch.equal(y, ref)

            if key in _TUNED or not torch.cuda.is_current_stream_capturing():  # no timing inside a capture
                config = _autotune(key, run, candidates, same_bits=same_bits)
    run(config)
    return y


def _launch_wgmma(act: PackedRows, weight: PackedWeight, y: torch.Tensor, residual: torch.Tensor | None,
                  cfg: dict[str, int], persistent: bool = False) -> None:
    """``gemm_wgmma.w4a4_gemm_wgmma_kernel`` (``persistent``: ``w4a4_gemm_wgmma_persistent_kernel``, one program
    per SM) on both operands' int8 planes: tensor descriptors with the shared layouts wgmma reads (Gluon spells them
    out), a K step of ``2 * BK2`` plane columns."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    gl_dtype = {torch.int8: gl.int8, torch.float16: gl.float16, torch.bfloat16: gl.bfloat16, torch.float32: gl.float32}

    def desc(t: torch.Tensor, block: list[int]) -> TensorDescriptor:
        return TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, gl_dtype[t.dtype]))

    mod = kernel_module("gemm_wgmma")
    m, n = y.shape
    bm, bn, bk = cfg["BM"], cfg["BN"], 2 * cfg["BK2"]
    tiles = triton_cdiv(m, bm) * triton_cdiv(n, bn)
    args = (desc(act.codes, [bm, bk]), act.scale, act.zero, desc(weight.planes, [bn, bk]), weight.scale,
            weight.rowsum, weight.bias if weight.bias is not None else weight.scale,
            desc(residual if residual is not None else y, [bm, bn]), desc(y, [bm, bn]), m, n, act.codes.shape[1])
    consts = dict(HAS_BIAS=weight.bias is not None, HAS_RES=residual is not None, GROUP_M=cfg["GROUP_M"],
                  STAGES=cfg["num_stages"], ACC_LAYOUT=mod.mma_layout(bm, bn, cfg["num_warps"]),
                  num_warps=cfg["num_warps"], enable_fp_fusion=False)
    if persistent:
        sms = torch.cuda.get_device_properties(y.device).multi_processor_count if y.is_cuda else 132
        mod.w4a4_gemm_wgmma_persistent_kernel[(min(tiles, sms),)](*args, NUM_PROGRAMS=sms, **consts)
    else:
        mod.w4a4_gemm_wgmma_kernel[(tiles,)](*args, **consts)


def tune_key(m: int, n: int, k2: int, out_dtype: torch.dtype, bias: bool, residual: bool, a_planes: bool,
             w_planes: bool, cc: int | None) -> tuple:
    """The autotuner's cache key of a ``w4a4_linear`` call (``_TUNED[key]`` is the chosen tile); it includes
    ``WGMMA_CANDIDATES``, which changes the candidates."""
    return (_bucket(m), n, k2, out_dtype, bias, residual, a_planes, w_planes, cc, WGMMA_CANDIDATES)


def linear_candidates(m: int, k2: int, planar: bool, cc: int | None, tma_ok: bool,
                      int_mm_ok: bool = False, wgmma_ok: bool = False) -> list[dict[str, int]]:
    """``w4a4_linear``'s autotune candidates, the default first: the tiles of ``gemm_tables(cc)`` (plane tiles
    for planar operands), on sm_90 the TMA tiles (``tma_ok``), for M <= 16 with packed operands the split-K
    configs of ``GEMM_SPLITK``, on a GPU for M > 16 with both operands as planes (``int_mm_ok``) the library's
    int8 GEMM plus the epilogue kernel (``INT_MM``); with ``wgmma_ok`` (``WGMMA_CANDIDATES``, both operands as
    planes) on sm_90 for M > 16 the Gluon GEMM's tiles (M > 256: its persistent form too)."""
    packed_tiles, plane_tiles = gemm_tables(cc)
    candidates = gemm_candidates(m, k2, plane_tiles if planar else packed_tiles)
    if cc is not None and 90 <= cc < 100 and tma_ok:
        candidates += [{**c, "TMA": 1, "SWAP": 0} for c in gemm_candidates(m, k2, GEMM_TMA_TILES)]
    if m <= 16 and not planar:
        candidates += [{**c, "SPLITS": sp} for sp in GEMM_SPLITK["splits"]
                       for c in gemm_candidates(m, k2, {"small": GEMM_SPLITK["tiles"]})]
    if int_mm_ok and cc is not None and m > 16:
        candidates.append({**GEMM_INT_MM_EPILOGUE, "INT_MM": 1})
    if wgmma_ok and cc == 90 and m > 16:
        keys = ("BM", "BN", "BK2", "GROUP_M", "num_warps", "num_stages")
        tiles = [(t, 0) for t in GEMM_WGMMA_TILES if m > 256 or t[0] * t[1] <= 128 * 128]  # M <= 256: SMs filled
        tiles += [(t, 1) for t in GEMM_WGMMA_PERSISTENT_TILES if m > 256]
        candidates += [{**dict(zip(keys, t, strict=True)), "W_PLANES": 1, "SWAP": 0, "WGMMA": 1, "PERSISTENT": p}
                       for t, p in tiles if k2 % t[2] == 0 and k2 >= (t[5] - 1) * t[2]]  # K covers the prefetch
    return candidates


def tma_eligible(act: PackedRows, weight: PackedWeight, y: torch.Tensor, residual: torch.Tensor | None) -> bool:
    """Whether ``w4a4_gemm_tma_kernel`` can take these tensors: TMA needs 16-byte aligned bases and row strides."""
    w_codes = weight.planes if weight.planes is not None else weight.codes
    tensors = [act.codes, weight.codes, w_codes, y] + ([residual] if residual is not None else [])
    return all(t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 for t in tensors)
