"""Decode attention over the 4-bit KV cache: ``kv4_decode_attention`` (split-K partials, then a combine kernel)
and its tile heuristics."""

from __future__ import annotations

import math
import os

import torch

from infoquant_export.kernels import interpreted, kernel_module
from infoquant_export.kernels.checks import (
    FLOAT_DTYPES,
    KernelInputError,
    _check_contiguous,
    _check_device,
    _check_dtype,
    _pow2,
    device_cc,
    triton_cdiv,
)
from infoquant_export.kernels.kv import KVCache4, _check_cache

_DOT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # tensor-core dot dtype of the decode kernel


def decode_tile(group: int) -> tuple[int, int]:
    """(query rows per program, tokens per step) of the decode kernel for a GQA group: rows padded to >= 16 for the
    tensor cores; 128 tokens per step (H100, D=128: faster than 32 / 64), 64 for groups above 16."""
    gp = max(16, _pow2(group))
    return gp, 128 if gp <= 16 else 64


# (tokens per step, warps) of the CUDA-core decode kernel: the fastest of the six tiles timed on an H200 at every
# shape of tools/bench_kernels.py --sections variants (2026-11-27; LLaMA-2-7B heads, batch 1 / 16, context 4k / 32k:
# 1.05 / 1.25 / 1.21 / 1.32x SDPA against 0.96 / 1.01 / 1.00 / 1.00x for the earlier static choice 32 x 8).
DECODE_CC_TILE = (64, 4)
# software-pipeline stages of the CUDA-core kernel's token loop: 1 (not pipelined) is what the tiles above were
# timed with; 2-4 copy the next tiles asynchronously (same values; to be timed: tools/bench_kernels.py variants)
DECODE_CC_STAGES = 1
FLOAT_2_23_BITS = 0x4B000000  # the CUDA-core decode kernel's magic_bits argument (the float 2^23)
# (tokens per warp and step, warps) of the Gluon mma.sync decode kernel (kernel="mma"): 32 x 4 has the fewest
# instructions per cached code at 12 resident warps (sm_90: 657 per thread and step, 2.57 per code against 4.69 for
# "ccs" 64 x 4; BENCHMARKS.md); not timed on a GPU yet
DECODE_MMA_TILE = (32, 4)
# its stages: 1 loads each step's codes and computes; 2 (PREFETCH) loads the next step's into registers while this
# one computes (token indices clamped instead of masked: 16 x 4 then keeps 16 resident warps on sm_90, 128
# registers, 3.27 instructions per code); to be timed
DECODE_MMA_STAGES = 1
DECODE_KERNELS = ("tc", "cc", "ccs", "mma")


def decode_splits(batch_heads: int, max_len: int, block_t: int, target_programs: int) -> int:
    """Power-of-2 number of context chunks so that ``batch_heads * splits`` fills the GPU."""
    splits = 1
    while batch_heads * splits < target_programs and splits * 2 * block_t <= max_len and splits < 256:
        splits *= 2
    return splits


def kv4_decode_attention(q: torch.Tensor, k: KVCache4, v: KVCache4, lengths: torch.Tensor, max_len: int,
                         splits: int | None = None, block_t: int | None = None, num_warps: int | None = None,
                         num_stages: int | None = None, check_lengths: bool = True,
                         kernel: str | None = None) -> torch.Tensor:
    """Attention of one new token per row, ``q [B, Hq, D]``, over the 4-bit caches' first ``lengths[b]`` tokens.

    ``max_len`` (>= every length) sizes the split and is checked against ``lengths`` when ``check_lengths`` (a host
    sync on the GPU; skipped during CUDA-graph capture). The kernel clamps lengths to ``max_len``, so it never reads
    past it. Returns ``[B, Hq, D]`` in q's dtype (float32 softmax; tensor-core
    dot products in float16 for a float16 q). ``splits`` / ``block_t`` / warps / stages override the heuristics
    (stages: 3 for "tc", ``DECODE_CC_STAGES`` for "cc", where it sets the token loop's own pipelining,
    ``DECODE_MMA_STAGES`` for "mma", 1 or 2: the next step loaded into registers during this one).
    ``kernel``: ``"tc"`` the tensor-core kernel (a GQA group per program, 4 warps), ``"cc"`` the CUDA-core kernel
    (``kv4_decode_partial_cc_kernel``: one query head per program, float32 throughout, ``DECODE_CC_TILE``), ``"ccs"``
    the same with a running max per token slot (``SLOTS``: no block-wide reduction per tile), ``"mma"`` the Gluon
    kernel with the dequantized cache in the tensor cores' operand registers (``attention_mma``: a float16 q, GQA
    groups of up to 8 heads, head_dim 64 / 128 / 256, sm_80+; ``DECODE_MMA_TILE``: ``block_t`` is then the tokens
    per warp and step); default ``$INFOQUANT_DECODE_KERNEL`` or ``"tc"``.
    """
    kernel = kernel or os.environ.get("INFOQUANT_DECODE_KERNEL", "tc")
    _check_dtype("q", q, FLOAT_DTYPES)
    _check_contiguous("q", q)
    _check_dtype("lengths", lengths, (torch.int32,))
    if q.dim() != 3:
        raise KernelInputError(f"q must be [batch, heads, head_dim], got {tuple(q.shape)}", "pass one token per row")
    b, hq, d = q.shape
    hkv = k.codes.shape[1]
    if k.codes.shape != v.codes.shape or k.codes.shape[0] != b or k.head_dim != d:
        raise KernelInputError(f"caches {tuple(k.codes.shape)} / {tuple(v.codes.shape)} do not fit q {tuple(q.shape)}",
                               "use the caches written for this batch and head_dim")
    if hq % hkv:
        raise KernelInputError(f"{hq} query heads are not a multiple of {hkv} KV heads", "check num_kv_heads")
    if d < 16 or d & (d - 1):
        raise KernelInputError(f"head_dim {d} is not a power of two >= 16", "use the fake-quant model")
    if not 0 < max_len <= k.capacity or lengths.shape != (b,):
        raise KernelInputError(f"max_len {max_len} / lengths {tuple(lengths.shape)} invalid for a cache of "
                               f"{k.capacity} and batch {b}", "pass lengths [B] int32 with 0 < length <= max_len")
    _check_cache(k)
    _check_cache(v)
    _check_device(q, lengths, k.codes, v.codes)
    for name, value, least in (("splits", splits, 1), ("block_t", block_t, 16)):
        if value is not None and (value < least or value & (value - 1)):
            raise KernelInputError(f"{name}={value} is not a power of two >= {least}", f"pass a valid {name} or None")
    if num_stages is not None and num_stages < 1:
        raise KernelInputError(f"num_stages={num_stages} is below 1", "pass num_stages >= 1 or None")
    capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
    if check_lengths and not capturing and lengths.numel() and (int(lengths.max()) > max_len or
                                                                int(lengths.min()) < 1):
        raise KernelInputError(f"lengths {lengths.tolist()} outside 1..max_len={max_len}",
                               "pass max_len >= every length (and every length >= 1)")
    if kernel not in DECODE_KERNELS:
        raise KernelInputError(f"kernel={kernel!r} is not one of {DECODE_KERNELS}",
                               "pass kernel='tc' (tensor cores), 'cc' or 'ccs' (CUDA cores) or 'mma' (Gluon)")
    slots = kernel == "ccs"
    kernel = "cc" if slots else kernel
    if kernel in ("cc", "mma") and (k.codes.data_ptr() % 4 or v.codes.data_ptr() % 4):
        raise KernelInputError(f"kernel='{kernel}' reads the cache codes as 32-bit words; these start at an offset "
                               "that is not a multiple of 4 bytes", "allocate the caches with KVCache4.empty")
    g = hq // hkv
    if kernel == "mma":
        return _decode_mma(q, k, v, lengths, max_len, g, splits, block_t, num_warps, num_stages)
    gp, default_block_t = decode_tile(g)
    block_t = block_t or (DECODE_CC_TILE[0] if kernel == "cc" else default_block_t)
    num_warps = num_warps or (DECODE_CC_TILE[1] if kernel == "cc" else 4)
    num_stages = num_stages or (DECODE_CC_STAGES if kernel == "cc" else 3)
    programs = b * (hq if kernel == "cc" else hkv)
    splits = splits or decode_splits(programs, max_len, block_t, _target_programs(q))
    args, parts = _partials(q, k, v, lengths, max_len, splits, block_t)
    mod = kernel_module("attention")
    if kernel == "cc":
        mod.kv4_decode_partial_cc_kernel[(programs, splits)](
            *args, FLOAT_2_23_BITS, G=g, D=d, BT=block_t, SPLITS=splits, STAGES=num_stages, SLOTS=slots,
            num_warps=num_warps, num_stages=num_stages)
    else:
        mod.kv4_decode_partial_kernel[(programs, splits)](
            *args, G=g, GP=gp, D=d, BT=block_t, SPLITS=splits, DOT=_DOT[q.dtype], num_warps=num_warps,
            num_stages=num_stages)
    return _combine(q, parts, splits)


def _target_programs(q: torch.Tensor) -> int:
    """Programs that fill the GPU (4 per SM; 4 in the interpreter): what ``decode_splits`` aims at."""
    return 4 * (torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1)


def _partials(q: torch.Tensor, k: KVCache4, v: KVCache4, lengths: torch.Tensor, max_len: int, splits: int,
              step: int) -> tuple[tuple, tuple[torch.Tensor, ...]]:
    """The partial kernels' common arguments (each split's chunk of tokens a multiple of ``step``) and their
    float32 partials (o ``[B, Hq, S, D]``, m / l ``[B, Hq, S]``)."""
    b, hq, d = q.shape
    chunk = triton_cdiv(triton_cdiv(max_len, splits), step) * step
    parts = (torch.empty(b, hq, splits, d, dtype=torch.float32, device=q.device),
             torch.empty(b, hq, splits, dtype=torch.float32, device=q.device),
             torch.empty(b, hq, splits, dtype=torch.float32, device=q.device))
    args = (q, q.stride(0), q.stride(1), k.codes, k.scale, k.zero, v.codes, v.scale, v.zero,
            k.codes.stride(0), k.codes.stride(1), k.codes.stride(2), k.scale.stride(0), k.scale.stride(1),
            lengths, *parts, k.codes.shape[1], chunk, max_len, float(d ** -0.5 * math.log2(math.e)))
    return args, parts


def _combine(q: torch.Tensor, parts: tuple[torch.Tensor, ...], splits: int) -> torch.Tensor:
    """``kv4_decode_combine_kernel``: the splits' partials merged into the output, in q's dtype."""
    out = torch.empty_like(q)
    kernel_module("attention").kv4_decode_combine_kernel[(q.shape[0] * q.shape[1],)](
        *parts, out, SPLITS=splits, SP=splits, D=q.shape[2], num_warps=4)
    return out


def _decode_mma(q: torch.Tensor, k: KVCache4, v: KVCache4, lengths: torch.Tensor, max_len: int, group: int,
                splits: int | None, block_t: int | None, num_warps: int | None,
                num_stages: int | None) -> torch.Tensor:
    """``kv4_decode_attention(..., kernel="mma")``: ``attention_mma.kv4_decode_partial_mma_kernel`` (a GQA group per
    program, ``block_t`` tokens per warp and step; ``num_stages`` 2: the next step's loads in flight during this
    step, ``PREFETCH``), then the combine kernel."""
    b, _, d = q.shape
    hkv = k.codes.shape[1]
    if q.dtype != torch.float16 or group > 8 or d not in (64, 128, 256):
        raise KernelInputError(f"kernel='mma' takes a float16 q, GQA groups of up to 8 query heads and head_dim 64 / "
                               f"128 / 256 (got {q.dtype}, group {group}, head_dim {d})", "use kernel='tc'")
    if interpreted() or (device_cc(q.device) or 0) < 80:
        raise KernelInputError("kernel='mma' is compiled GPU code (mma.sync, sm_80+; Triton's interpreter cannot run "
                               "Gluon)", "use kernel='tc'")
    block_t = block_t or DECODE_MMA_TILE[0]
    num_warps = num_warps or DECODE_MMA_TILE[1]
    num_stages = num_stages or DECODE_MMA_STAGES
    if block_t not in (16, 32, 64) or num_warps not in (1, 2, 4, 8) or num_stages > 2:
        raise KernelInputError(f"kernel='mma' takes 16 / 32 / 64 tokens per warp, 1 / 2 / 4 / 8 warps and 1 / 2 stages "
                               f"(got {block_t}, {num_warps}, {num_stages})",
                               "pass block_t / num_warps / num_stages from those, or None")
    step = block_t * num_warps
    splits = splits or decode_splits(b * hkv, max_len, step, _target_programs(q))
    args, parts = _partials(q, k, v, lengths, max_len, splits, step)
    mod = kernel_module("attention_mma")
    mod.kv4_decode_partial_mma_kernel[(b * hkv, splits)](
        *args, G=group, D=d, BTW=block_t, SPLITS=splits, PREFETCH=num_stages == 2,
        **mod.decode_mma_layouts(num_warps, d), num_warps=num_warps)
    return _combine(q, parts, splits)
