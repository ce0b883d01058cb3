"""Benchmark the W4A4KV4 kernels against torch FP16 (cuBLAS / SDPA) and a device-to-device copy; prints JSON.

    python tools/bench_kernels.py [--sections gemm,quantize,attention,e2e,sweep] [--e2e-layers 4] [--out r.json]
    python tools/bench_kernels.py --smoke      # tiny shapes in Triton's interpreter on the CPU (checks the script)

Times are medians of ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs) in milliseconds, kernels and
baselines measured side by side in one process on one GPU. Shapes: LLaMA-2-7B (hidden 4096, intermediate 11008,
32 heads of 128).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from infoquant_export.kernels import ops

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
                         "config": ops._TUNED.get((ops._bucket(m), n, k // 2, torch.float16, False, False, False, False))})
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


def graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` captured in a CUDA graph after two warm-up calls (removes Python / launch overhead): replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _decode_step(fast: Callable, step: torch.Tensor, cache: object, ctx: int) -> None:
    cache.length = ctx  # every timed step writes position ctx again
    fast(step, cache)


def e2e_section(device: torch.device, shape: str, layers: int, prefill: list[tuple[int, int]],
                decode: list[tuple[int, int]]) -> dict:
    from infoquant_export.kernels.model import KernelCausalLM
    from infoquant_export.kernels.random_model import random_w4a4kv4_model

    model = random_w4a4kv4_model(shape, layers, str(device))
    fast = KernelCausalLM(model, torch.float16)
    base = FP16Decoder(model)
    out: dict = {"shape": shape, "layers": layers, "prefill": [], "decode": []}
    vocab = model.cfg.vocab_size
    for batch, seq in prefill:
        ids = torch.randint(0, vocab, (batch, seq), device=device)
        cache16 = base.new_cache(batch, seq)
        t16 = bench(partial(base.forward, ids, cache16, 0), device)
        t4 = bench(partial(fast, ids), device)
        out["prefill"].append({"batch": batch, "seq": seq, "fp16_ms": t16, "w4a4kv4_ms": t4, "speedup": t16 / t4,
                               "w4a4kv4_tokens_per_s": batch * seq / t4 * 1e3})
    for batch, ctx in decode:
        ids = torch.randint(0, vocab, (batch, ctx), device=device)
        cache16 = base.new_cache(batch, ctx + 1)
        base.forward(ids, cache16, 0)
        _, cache4 = fast(ids)
        step = torch.randint(0, vocab, (batch, 1), device=device)

        t16 = bench(partial(base.forward, step, cache16, ctx), device)
        t4 = bench(partial(_decode_step, fast, step, cache4, ctx), device)
        row = {"batch": batch, "context": ctx, "fp16_ms": t16, "w4a4kv4_ms": t4, "speedup": t16 / t4}
        if device.type == "cuda":
            try:  # both decoders as CUDA graphs: GPU time without Python and launch overhead
                g16 = bench(graphed(partial(base.forward, step, cache16, ctx)), device)
                g4 = bench(graphed(partial(_decode_step, fast, step, cache4, ctx)), device)
                row.update({"graph_fp16_ms": g16, "graph_w4a4kv4_ms": g4, "graph_speedup": g16 / g4})
            except Exception as exc:  # record why capture failed, keep the eager numbers
                row["graph_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
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
    args = p.parse_args(argv)
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
    if "gemm" in sections:
        result["gemm"] = gemm_section(device, gemm_shapes, gemm_ms)
    if "sweep" in sections:
        result["sweep"] = sweep_section(device, gemm_shapes, [1, 16, 256, 2048] if not smoke else [1, 32])
    if "quantize" in sections:
        sizes = [(256, None), (256, 1)] if smoke else [(4096, None), (4096, 1), (11008, None), (11008, 43),
                                                      (11008, 1)]
        result["quantize"] = quantize_section(device, 4 if smoke else 4096, sizes, "sweep" in sections)
    if "attention" in sections:
        cases = [(1, 64)] if smoke else [(1, 4096), (16, 4096), (1, 32768), (16, 32768)]
        result["attention"] = attention_section(device, cases, 4 if smoke else 32, 64 if smoke else 128,
                                                "sweep" in sections)
    if "e2e" in sections:
        result["e2e"] = e2e_section(device, "smollm2-135m" if smoke else "llama2-7b", 1 if smoke else args.e2e_layers,
                                    [(1, 16)] if smoke else [(1, 2048), (4, 512)],
                                    [(1, 16)] if smoke else [(1, 2048), (16, 2048)])
    result["seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(result, indent=1, default=lambda o: o if not isinstance(o, float) else round(o, 4))
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
