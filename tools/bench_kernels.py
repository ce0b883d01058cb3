"""Benchmark the W4A4KV4 kernels against torch FP16 (cuBLAS / SDPA) and a device-to-device copy; prints JSON.

    python tools/bench_kernels.py [--sections gemm,quantize,attention,e2e,profile,sweep,variants] [--e2e-layers 4]
        [--out r.json]     # sections run in the order given; --out is rewritten after each one
        [--variant-kinds attention,quantize,gemm,k_step] [--variants-budget-s 170]   # --sections variants
    python tools/bench_kernels.py --smoke      # tiny shapes in Triton's interpreter on the CPU (checks the script)

Times are medians of ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs) in milliseconds, kernels and
baselines measured side by side in one process on one GPU. Shapes: LLaMA-2-7B (hidden 4096, intermediate 11008,
32 heads of 128).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from infoquant_export.kernels import attention, linear, ops
from infoquant_export.kernels import rows as row_kernels
from infoquant_export.kernels.timing import gpu_ms, graphed

GEMM_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (N, K): qkv/o, gate/up, down
GEMM_MS = [1, 16, 256, 2048]
QUANT_WARPS = [2, 4, 8, 16]
ATTN_VARIANTS = [(32, 4, 3, 1), (64, 4, 3, 1), (128, 4, 3, 1), (128, 8, 3, 1), (64, 4, 4, 2), (128, 8, 4, 2)]


def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def bench(fn: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds of ``fn``."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _packed_weight(n: int, k: int, device: torch.device) -> ops.PackedWeight:
    codes = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    return ops.PackedWeight.from_codes(codes, torch.full((n,), 0.01)).to(device)


def _quant_gemm(x: torch.Tensor, weight: ops.PackedWeight) -> torch.Tensor:
    return ops.w4a4_linear(ops.quantize_rows(x, 4, 0.9), weight, out_dtype=torch.float16)


def gemm_section(device: torch.device, shapes: list[tuple[int, int]], ms: list[int]) -> list[dict]:
    rows = []
    for n, k in shapes:
        weight = _packed_weight(n, k, device)
        w16 = torch.randn(n, k, dtype=torch.float16, device=device)
        for m in ms:
            x = torch.randn(m, k, dtype=torch.float16, device=device)
            act = ops.quantize_rows(x, 4, 0.9)
            t_fp16 = bench(partial(F.linear, x, w16), device)
            t_gemm = bench(partial(ops.w4a4_linear, act, weight, out_dtype=torch.float16), device)
            t_full = bench(partial(_quant_gemm, x, weight), device)
            flops = 2 * m * n * k
            graph = {}
            if device.type == "cuda":  # also CUDA-graph replays: GPU time without Python / launch overhead
                graph = {"graph_fp16_ms": bench(graphed(partial(F.linear, x, w16)), device),
                         "graph_w4a4_gemm_ms": bench(graphed(partial(ops.w4a4_linear, act, weight,
                                                                     out_dtype=torch.float16)), device),
                         "graph_w4a4_quant_gemm_ms": bench(graphed(partial(_quant_gemm, x, weight)), device)}
                graph["graph_speedup_gemm"] = graph["graph_fp16_ms"] / graph["graph_w4a4_gemm_ms"]
                graph["graph_speedup_quant_gemm"] = graph["graph_fp16_ms"] / graph["graph_w4a4_quant_gemm_ms"]
            rows.append({**graph, "M": m, "N": n, "K": k, "fp16_ms": t_fp16, "w4a4_gemm_ms": t_gemm,
                         "w4a4_quant_gemm_ms": t_full, "speedup_gemm": t_fp16 / t_gemm,
                         "speedup_quant_gemm": t_fp16 / t_full, "fp16_tflops": flops / t_fp16 / 1e9,
                         "w4a4_tops": flops / t_gemm / 1e9,
                         "config": linear._TUNED.get(linear.tune_key(m, n, k // 2, torch.float16, False, False, False,
                                                                     False, ops.device_cc(device)))})
    return rows


def sweep_section(device: torch.device, shapes: list[tuple[int, int]], ms: list[int]) -> list[dict]:
    rows = []
    for n, k in shapes:
        weight = _packed_weight(n, k, device)
        for m in ms:
            act = ops.quantize_rows(torch.randn(m, k, dtype=torch.float16, device=device), 4, 0.9)
            results = []
            for cfg in ops.gemm_candidates(m, k // 2):
                try:
                    t = bench(partial(ops.w4a4_linear, act, weight, out_dtype=torch.float16, config=cfg), device)
                except Exception as exc:  # out of shared memory / registers for this tile: record and go on
                    results.append({"config": cfg, "error": str(exc).splitlines()[0][:200]})
                    continue
                results.append({"config": cfg, "ms": t, "tops": 2 * m * n * k / t / 1e9})
            rows.append({"M": m, "N": n, "K": k, "results": results})
    return rows


def quantize_section(device: torch.device, m: int, sizes: list[tuple[int, int | None]],
                     sweep: bool) -> list[dict]:
    """Fused (Hadamard +) quantize of [m, n] float16 rows vs a copy of the same tensor."""
    rows = []
    for n, blocks in sizes:
        x = torch.randn(m, n, dtype=torch.float16, device=device)
        y = torch.empty_like(x)
        t_copy = bench(partial(y.copy_, x), device)
        copy_gbs = 2 * x.numel() * 2 / t_copy / 1e6
        t_q = bench(partial(ops.quantize_rows, x, 4, 0.9, None, blocks), device)
        warps = {w: bench(partial(ops.quantize_rows, x, 4, 0.9, None, blocks, w), device)
                 for w in (QUANT_WARPS if sweep else [])}
        moved = x.numel() * 2 + x.numel() // 2 + m * 5  # read fp16, write packed codes + scale + zero point
        tile = ops.row_tile(n, blocks or 1, blocks is not None)
        graph = {}
        if device.type == "cuda":  # GPU time without the Python wrapper's launch overhead
            g_copy = bench(graphed(partial(y.copy_, x)), device)
            g_q = bench(graphed(partial(ops.quantize_rows, x, 4, 0.9, None, blocks)), device)
            graph = {"graph_copy_ms": g_copy, "graph_kernel_ms": g_q,
                     "graph_fraction_of_copy": (moved / g_q) / (2 * x.numel() * 2 / g_copy)}
        rows.append({**graph, "M": m, "n": n, "hadamard_blocks": blocks, "fused": tile.fused, "K": tile.k, "p": tile.p,
                     "copy_ms": t_copy, "copy_GBps": copy_gbs, "kernel_ms": t_q,
                     "kernel_GBps": moved / t_q / 1e6, "fraction_of_copy": moved / t_q / 1e6 / copy_gbs,
                     "ms_by_num_warps": warps})
    return rows


def attention_section(device: torch.device, cases: list[tuple[int, int]], heads: int, head_dim: int,
                      sweep: bool) -> list[dict]:
    rows = []
    for batch, ctx in cases:
        k4 = ops.KVCache4(torch.randint(0, 256, (batch, heads, ctx, head_dim // 2), dtype=torch.uint8, device=device),
                          torch.rand(batch, heads, ctx, device=device) * 0.1,
                          torch.randint(0, 16, (batch, heads, ctx), dtype=torch.uint8, device=device))
        v4 = ops.KVCache4(k4.codes.clone(), k4.scale.clone(), k4.zero.clone())
        q = torch.randn(batch, heads, head_dim, dtype=torch.float16, device=device)
        lengths = torch.full((batch,), ctx, dtype=torch.int32, device=device)
        t_kv4 = bench(partial(ops.kv4_decode_attention, q, k4, v4, lengths, ctx), device)
        g_kv4 = bench(graphed(partial(ops.kv4_decode_attention, q, k4, v4, lengths, ctx)), device) \
            if device.type == "cuda" else t_kv4
        variants = []
        for block_t, warps, stages, split_mult in ATTN_VARIANTS if sweep else []:
            splits = ops.decode_splits(batch * heads, ctx, block_t, split_mult * 4 * _sms(device))
            t = bench(partial(ops.kv4_decode_attention, q, k4, v4, lengths, ctx, splits, block_t, warps, stages),
                      device)
            variants.append({"block_t": block_t, "num_warps": warps, "num_stages": stages, "splits": splits, "ms": t})
        del k4, v4
        k16 = torch.randn(batch, heads, ctx, head_dim, dtype=torch.float16, device=device)
        v16 = torch.randn_like(k16)
        q4 = q[:, :, None, :]
        t_sdpa = bench(partial(F.scaled_dot_product_attention, q4, k16, v16), device)
        g_sdpa = bench(graphed(partial(F.scaled_dot_product_attention, q4, k16, v16)), device) \
            if device.type == "cuda" else t_sdpa
        del k16, v16
        kv_bytes_fp16 = 2 * batch * heads * ctx * head_dim * 2
        kv_bytes_4 = 2 * batch * heads * ctx * (head_dim // 2 + 5)
        rows.append({"batch": batch, "context": ctx, "heads": heads, "head_dim": head_dim, "sdpa_fp16_ms": t_sdpa,
                     "kv4_ms": t_kv4, "speedup": t_sdpa / t_kv4, "sdpa_GBps": kv_bytes_fp16 / t_sdpa / 1e6,
                     "kv4_GBps": kv_bytes_4 / t_kv4 / 1e6, "graph_sdpa_fp16_ms": g_sdpa, "graph_kv4_ms": g_kv4,
                     "graph_speedup": g_sdpa / g_kv4, "variants": variants})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# --sections variants: the exactness-preserving performance variants side by side with today's defaults (issue 6).
# GEMM: (name, activation planes, weight planes, swap, tile (BM, BN, BK2, GROUP_M, warps, stages) or None = default);
# "tma_*": the tensor-descriptor kernel (ops.GEMM_TMA_TILES, spill-free on sm_90); "wgmma_*": the Gluon sm_90 kernel
VARIANT_GEMM = {  # the H200 run's best of each layout kept (docs/bench/variants-h200.json), the new kernels first
    # M <= 16 (decode): split-K over 2 / 4 / 8 programs per column tile (w4a4_gemm_splitk_kernel + epilogue)
    "small": [("default", False, False, False, None),
              ("splitk2", False, False, False, (16, 32, 128, 1, 4, 4)),
              ("splitk4", False, False, False, (16, 32, 128, 1, 4, 4)),
              ("splitk8", False, False, False, (16, 32, 128, 1, 4, 4)),
              ("splitk4", False, False, False, (16, 64, 128, 1, 4, 4)),
              ("splitk8", False, False, False, (16, 64, 128, 1, 4, 4))],
    "mid": [("default", False, False, False, None),
            # the Gluon sm_90 kernel: int8 MMAs kept in flight across K steps (ops.GEMM_WGMMA_TILES)
            ("wgmma_planes", True, True, False, (64, 128, 64, 8, 4, 4)),
            ("wgmma_planes", True, True, False, (128, 128, 64, 8, 4, 3)),
            ("tma_planes_persistent", True, True, False, (128, 128, 64, 8, 8, 4)),  # one program per SM
            ("int_mm", True, True, False, (32, 128, 32, 1, 4, 1)),  # torch._int_mm + epilogue (BM, BN used)
            ("tma_packed", False, False, False, (128, 64, 64, 8, 4, 4)),
            ("tma_packed", False, False, False, (128, 128, 64, 8, 8, 5)),
            ("tma_aplanes", True, False, False, (64, 128, 128, 8, 4, 4)),
            ("tma_planes", True, True, False, (64, 128, 128, 8, 4, 4)),
            ("planes", True, True, False, (64, 128, 128, 8, 4, 4)),
            ("aplanes_swap", True, False, True, (128, 64, 64, 8, 4, 4)),
            ("wplanes", False, True, False, (128, 64, 64, 8, 4, 4))],
    "large": [("default", False, False, False, None),
              *(("wgmma_planes", True, True, False, t) for t in ops.GEMM_WGMMA_TILES),
              *(("wgmma_planes_persistent", True, True, False, t) for t in ops.GEMM_WGMMA_PERSISTENT_TILES),
              # one program per SM looping over the tiles (shared memory <= 227 KB: 2 stages at 128 x 256)
              ("tma_planes_persistent", True, True, False, (128, 256, 64, 8, 8, 2)),
              ("tma_planes_persistent", True, True, False, (128, 128, 64, 8, 8, 4)),
              ("tma_packed_persistent", False, False, False, (128, 256, 64, 8, 8, 3)),
              ("tma_packed_persistent", False, False, False, (128, 128, 128, 8, 8, 3)),
              ("int_mm", True, True, False, (32, 128, 32, 1, 4, 1)),
              ("tma_packed", False, False, False, (128, 256, 64, 8, 8, 4)),
              ("tma_packed", False, False, False, (256, 128, 64, 8, 8, 4)),
              ("tma_packed", False, False, False, (128, 128, 64, 8, 8, 5)),
              ("tma_aplanes", True, False, False, (128, 256, 64, 8, 8, 4)),
              ("tma_planes", True, True, False, (128, 256, 64, 8, 8, 4)),
              ("tma_planes", True, True, False, (256, 128, 64, 8, 8, 4)),
              ("planes", True, True, False, (128, 256, 64, 8, 8, 4)),
              ("aplanes_swap", True, False, True, (256, 128, 64, 8, 8, 4)),
              ("wplanes", False, True, False, (128, 256, 64, 8, 8, 4))],
}
# quantize: (name, num_warps or None = row_warps, chunk or None = one-pass row tile, planes, chunk-loop stages);
# "default" is ops.quantize_rows itself (the runtime's choice: chunked above ops.CHUNKED_ABOVE), "row_tile" the
# one-pass kernel, "default_div_rn" the default with div.rn.f32 per element (rows.FAST_DIV = False),
# "fwht_two_pass" the default with a single block's FWHT in two passes (rows.FWHT_TWO_PASS = True),
# "few_rows_off" the default with a few rows routed like many (rows.FEW_ROWS = 0; only rows below FEW_ROWS),
# "gluon" the Gluon kernel with the FWHT's stages laid out by hand (one Hadamard block, 1024-8192 values; GPU only)
VARIANT_QUANT = [("default", None, None, False, None), ("gluon", None, None, False, None),
                 ("fwht_two_pass", None, None, False, None),
                 ("few_rows_off", None, None, False, None),
                 ("default_div_rn", None, None, False, None),
                 ("row_tile", None, None, False, None),
                 ("chunk1024_w4_s2", 4, 1024, False, 2), ("chunk1024_w4_s3", 4, 1024, False, 3),
                 ("warps1", 1, None, False, None), ("warps2", 2, None, False, None), ("warps8", 8, None, False, None),
                 ("planes", None, None, True, None), ("chunk1024_w4", 4, 1024, False, 1),
                 ("chunk2048_w8", 8, 2048, False, 1)]
# a decode step's rows (1 and 16): the few-rows routes against the many-rows kernels, pipelined or not
DECODE_QUANT_VARIANTS = ("default", "few_rows_off", "chunk1024_w4_s3", "warps8")
# decode attention: (block_t, num_warps, num_stages, split multiplier of 4 programs per SM)
VARIANT_ATTN = [(128, 4, 3, 4)]  # 4x the splits (64-token tiles: 0.86-0.98x of SDPA on the H200, left out)
# the CUDA-core decode kernel: (kernel "cc" / "ccs" (a running max per token slot), block_t, num_warps, stages of
# its token loop, split multiplier); the default tile (ops.DECODE_CC_TILE) plain, pipelined and per slot first
# (The tiles the H200 measured slower than 64 x 4 in stop 19 -- 32 x 8 at 2x splits, 32 x 4, 64 x 8, 128 x 8 --
# and the tensor-core kernel's 64-token tiles are left out: docs/bench/h200-stop19.json.)
# ccs 32 x 4 and 64 x 8: 16 resident warps at the issue limit of 64 x 4 (12 warps; sm_90 hot loops, BENCHMARKS.md)
VARIANT_ATTN_CC = [("cc", 64, 4, 1, 1), ("cc", 64, 4, 2, 1), ("cc", 64, 4, 3, 1), ("ccs", 64, 4, 1, 1),
                   ("ccs", 64, 4, 3, 1), ("ccs", 32, 4, 1, 1), ("ccs", 64, 8, 1, 1), ("ccs", 32, 8, 1, 1),
                   ("ccs", 32, 8, 3, 1), ("cc", 32, 8, 1, 1), ("cc", 32, 8, 3, 1), ("cc", 32, 4, 3, 1)]
# the Gluon decode kernel (kernel "mma": the cache dequantized into mma.sync operand registers): (tokens per warp
# and step, warps, stages: 2 loads the next step during this one), its splits from the wrapper's heuristic; 32 x 4
# x 1 is ops.DECODE_MMA_TILE / DECODE_MMA_STAGES
VARIANT_ATTN_MMA = [(32, 4, 1), (16, 4, 2), (32, 4, 2), (16, 4, 1), (64, 4, 1), (32, 8, 1), (32, 2, 1)]
# e2e decode as served (CUDA graph) with other settings: (row name, decode kernel or None for the default,
# module settings {(module, name): value}): the Gluon and the CUDA-core decode attentions, and the decode step
# without the few-rows routes of the row kernels (rows.FEW_ROWS = 0: the chunked kernels a prefill takes)
SERVED_DECODE_VARIANTS = [("mma", "mma", {}),
                          ("cc", "cc", {(attention, "DECODE_CC_STAGES"): 1}),
                          ("ccs", "ccs", {(attention, "DECODE_CC_STAGES"): 1}),
                          ("ccs_s3", "ccs", {(attention, "DECODE_CC_STAGES"): 3}),
                          ("few_rows_off", None, {(row_kernels, "FEW_ROWS"): 0})]


class _Budget:
    """Stops starting new measurements after ``seconds`` (the rest are recorded as skipped)."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def over(self) -> bool:
        return time.perf_counter() > self.end


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    """Median ms of ``fn`` as a CUDA-graph replay (GPU time, no launch overhead); eager on the CPU."""
    if device.type != "cuda":
        return bench(fn, device)
    return gpu_ms(fn)


def _try(row: dict, key: str, fn: Callable[[], float]) -> None:
    try:
        row[key] = fn()
    except Exception as exc:  # out of shared memory / registers for a tile: record and go on
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}" if str(exc) else type(exc).__name__


def variants_gemm(device: torch.device, shapes: list[tuple[int, int]], ms: list[int], budget: _Budget) -> list[dict]:
    rows = []
    for n, k in shapes:
        weight = _packed_weight(n, k, device).with_planes()
        packed_only = ops.PackedWeight(weight.codes, weight.scale, weight.rowsum)
        w16 = torch.randn(n, k, dtype=torch.float16, device=device)
        for m in ms:
            x = torch.randn(m, k, dtype=torch.float16, device=device)
            act = ops.quantize_rows(x, 4, 0.9)
            act_p = ops.quantize_rows_variant(x, 4, 0.9, planes=True)
            row: dict = {"M": m, "N": n, "K": k, "variants": []}
            if budget.over():
                row["skipped"] = True
                rows.append(row)
                continue
            row["fp16_ms"] = _timed(partial(F.linear, x, w16), device)
            row["quant_ms"] = _timed(partial(ops.quantize_rows, x, 4, 0.9), device)
            row["quant_planes_ms"] = _timed(partial(ops.quantize_rows_variant, x, 4, 0.9, planes=True), device)
            ref = ops.w4a4_linear(act, packed_only, out_dtype=torch.float16)
            for name, a_planes, w_planes, swap, tile in VARIANT_GEMM["small" if m <= 16 else linear._bucket(m)]:
                if budget.over():
                    row["variants"].append({"name": name, "tile": tile, "skipped": True})
                    continue
                keys = ("BM", "BN", "BK2", "GROUP_M", "num_warps", "num_stages")
                cfg = ops.gemm_config(m, k // 2) if tile is None else dict(zip(keys, tile, strict=True))
                if tile is not None and (k // 2) % cfg["BK2"]:
                    continue
                if name.startswith("wgmma") and ops.device_cc(device) != 90:
                    continue  # the Gluon kernel: sm_90 only, no interpreter
                cfg = {**cfg, "W_PLANES": int(w_planes), "SWAP": int(swap)}
                if name.startswith("tma"):  # w4a4_gemm_tma_kernel (tensor descriptors; TMA on sm_90)
                    cfg["TMA"] = 1
                if name.startswith("wgmma"):  # gemm_wgmma.w4a4_gemm_wgmma(_persistent)_kernel (Gluon, sm_90)
                    cfg["WGMMA"] = 1
                if name.endswith("_persistent"):
                    cfg["PERSISTENT"] = 1
                if name.startswith("splitk"):
                    cfg["SPLITS"] = int(name.removeprefix("splitk"))
                if name == "int_mm":
                    cfg["INT_MM"] = 1
                a = act_p if a_planes else act
                fn = partial(ops.w4a4_linear, a, weight, out_dtype=torch.float16, config=cfg)
                v: dict = {"name": name, "config": cfg}
                _try(v, "gemm_ms", lambda fn=fn: _timed(fn, device))
                if "gemm_ms" in v:
                    v["same_bits"] = bool(torch.equal(fn(), ref))
                    v["speedup_gemm"] = row["fp16_ms"] / v["gemm_ms"]
                    v["quant_gemm_ms"] = v["gemm_ms"] + row["quant_planes_ms" if a_planes else "quant_ms"]
                    v["speedup_quant_gemm"] = row["fp16_ms"] / v["quant_gemm_ms"]
                    v["tops"] = 2 * m * n * k / v["gemm_ms"] / 1e9
                row["variants"].append(v)
            ok = [v for v in row["variants"] if "gemm_ms" in v and v["same_bits"]]
            if ok:
                best = min(ok, key=lambda v: v["quant_gemm_ms"])
                row["best"] = {"name": best["name"], "config": best["config"], "speedup_gemm": best["speedup_gemm"],
                               "speedup_quant_gemm": best["speedup_quant_gemm"]}
            rows.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _quantize_with(x: torch.Tensor, blocks: int | None, knob: str, value: object) -> ops.PackedRows:
    """``ops.quantize_rows`` with the module setting ``rows.<knob>`` set to ``value`` (same codes either way):
    ``FAST_DIV`` False divides by ``div.rn.f32`` per element, ``FWHT_TWO_PASS`` True splits the FWHT,
    ``FEW_ROWS`` 0 routes a few rows like many."""
    found = getattr(row_kernels, knob)
    setattr(row_kernels, knob, value)
    try:
        return ops.quantize_rows(x, 4, 0.9, None, blocks)
    finally:
        setattr(row_kernels, knob, found)


def variants_quantize(device: torch.device, m: int, sizes: list[tuple[int, int | None]],
                      budget: _Budget, only: tuple[str, ...] | None = None) -> list[dict]:
    """The ``VARIANT_QUANT`` variants (``only``: these names) of ``m`` rows of each (n, Hadamard blocks)."""
    rows = []
    for n, blocks in sizes:
        x = torch.randn(m, n, dtype=torch.float16, device=device)
        y = torch.empty_like(x)
        row: dict = {"M": m, "n": n, "hadamard_blocks": blocks, "variants": []}
        if budget.over():
            row["skipped"] = True
            rows.append(row)
            continue
        row["copy_ms"] = _timed(partial(y.copy_, x), device)
        moved = x.numel() * 2 + x.numel() // 2 + m * 5
        ref = ops.quantize_rows(x, 4, 0.9, None, blocks)
        tile = ops.row_tile(n, blocks or 1, blocks is not None)
        for name, warps, chunk, planes, stages in VARIANT_QUANT:
            if only is not None and name not in only:
                continue
            if budget.over() or (chunk is not None and blocks is not None and (tile.k > 1 or chunk % tile.p)):
                continue  # the chunked kernel rotates power-of-two blocks no larger than its chunk
            fn = partial(ops.quantize_rows_variant, x, 4, 0.9, None, blocks, num_warps=warps, chunk=chunk,
                         planes=planes, stages=stages)
            if name == "default":
                fn = partial(ops.quantize_rows, x, 4, 0.9, None, blocks)
            if name == "default_div_rn":
                fn = partial(_quantize_with, x, blocks, "FAST_DIV", False)
            if name == "few_rows_off":
                if m >= row_kernels.FEW_ROWS:
                    continue  # the same kernels as the default
                fn = partial(_quantize_with, x, blocks, "FEW_ROWS", 0)
            if name == "gluon":
                if blocks != 1 or n not in (1024, 2048, 4096, 8192) or device.type != "cuda":
                    continue  # the Gluon kernel: one power-of-two block over the row, compiled code only
                fn = partial(ops.quantize_rows_variant, x, 4, 0.9, None, blocks, gluon=True)
            if name == "fwht_two_pass":
                if blocks != 1 or tile.k > 1 or tile.p < 64:
                    continue  # the same kernel as the default: the split applies to one power-of-two block
                fn = partial(_quantize_with, x, blocks, "FWHT_TWO_PASS", True)
            v: dict = {"name": name, "num_warps": warps, "chunk": chunk, "planes": planes, "stages": stages}
            _try(v, "ms", lambda fn=fn: _timed(fn, device))
            if "ms" in v:
                out = fn()
                codes = out.codes
                if planes:  # back to the packed layout to compare
                    lo, hi = codes[:, : n // 2].to(torch.uint8), codes[:, n // 2:].to(torch.uint8)
                    codes = lo | (hi << 4)
                v["same_bits"] = bool(torch.equal(codes, ref.codes) and torch.equal(out.scale, ref.scale)
                                      and torch.equal(out.zero, ref.zero))
                v["fraction_of_copy"] = (moved / v["ms"]) / (2 * x.numel() * 2 / row["copy_ms"])
            row["variants"].append(v)
        ok = [v for v in row["variants"] if "ms" in v and v["same_bits"] and not v["planes"]]
        if ok:
            best = min(ok, key=lambda v: v["ms"])
            row["best"] = {"name": best["name"], "fraction_of_copy": best["fraction_of_copy"]}
        rows.append(row)
    return rows


K_STEP_VARIANT_TILES = [(64, 16, 64, 4), (64, 16, 32, 4), (64, 16, 128, 8), (32, 16, 128, 4)]
K_STEP_DECODE_TILES = [(16, 16, 64, 2), (16, 16, 32, 1), (32, 16, 64, 2)]  # also timed at 1 and 16 rows


K_STEP_SHAPES = [(172, 64), (344, 32)]  # 11008: the Williamson block (the default) and the Paley block before it


def variants_k_step(device: torch.device, m: int, budget: _Budget, k: int, p: int,
                    tiles: list[tuple[int, int, int, int]] = K_STEP_VARIANT_TILES) -> dict:
    """The float64 H_K^T step of a K x p Hadamard on float32 rows [m, k * p]: the K-step kernel's tiles against
    the torch float64 matmul it replaced (the widening, the matmul and the rounding, as before)."""
    from infoquant_export.transforms.hadamard import hadamard_block

    y = torch.randn(m, k * p, device=device)
    out = torch.empty_like(y)
    ht = torch.tensor(hadamard_block(k), dtype=torch.float64, device=device).T.contiguous()

    def torch_k_step() -> torch.Tensor:
        return torch.matmul(ht, y.view(m, k, p).double()).float()

    row: dict = {"M": m, "K": k, "p": p, "variants": []}
    if budget.over():
        return {**row, "skipped": True}
    ref = torch_k_step().reshape(m, k * p)
    row["torch_float64_ms"] = _timed(torch_k_step, device)
    flops = 2 * k * k * p * m
    for tile in tiles:
        if budget.over():
            break
        v: dict = {"tile": tile}
        fn = partial(ops.k_step, y, out, k, p, tiles=tile)
        _try(v, "ms", lambda fn=fn: _timed(fn, device))
        if "ms" in v:
            fn()
            v["same_bits"] = bool(torch.equal(out, ref))
            v["speedup_vs_torch"] = row["torch_float64_ms"] / v["ms"]
            v["fp64_TFLOPS"] = flops / v["ms"] / 1e9
        row["variants"].append(v)
    return row


def variants_attention(device: torch.device, cases: list[tuple[int, int]], heads: int, head_dim: int,
                       budget: _Budget) -> list[dict]:
    rows = []
    for batch, ctx in cases:
        row: dict = {"batch": batch, "context": ctx, "variants": []}
        if budget.over():
            row["skipped"] = True
            rows.append(row)
            continue
        k16 = torch.randn(batch, heads, ctx, head_dim, dtype=torch.float16, device=device)
        v16 = torch.randn_like(k16)
        q = torch.randn(batch, heads, head_dim, dtype=torch.float16, device=device)
        row["sdpa_fp16_ms"] = _timed(partial(F.scaled_dot_product_attention, q[:, :, None], k16, v16), device)
        del k16, v16
        k4 = ops.KVCache4(torch.randint(0, 256, (batch, heads, ctx, head_dim // 2), dtype=torch.uint8, device=device),
                          torch.rand(batch, heads, ctx, device=device) * 0.1,
                          torch.randint(0, 16, (batch, heads, ctx), dtype=torch.uint8, device=device))
        v4 = ops.KVCache4(k4.codes.clone(), k4.scale.clone(), k4.zero.clone())
        lengths = torch.full((batch,), ctx, dtype=torch.int32, device=device)
        ref = ops.kv4_decode_attention(q, k4, v4, lengths, ctx, kernel="tc").float()
        default_bt = ops.decode_tile(1)[1]
        configs = [("default", None, None, 4, 3, "tc")]
        configs += [(f"mma_bt{block_t}_w{warps}_s{stages}", None, block_t, warps, stages, "mma")
                    for block_t, warps, stages in VARIANT_ATTN_MMA]
        for kernel, block_t, warps, stages, mult in VARIANT_ATTN_CC:  # first: the budget may stop the list
            splits = ops.decode_splits(batch * heads, ctx, block_t, mult * 4 * _sms(device))
            configs.append((f"{kernel}_bt{block_t}_w{warps}_s{stages}_x{mult}", splits, block_t, warps, stages,
                            kernel))
        for block_t, warps, stages, mult in VARIANT_ATTN:
            splits = ops.decode_splits(batch * heads, ctx, block_t, mult * 4 * _sms(device))
            configs.append((f"bt{block_t}_w{warps}_s{stages}_x{mult}", splits, block_t, warps, stages, "tc"))
        for name, splits, block_t, warps, stages, kernel in configs:
            if budget.over():
                break
            fn = partial(ops.kv4_decode_attention, q, k4, v4, lengths, ctx, splits, block_t, warps, stages,
                         kernel=kernel)
            v: dict = {"name": name, "splits": splits, "block_t": block_t or default_bt, "num_warps": warps,
                       "num_stages": stages, "kernel": kernel}
            _try(v, "ms", lambda fn=fn: _timed(fn, device))
            if "ms" in v:
                out = fn().float()
                v["same_bits"] = bool(torch.equal(out, ref))
                v["max_rel_diff"] = float((out - ref).abs().max() / ref.abs().max())
                v["speedup"] = row["sdpa_fp16_ms"] / v["ms"]
                v["kv4_GBps"] = 2 * batch * heads * ctx * (head_dim // 2 + 5) / v["ms"] / 1e6
            row["variants"].append(v)
        ok = [v for v in row["variants"] if "ms" in v]
        if ok:
            best = min(ok, key=lambda v: v["ms"])
            row["best"] = {"name": best["name"], "speedup": best["speedup"]}
        rows.append(row)
        del k4, v4
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


VARIANT_KINDS = ("gemm", "quantize", "k_step", "attention")


def variants_section(device: torch.device, smoke: bool, budget_s: float,
                     kinds: tuple[str, ...] = VARIANT_KINDS,
                     progress: Callable[[dict], None] | None = None) -> dict:
    """Every variant next to the default and the FP16 / copy baselines; ``same_bits`` compares its output with
    the default's on the GPU (GEMM, quantize: must be true). ``kinds``: which variants, in that order (the budget
    may stop the later ones). Stops starting measurements after ``budget_s``. ``progress`` gets the result so far
    after each kind (``main`` saves it, so that a time limit keeps the kinds already measured)."""
    budget = _Budget(budget_s)
    out: dict = {}
    for kind in kinds:
        if out and progress is not None:
            progress(out)
        if kind == "gemm":
            shapes = [(128, 256)] if smoke else GEMM_SHAPES
            out["gemm"] = variants_gemm(device, shapes, [1, 32] if smoke else [1, 16, 256, 2048], budget)
        elif kind == "quantize":
            sizes = [(256, None), (256, 1)] if smoke else [(4096, None), (4096, 1), (11008, None), (11008, 43)]
            out["quantize"] = variants_quantize(device, 4 if smoke else 4096, sizes, budget)
            # a decode step's rows: the few-rows routes (rows.FEW_ROWS) against the many-rows kernels
            for m in (1,) if smoke else (1, 16):
                out["quantize"] += variants_quantize(device, m, [(11008, None)] if smoke else
                                                     [(11008, None), (11008, 1)], budget, DECODE_QUANT_VARIANTS)
        elif kind == "k_step":
            out["k_step"] = [variants_k_step(device, 4 if smoke else 4096, budget, k, p) for k, p in K_STEP_SHAPES]
            # decode sizes: does the kernel or torch's float64 matmul do the default K step faster for 1 / 16 rows?
            decode_tiles = K_STEP_VARIANT_TILES[:1] + K_STEP_DECODE_TILES[:1 if smoke else None]
            out["k_step"] += [variants_k_step(device, m, budget, *K_STEP_SHAPES[0], tiles=decode_tiles)
                              for m in ((2,) if smoke else (1, 16))]
        else:
            # the largest case first: it decides the 2x target, and the budget may stop the later ones
            cases = [(1, 256)] if smoke else [(16, 32768), (1, 4096), (16, 4096), (1, 32768)]
            out["attention"] = variants_attention(device, cases, 4 if smoke else 32, 64 if smoke else 128, budget)
    return out


class FP16Decoder:
    """The same decoder in plain float16 PyTorch (cuBLAS GEMMs, SDPA, fp16 KV cache): the baseline."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.cfg = model, model.cfg
        self.layers = []
        for layer in model.layers:
            qkv = torch.cat([layer.q.weight, layer.k.weight, layer.v.weight]).half()
            gate_up = torch.cat([layer.gate.weight, layer.up.weight]).half()
            self.layers.append((qkv, layer.o.weight.half(), gate_up, layer.down.weight.half(),
                                layer.input_norm.half(), layer.post_norm.half()))
        self.embed, self.head = model.embed.weight.half(), model.lm_head.weight.half()

    def new_cache(self, batch: int, capacity: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        c = self.cfg
        shape = (batch, c.num_kv_heads, capacity, c.head_dim)
        dev = self.embed.device
        return [(torch.empty(shape, dtype=torch.float16, device=dev), torch.empty(shape, dtype=torch.float16,
                                                                                   device=dev)) for _ in self.layers]

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, cache: list, start: int) -> torch.Tensor:
        c = self.cfg
        b, s = ids.shape
        x = F.embedding(ids, self.embed)
        cos, sin = self.model.rope(torch.arange(start, start + s, device=ids.device), torch.float16)
        cos, sin = cos[None, None], sin[None, None]
        hq, hkv, d = c.num_heads, c.num_kv_heads, c.head_dim
        for (qkv, o, gate_up, down, n1, n2), (kc, vc) in zip(self.layers, cache, strict=True):
            h = F.rms_norm(x, (x.shape[-1],), n1, c.rms_norm_eps)
            q, k, v = F.linear(h, qkv).split((hq * d, hkv * d, hkv * d), dim=-1)
            q = q.view(b, s, hq, d).transpose(1, 2)
            k = k.view(b, s, hkv, d).transpose(1, 2)
            half = d // 2
            q = q * cos + torch.cat((-q[..., half:], q[..., :half]), -1) * sin
            k = k * cos + torch.cat((-k[..., half:], k[..., :half]), -1) * sin
            kc[:, :, start:start + s] = k
            vc[:, :, start:start + s] = v.view(b, s, hkv, d).transpose(1, 2)
            attn = F.scaled_dot_product_attention(q, kc[:, :, :start + s], vc[:, :, :start + s],
                                                  is_causal=s > 1, enable_gqa=hq != hkv)
            x = x + F.linear(attn.transpose(1, 2).reshape(b, s, hq * d), o)
            h = F.rms_norm(x, (x.shape[-1],), n2, c.rms_norm_eps)
            g, u = F.linear(h, gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(g) * u, down)
        return F.linear(F.rms_norm(x, (x.shape[-1],), None, c.rms_norm_eps), self.head)


def _decode_step(fast: Callable, step: torch.Tensor, cache: object, ctx: int) -> None:
    cache.length = ctx  # every timed step writes position ctx again
    fast(step, cache)


def gpu_ops(fn: Callable[[], object]) -> int:
    """GPU operations (kernels, copies, memsets) one call of ``fn`` issues, counted by the PyTorch profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def _decode_state(base: FP16Decoder, fast: Callable, vocab: int, batch: int, ctx: int,
                  device: torch.device) -> tuple:
    """Both decoders' caches filled with ``ctx`` random tokens, and one new token per row: (cache16, cache4, step)."""
    ids = torch.randint(0, vocab, (batch, ctx), device=device)
    cache16 = base.new_cache(batch, ctx + 1)
    base.forward(ids, cache16, 0)
    _, cache4 = fast(ids)
    return cache16, cache4, torch.randint(0, vocab, (batch, 1), device=device)


def kernel_profile(fn: Callable[[], object], device: torch.device, top: int = 20) -> dict:
    """Where one call of ``fn`` spends its time, by kernel: GPU time per kernel name (PyTorch profiler, CUDA
    activity) on a GPU; on the CPU (smoke) self CPU time per top-level op. The ``top`` largest, and the total."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    fn()
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    totals: dict[str, list[float]] = {}
    for e in prof.events():
        if cuda and e.device_type == torch.autograd.DeviceType.CUDA:
            us = e.time_range.elapsed_us()
        elif not cuda and e.device_type == torch.autograd.DeviceType.CPU and e.cpu_parent is None:
            us = e.cpu_time_total
        else:
            continue
        entry = totals.setdefault(e.name[:90], [0, 0.0])
        entry[0] += 1
        entry[1] += us
    total_us = sum(us for _, us in totals.values())
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][1])
    return {"total_ms": total_us / 1e3, "kernels": len(totals), "launches": sum(n for n, _ in totals.values()),
            "by_kernel": [{"name": name, "count": n, "ms": us / 1e3, "share": us / total_us if total_us else 0.0}
                          for name, (n, us) in ranked[:top]]}


def profile_section(device: torch.device, shape: str, layers: int, prefill: tuple[int, int],
                    decode: tuple[int, int]) -> dict:
    """One prefill and one eager decode step of the e2e models (W4A4KV4 kernels, FP16), time per kernel."""
    from infoquant_export.kernels.model import KernelCausalLM
    from infoquant_export.kernels.random_model import random_w4a4kv4_model

    model = random_w4a4kv4_model(shape, layers, str(device))
    fast = KernelCausalLM(model, torch.float16, cuda_graphs=False)
    base = FP16Decoder(model)
    vocab = model.cfg.vocab_size
    batch, seq = prefill
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    out: dict = {"shape": shape, "layers": layers,
                 "prefill": {"batch": batch, "seq": seq,
                             "fp16": kernel_profile(partial(base.forward, ids, base.new_cache(batch, seq), 0), device),
                             "w4a4kv4": kernel_profile(partial(fast, ids), device)}}
    batch, ctx = decode
    cache16, cache4, step = _decode_state(base, fast, vocab, batch, ctx, device)
    out["decode"] = {"batch": batch, "context": ctx,
                     "fp16": kernel_profile(partial(base.forward, step, cache16, ctx), device),
                     "w4a4kv4": kernel_profile(partial(_decode_step, fast, step, cache4, ctx), device)}
    return out


def e2e_section(device: torch.device, shape: str, layers: int, prefill: list[tuple[int, int]],
                decode: list[tuple[int, int]]) -> dict:
    from infoquant_export.kernels.model import KernelCausalLM
    from infoquant_export.kernels.random_model import random_w4a4kv4_model

    model = random_w4a4kv4_model(shape, layers, str(device))
    fast = KernelCausalLM(model, torch.float16, cuda_graphs=False)  # eager steps (and captured by `graphed`)
    served = KernelCausalLM(model, torch.float16)  # what generate runs: a decode step replays the cache's graph
    planar = KernelCausalLM(model, torch.float16, cuda_graphs=False, prefill_planes=True)  # opt-in plane prefill
    base = FP16Decoder(model)
    out: dict = {"shape": shape, "layers": layers, "prefill": [], "decode": []}
    vocab = model.cfg.vocab_size
    for batch, seq in prefill:
        ids = torch.randint(0, vocab, (batch, seq), device=device)
        cache16 = base.new_cache(batch, seq)
        t16 = bench(partial(base.forward, ids, cache16, 0), device)
        t4 = bench(partial(fast, ids), device)
        row = {"batch": batch, "seq": seq, "fp16_ms": t16, "w4a4kv4_ms": t4, "speedup": t16 / t4,
               "w4a4kv4_tokens_per_s": batch * seq / t4 * 1e3}
        _try(row, "w4a4kv4_planes_ms", lambda ids=ids: bench(partial(planar, ids), device))
        if "w4a4kv4_planes_ms" in row:
            row["speedup_planes"] = t16 / row["w4a4kv4_planes_ms"]
        if ops.device_cc(device) == 90:  # the plane prefill with the Gluon GEMM among the candidates (bits checked)
            linear.WGMMA_CANDIDATES = True
            try:
                _try(row, "w4a4kv4_planes_wgmma_ms", lambda ids=ids: bench(partial(planar, ids), device))
            finally:
                linear.WGMMA_CANDIDATES = False
            if "w4a4kv4_planes_wgmma_ms" in row:
                row["speedup_planes_wgmma"] = t16 / row["w4a4kv4_planes_wgmma_ms"]
            row["wgmma_won"] = sum(1 for key, cfg in linear._TUNED.items() if key[-1] and cfg.get("WGMMA"))
            row["wgmma_refused"] = sorted({err for (key, _), err in linear.TUNE_ERRORS.items()
                                           if key[-1] and "bits" in err})
        out["prefill"].append(row)
    for batch, ctx in decode:
        cache16, cache4, step = _decode_state(base, fast, vocab, batch, ctx, device)

        t16 = bench(partial(base.forward, step, cache16, ctx), device)
        t4 = bench(partial(_decode_step, fast, step, cache4, ctx), device)
        row = {"batch": batch, "context": ctx, "fp16_ms": t16, "w4a4kv4_ms": t4, "speedup": t16 / t4}
        os.environ["INFOQUANT_DECODE_KERNEL"] = "cc"  # the same step with the CUDA-core decode attention
        try:
            t4cc = bench(partial(_decode_step, fast, step, cache4, ctx), device)
        finally:
            os.environ.pop("INFOQUANT_DECODE_KERNEL")
        row.update({"w4a4kv4_cc_ms": t4cc, "speedup_cc": t16 / t4cc})
        if device.type == "cuda":
            try:  # launches per step (each layer's norms / RoPE / SwiGLU are prologues of the row kernels)
                row.update({"fp16_gpu_ops": gpu_ops(partial(base.forward, step, cache16, ctx)),
                            "w4a4kv4_gpu_ops": gpu_ops(partial(_decode_step, fast, step, cache4, ctx))})
            except Exception as exc:
                row["gpu_ops_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            try:  # both decoders as CUDA graphs: GPU time without Python and launch overhead
                g16 = bench(graphed(partial(base.forward, step, cache16, ctx)), device)
                g4 = bench(graphed(partial(_decode_step, fast, step, cache4, ctx)), device)
                row.update({"graph_fp16_ms": g16, "graph_w4a4kv4_ms": g4, "graph_speedup": g16 / g4})
            except Exception as exc:  # record why capture failed, keep the eager numbers
                row["graph_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            try:  # the step as `generate` runs it: KernelCausalLM.forward replaying the cache's graph
                served_ms = bench(partial(_decode_step, served, step, cache4, ctx), device)
                row.update({"w4a4kv4_served_ms": served_ms, "served_speedup_vs_fp16_eager": t16 / served_ms})
                if "graph_fp16_ms" in row:
                    row["served_speedup_vs_fp16_graph"] = row["graph_fp16_ms"] / served_ms
            except Exception as exc:
                row["served_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            for name, kernel, settings in SERVED_DECODE_VARIANTS:
                found = {key: getattr(*key) for key in settings}
                if kernel is not None:
                    os.environ["INFOQUANT_DECODE_KERNEL"] = kernel
                for (module, attr), value in settings.items():
                    setattr(module, attr, value)
                try:  # a model of its own: the cache's graph is recaptured with these settings
                    served_v = KernelCausalLM(model, torch.float16)
                    row[f"w4a4kv4_served_{name}_ms"] = bench(partial(_decode_step, served_v, step, cache4, ctx),
                                                             device)
                    del served_v
                except Exception as exc:
                    row[f"served_{name}_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                finally:
                    if kernel is not None:
                        os.environ.pop("INFOQUANT_DECODE_KERNEL")
                    for (module, attr), value in found.items():
                        setattr(module, attr, value)
        out["decode"].append(row)
        del cache4, cache16
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", default="gemm,quantize,attention,e2e")
    p.add_argument("--e2e-layers", type=int, default=4)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter (script check only)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--variants-budget-s", type=float, default=170.0,
                   help="--sections variants starts no new measurement after this many seconds")
    p.add_argument("--variant-kinds", default=",".join(VARIANT_KINDS),
                   help="--sections variants: which variants, in this order, from " + ",".join(VARIANT_KINDS))
    args = p.parse_args(argv)
    kinds = tuple(k for k in args.variant_kinds.split(",") if k)
    if not kinds or any(k not in VARIANT_KINDS for k in kinds):
        print(f"error: --variant-kinds {args.variant_kinds!r}: choose from {','.join(VARIANT_KINDS)}", file=sys.stderr)
        return 2
    smoke = args.smoke
    device = torch.device("cpu" if smoke else "cuda")
    if not smoke and not torch.cuda.is_available():
        print("error: no CUDA device; run with --smoke for the CPU interpreter check", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    result: dict = {"device": "cpu-interpreter" if smoke else torch.cuda.get_device_name(0),
                    "torch": torch.__version__, "smoke": smoke}
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        pass
    sections = args.sections.split(",")
    gemm_shapes = [(128, 128)] if smoke else GEMM_SHAPES
    gemm_ms = [1, 32] if smoke else GEMM_MS
    started = time.perf_counter()
    def save() -> str:
        """The result so far as JSON, also written to --out (atomically): a timeout keeps the finished sections."""
        result["seconds"] = round(time.perf_counter() - started, 1)
        result["autotune_errors"] = {str(k): v for k, v in ops.TUNE_ERRORS.items()}  # candidates skipped as failing
        text = json.dumps(result, indent=1, default=lambda o: o if not isinstance(o, float) else round(o, 4))
        if args.out:
            tmp = f"{args.out}.tmp"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, args.out)
        return text

    def run_quantize() -> list:
        sizes = [(256, None), (256, 1)] if smoke else [(4096, None), (4096, 1), (11008, None), (11008, 43),
                                                      (11008, 1)]
        return quantize_section(device, 4 if smoke else 4096, sizes, "sweep" in sections)

    def run_attention() -> list:
        cases = [(1, 64)] if smoke else [(1, 4096), (16, 4096), (1, 32768), (16, 32768)]
        return attention_section(device, cases, 4 if smoke else 32, 64 if smoke else 128, "sweep" in sections)

    runners: dict[str, Callable[[], object]] = {
        "gemm": lambda: gemm_section(device, gemm_shapes, gemm_ms),
        "sweep": lambda: sweep_section(device, gemm_shapes, [1, 16, 256, 2048] if not smoke else [1, 32]),
        "quantize": run_quantize,
        "attention": run_attention,
        "variants": lambda: variants_section(device, smoke, args.variants_budget_s, kinds,
                                             lambda so_far: (result.update(variants=so_far), save())),
        "e2e": lambda: e2e_section(device, "smollm2-135m" if smoke else "llama2-7b", 1 if smoke else args.e2e_layers,
                                   [(1, 16)] if smoke else [(1, 2048), (4, 512)],
                                   [(1, 16)] if smoke else [(1, 2048), (16, 2048)]),
        "profile": lambda: profile_section(device, "smollm2-135m" if smoke else "llama2-7b",
                                           1 if smoke else args.e2e_layers, (1, 16) if smoke else (1, 2048),
                                           (1, 16) if smoke else (16, 2048)),
    }
    unknown = [name for name in sections if name not in runners]
    if unknown:
        print(f"error: unknown section(s) {', '.join(unknown)}; choose from {', '.join(runners)}", file=sys.stderr)
        return 2
    for name in sections:  # in the order given: a time limit keeps the sections already saved
        result[name] = runners[name]()
        save()
    print(save())
    return 0


if __name__ == "__main__":
    sys.exit(main())
