"""The performance variants (issue 6) compiled on the GPU: same bits as the default kernels on LLaMA-2-7B shapes.

GEMM operand layouts (int8 planes, swapped MMA) and the planar / chunked activation quantization change the int32
summation order or the memory layout only, so ``torch.equal`` with the default path (itself checked against the
primitives in test_kernels_gpu.py) is the claim. The decode attention's launch variants (splits, tokens per step)
regroup a float32 online softmax: within a stated tolerance of the default.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from infoquant_export.kernels import linear, ops
from infoquant_export.quant.primitives import integer_activation, integer_linear, quantize_weight, weight_scale

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
LAYOUTS = [(True, False, True), (False, True, False), (True, True, False), (True, False, False),
           (False, False, True)]  # (activation planes, weight planes, swap)


def _unplane(codes: torch.Tensor) -> torch.Tensor:
    half = codes.shape[1] // 2
    return codes[:, :half].to(torch.uint8) | (codes[:, half:].to(torch.uint8) << 4)


def test_autotune_inside_a_capture_times_nothing(monkeypatch):
    """Inside a CUDA-graph capture the GEMM autotuner times nothing (its timer captures graphs of its own): a key
    tuned before keeps its tile, a new key runs the default tile untuned; the replay gives the eager bits."""
    g = torch.Generator(device=CUDA).manual_seed(5)
    w = ops.PackedWeight.from_codes(torch.randint(-8, 8, (512, 1024), device=CUDA, generator=g),
                                    torch.rand(512, device=CUDA, generator=g) * 0.02)
    act1 = ops.quantize_rows(torch.randn(1, 1024, dtype=torch.float16, device=CUDA, generator=g), 4, 0.9)
    act40 = ops.quantize_rows(torch.randn(40, 1024, dtype=torch.float16, device=CUDA, generator=g), 4, 0.9)
    cc = ops.device_cc(CUDA)
    key1, key40 = (linear.tune_key(m, 512, 512, torch.float16, False, False, False, False, cc) for m in (1, 40))
    ref1 = ops.w4a4_linear(act1, w, out_dtype=torch.float16)  # tunes M = 1 (graph-replay timer)
    assert key1 in linear._TUNED
    linear._TUNED.pop(key40, None)
    monkeypatch.setenv("INFOQUANT_GEMM_AUTOTUNE", "0")
    ref40 = ops.w4a4_linear(act40, w, out_dtype=torch.float16)  # compiles the default tile, no tuning
    monkeypatch.setenv("INFOQUANT_GEMM_AUTOTUNE", "1")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y1 = ops.w4a4_linear(act1, w, out_dtype=torch.float16)
        y40 = ops.w4a4_linear(act40, w, out_dtype=torch.float16)
    graph.replay()
    torch.cuda.synchronize()
    assert key40 not in linear._TUNED
    assert torch.equal(y1, ref1) and torch.equal(y40, ref40)


@pytest.mark.parametrize("n,k", [(4096, 4096), (11008, 4096), (4096, 11008)])
def test_gemm_variants_same_bits(n, k):
    g = torch.Generator(device=CUDA).manual_seed(n + k)
    w = ops.PackedWeight.from_codes(torch.randint(-8, 8, (n, k), device=CUDA, generator=g),
                                    torch.rand(n, device=CUDA, generator=g) * 0.02).with_planes()
    packed = ops.PackedWeight(w.codes, w.scale, w.rowsum)
    for m in (256, 300, 2048):
        x = torch.randn(m, k, dtype=torch.float16, device=CUDA, generator=g)
        act, act_p = ops.quantize_rows(x, 4, 0.9), ops.quantize_rows_variant(x, 4, 0.9, planes=True)
        ref = ops.w4a4_linear(act, packed, out_dtype=torch.float16)
        tiles = ops.gemm_candidates(m, k // 2, ops.GEMM_PLANE_TILES)
        for (a_planes, w_planes, swap), tile in itertools.product(LAYOUTS, tiles if m != 300 else tiles[:1]):
            if (a_planes, w_planes, swap) in LAYOUTS[3:] and tile != tiles[0]:
                continue  # the layouts the benchmark does not sweep: default tile only
            cfg = {**tile, "W_PLANES": int(w_planes), "SWAP": int(swap)}
            got = ops.w4a4_linear(act_p if a_planes else act, w, out_dtype=torch.float16, config=cfg)
            assert torch.equal(got, ref), (m, cfg, a_planes)
        if m == 300:
            continue  # below: M divisible by 16 only (one compile per tile and layout)
        cc = ops.device_cc(x.device)  # every tile the runtime may pick on this GPU (tensor-descriptor kernel: sm_90)
        packed_tiles, plane_tiles = ops.gemm_tables(cc)
        configs = [{**t, "W_PLANES": 0} for t in ops.gemm_candidates(m, k // 2, packed_tiles)]
        configs += [{**t, "W_PLANES": 1} for t in ops.gemm_candidates(m, k // 2, plane_tiles)]
        if cc == 90:
            configs += [{**t, "W_PLANES": wp, "SWAP": 0, "TMA": 1}
                        for t in ops.gemm_candidates(m, k // 2, ops.GEMM_TMA_TILES) for wp in (0, 1)]
            keys = ("BM", "BN", "BK2", "GROUP_M", "num_warps", "num_stages")  # the persistent variants of the bench
            configs += [{**dict(zip(keys, t, strict=True)), "W_PLANES": wp, "SWAP": 0, "TMA": 1, "PERSISTENT": 1}
                        for t, wp in (((128, 256, 64, 8, 8, 2), 1), ((128, 128, 64, 8, 8, 4), 1),
                                      ((128, 256, 64, 8, 8, 3), 0), ((128, 128, 128, 8, 8, 3), 0))
                        if (k // 2) % t[2] == 0]
        for cfg, a in itertools.product(configs, (act, act_p)):
            got = ops.w4a4_linear(a, w, out_dtype=torch.float16, config=cfg)
            assert torch.equal(got, ref), (m, cfg, a.planes)
        cfg = {**ops.GEMM_INT_MM_EPILOGUE, "INT_MM": 1}  # cuBLASLt's int8 GEMM on the planes + the epilogue kernel
        assert torch.equal(ops.w4a4_linear(act_p, w, out_dtype=torch.float16, config=cfg), ref), (m, cfg)


@pytest.mark.parametrize("n,k", [(4096, 4096), (11008, 4096), (4096, 11008)])
def test_wgmma_gemm_same_bits(n, k):
    """The Gluon sm_90 GEMM (int8 MMAs kept in flight, hand-written TMA ring and barriers) gives the default
    kernel's bits on the LLaMA-2-7B shapes, ragged M = 300 included; its own test so that a GPU call can run it
    first (``TESTS="tests/gpu/test_variants_gpu.py -k wgmma"``)."""
    if ops.device_cc(torch.device(CUDA)) != 90:
        pytest.skip("the Gluon GEMM is sm_90 only (wgmma, TMA)")
    g = torch.Generator(device=CUDA).manual_seed(n + 3 * k)
    w = ops.PackedWeight.from_codes(torch.randint(-8, 8, (n, k), device=CUDA, generator=g),
                                    torch.rand(n, device=CUDA, generator=g) * 0.02).with_planes()
    packed = ops.PackedWeight(w.codes, w.scale, w.rowsum)
    keys = ("BM", "BN", "BK2", "GROUP_M", "num_warps", "num_stages")
    for m in (256, 300, 2048):
        x = torch.randn(m, k, dtype=torch.float16, device=CUDA, generator=g)
        res = torch.randn(m, n, dtype=torch.float16, device=CUDA, generator=g)
        ref = ops.w4a4_linear(ops.quantize_rows(x, 4, 0.9), packed, res, out_dtype=torch.float16)
        act_p = ops.quantize_rows_variant(x, 4, 0.9, planes=True)
        configs = [{**dict(zip(keys, t, strict=True)), "WGMMA": 1} for t in ops.GEMM_WGMMA_TILES]
        configs += [{**dict(zip(keys, t, strict=True)), "WGMMA": 1, "PERSISTENT": 1}
                    for t in ops.GEMM_WGMMA_PERSISTENT_TILES]  # 1-6 tiles per program of 132
        for cfg in configs:
            cfg = {**cfg, "W_PLANES": 1, "SWAP": 0}
            assert torch.equal(ops.w4a4_linear(act_p, w, res, out_dtype=torch.float16, config=cfg), ref), (m, cfg)
        linear.WGMMA_CANDIDATES = True  # the opt-in autotuning: every Gluon candidate passes its bit check
        try:
            assert torch.equal(ops.w4a4_linear(act_p, w, res, out_dtype=torch.float16), ref), m
        finally:
            linear.WGMMA_CANDIDATES = False
        assert not [e for (key, _), e in linear.TUNE_ERRORS.items() if key[-1] and "bits" in e], m


@pytest.mark.parametrize("n,k", [(4096, 4096), (11008, 4096), (4096, 11008)])
def test_gemm_decode_candidates_same_bits(n, k):
    """M = 1 and 16: every autotune candidate of ``linear_candidates`` on this GPU (the tile table, TMA on sm_90,
    split-K 2 / 4 / 8) gives the default's bits, with a residual."""
    g = torch.Generator(device=CUDA).manual_seed(n + 2 * k)
    w = ops.PackedWeight.from_codes(torch.randint(-8, 8, (n, k), device=CUDA, generator=g),
                                    torch.rand(n, device=CUDA, generator=g) * 0.02)
    cc = ops.device_cc(torch.device(CUDA))
    for m in (1, 16):
        x = torch.randn(m, k, dtype=torch.float16, device=CUDA, generator=g)
        res = torch.randn(m, n, dtype=torch.float16, device=CUDA, generator=g)
        act = ops.quantize_rows(x, 4, 0.9)
        ref = ops.w4a4_linear(act, w, res, out_dtype=torch.float16, config=ops.gemm_config(m, k // 2, cc))
        y = torch.empty(m, n, dtype=torch.float16, device=CUDA)
        configs = ops.linear_candidates(m, k // 2, False, cc, ops.tma_eligible(act, w, y, res))
        assert any("SPLITS" in c for c in configs)
        for cfg in configs:
            assert torch.equal(ops.w4a4_linear(act, w, res, out_dtype=torch.float16, config=cfg), ref), (m, cfg)


def test_gemm_variants_bias_residual_against_primitives():
    m, n, k = 300, 1024, 4096
    x, wf = torch.randn(m, k), torch.randn(n, k)
    ws = weight_scale(wf, 4)
    wc = quantize_weight(wf, ws, 4)
    bias, resid = torch.randn(n), torch.randn(m, n)
    a_int, a_s = integer_activation(x, 4, 0.9)
    ref = resid + integer_linear(a_int, a_s, wc.float(), ws.reshape(-1), bias)
    weight = ops.PackedWeight.from_codes(wc, ws, bias).to(CUDA).with_planes()
    act_p = ops.quantize_rows_variant(x.to(CUDA), 4, 0.9, planes=True)
    act = ops.quantize_rows_variant(x.to(CUDA), 4, 0.9, chunk=1024)
    configs = [None, {**ops.gemm_config(m, k // 2), "W_PLANES": 0}]
    if ops.device_cc(torch.device(CUDA)) == 90:
        configs.append({**ops.gemm_candidates(m, k // 2, ops.GEMM_TMA_TILES)[0], "SWAP": 0, "TMA": 1})
        configs.append({**ops.gemm_candidates(m, k // 2, ops.GEMM_TMA_TILES)[0], "SWAP": 0, "TMA": 1,
                        "PERSISTENT": 1})  # bias and residual through the persistent loop
        keys = ("BM", "BN", "BK2", "GROUP_M", "num_warps", "num_stages")  # the Gluon kernel: bias, residual, M = 300
        configs += [{**dict(zip(keys, t, strict=True)), "W_PLANES": 1, "SWAP": 0, "WGMMA": 1}
                    for t in ops.GEMM_WGMMA_TILES]
        configs += [{**dict(zip(keys, t, strict=True)), "W_PLANES": 1, "SWAP": 0, "WGMMA": 1, "PERSISTENT": 1}
                    for t in ops.GEMM_WGMMA_PERSISTENT_TILES]
    for a, cfg in [(act_p, c) for c in configs] + [(act, None)]:
        assert torch.equal(ops.w4a4_linear(a, weight, resid.to(CUDA), config=cfg).cpu(), ref)


@pytest.mark.parametrize("n", [1024, 2048, 4096, 8192])
def test_gluon_quantize_same_bits(n):
    """The Gluon Hadamard + quantize kernel (the FWHT's stages laid out by hand) gives the row kernel's codes, scales
    and zero points: float16, bfloat16 and float32 rows, outliers and an all-zero row included."""
    g = torch.Generator(device=CUDA).manual_seed(n)
    x = torch.randn(777, n, device=CUDA, generator=g) * 2
    x[:3] *= 40
    x[5] = 0
    for xx in (x.half(), x.bfloat16(), x):
        ref = ops.quantize_rows(xx, 4, 0.9, None, 1)
        got = ops.quantize_rows_variant(xx, 4, 0.9, None, 1, gluon=True)
        assert torch.equal(got.codes, ref.codes) and torch.equal(got.scale, ref.scale), (n, xx.dtype)
        assert torch.equal(got.zero, ref.zero), (n, xx.dtype)


@pytest.mark.parametrize("hq,hkv,d", [(32, 32, 128), (9, 3, 64), (32, 8, 128), (16, 2, 256)])
def test_decode_attention_mma_close_to_float64(hq, hkv, d):
    """kernel='mma' (the Gluon kernel: the cache dequantized into mma.sync operand registers by inline PTX, the head
    dimension in permuted MMA orders, a softmax per warp) against float64 attention over the dequantized caches, at
    every tile / warp / split choice: a context that leaves a partial last step, a row of one token, GQA groups of
    1, 3, 4 and 8, head_dim 64 / 128 / 256. Tolerance as the tensor-core kernel's for a float16 q (5e-3; q and
    p * s_v rounded to float16: 2^-11 each)."""
    b, ctx = 3, 1000
    g = torch.Generator(device=CUDA).manual_seed(hq + d)
    k4, v4 = ops.KVCache4.empty(b, hkv, ctx, d, CUDA), ops.KVCache4.empty(b, hkv, ctx, d, CUDA)
    ops.quantize_kv(torch.randn(b, ctx, hkv, d, device=CUDA, generator=g) * 2, k4, 0, 0.95, False)
    ops.quantize_kv(torch.randn(b, ctx, hkv, d, device=CUDA, generator=g), v4, 0, 0.95, False)
    q = torch.randn(b, hq, d, device=CUDA, generator=g).half()
    lengths = torch.tensor([ctx, 333, 1], dtype=torch.int32, device=CUDA)
    kd, vd = ops.dequantize_kv(k4, ctx).double(), ops.dequantize_kv(v4, ctx).double()
    ref = torch.empty(b, hq, d, dtype=torch.float64, device=CUDA)
    for i, n in enumerate(lengths.tolist()):
        kk = kd[i, :, :n].repeat_interleave(hq // hkv, 0)
        vv = vd[i, :, :n].repeat_interleave(hq // hkv, 0)
        p = torch.softmax((q[i].double()[:, None, :] @ kk.transpose(-1, -2)).squeeze(1) * d ** -0.5, -1)
        ref[i] = (p[:, None, :] @ vv).squeeze(1)
    tc = ops.kv4_decode_attention(q, k4, v4, lengths, ctx, kernel="tc").double()
    tc_rel = float((tc - ref).abs().max() / ref.abs().max())
    for block_t, warps, splits, stages in ((32, 4, None, 1), (16, 4, None, 1), (64, 4, None, 1), (32, 8, None, 1),
                                           (32, 2, 1, 1), (32, 1, 3, 1), (16, 4, 16, 1), (16, 4, None, 2),
                                           (32, 4, 5, 2), (32, 1, 3, 2)):
        out = ops.kv4_decode_attention(q, k4, v4, lengths, ctx, splits, block_t, warps, stages, kernel="mma")
        assert out.dtype == torch.float16 and out.shape == q.shape
        rel = float((out.double() - ref).abs().max() / ref.abs().max())
        assert rel < 5e-3, (block_t, warps, splits, stages, rel, tc_rel)
        # the one-token row is that token's V row (p = 1), up to the float16 roundings of s_v and the output
        one = vd[2, :, 0].repeat_interleave(hq // hkv, 0)
        assert float((out[2].double() - one).abs().max() / one.abs().max()) < 2e-3, (block_t, warps, splits, stages)
        if stages == 2:  # loading a step ahead changes no arithmetic
            same = ops.kv4_decode_attention(q, k4, v4, lengths, ctx, splits, block_t, warps, 1, kernel="mma")
            assert torch.equal(out, same), (block_t, warps, splits)


@pytest.mark.parametrize("n,blocks", [(4096, None), (4096, 1), (11008, None), (11008, 43), (576, None)])
def test_quantize_variants_same_bits(n, blocks):
    x = torch.randn(1024, n, device=CUDA) * 2
    x[:3] *= 40
    for xx in (x.half(), x) if n == 4096 and blocks is None else (x.half(),):
        ref = ops.quantize_rows(xx, 4, 0.9, None, blocks)
        for warps, chunk, planes in itertools.product((None, 4), (None, 1024, 2048), (False, True)):
            if chunk is not None and blocks is not None:
                continue
            got = ops.quantize_rows_variant(xx, 4, 0.9, None, blocks, num_warps=warps, chunk=chunk, planes=planes)
            codes = _unplane(got.codes) if planes else got.codes
            assert torch.equal(codes, ref.codes) and torch.equal(got.scale, ref.scale), (warps, chunk, planes)
            assert torch.equal(got.zero, ref.zero)
        if blocks is None or blocks > 1:  # the chunked kernel with its chunk loops pipelined (cp.async)
            for stages in (2, 3):
                got = ops.quantize_rows_variant(xx, 4, 0.9, None, blocks, num_warps=4, chunk=1024, stages=stages)
                assert torch.equal(got.codes, ref.codes) and torch.equal(got.scale, ref.scale), stages
                assert torch.equal(got.zero, ref.zero)


@pytest.mark.parametrize("batch,ctx", [(1, 4096), (16, 4096), (2, 32768)])
def test_decode_attention_variants_close_to_default(batch, ctx):
    heads, d = 32, 128
    k4, v4 = ops.KVCache4.empty(batch, heads, ctx, d, CUDA), ops.KVCache4.empty(batch, heads, ctx, d, CUDA)
    ops.quantize_kv(torch.randn(batch, ctx, heads, d, device=CUDA), k4, 0, 0.95, False)
    ops.quantize_kv(torch.randn(batch, ctx, heads, d, device=CUDA), v4, 0, 0.95, False)
    q = torch.randn(batch, heads, d, device=CUDA)
    lengths = torch.full((batch,), ctx, dtype=torch.int32, device=CUDA)
    lengths[-1] = ctx // 3
    ref = ops.kv4_decode_attention(q, k4, v4, lengths, ctx)
    sms = torch.cuda.get_device_properties(CUDA).multi_processor_count
    for block_t, warps, stages, mult in ((128, 4, 2, 1), (128, 4, 4, 1), (128, 4, 3, 4), (256, 4, 3, 1),
                                         (256, 8, 3, 2), (64, 4, 3, 4)):
        splits = ops.decode_splits(batch * heads, ctx, block_t, mult * 4 * sms)
        for qq, tol in ((q, 1e-5), (q.half(), 5e-3)):
            got = ops.kv4_decode_attention(qq, k4, v4, lengths, ctx, splits, block_t, warps, stages).float()
            base = ref if qq.dtype == torch.float32 else ops.kv4_decode_attention(qq, k4, v4, lengths, ctx).float()
            assert float((got - base).abs().max() / base.abs().max()) < tol, (block_t, warps, stages, mult)
    for block_t, warps in ((32, 8), (32, 4), (64, 8), (64, 4), (128, 8)):  # the CUDA-core kernel (float32)
        for qq, tol in ((q, 1e-5), (q.half(), 5e-3)):
            got = ops.kv4_decode_attention(qq, k4, v4, lengths, ctx, None, block_t, warps, 1, kernel="cc").float()
            base = ref if qq.dtype == torch.float32 else ops.kv4_decode_attention(qq, k4, v4, lengths, ctx).float()
            assert float((got - base).abs().max() / base.abs().max()) < tol, ("cc", block_t, warps)
            for stages in (2, 3):  # a pipelined token loop computes the same values
                piped = ops.kv4_decode_attention(qq, k4, v4, lengths, ctx, None, block_t, warps, stages, kernel="cc")
                assert torch.equal(piped.float(), got), ("cc", block_t, warps, stages)
            for stages in (1, 3):  # a running max per token slot: the same up to float32 rounding
                slot = ops.kv4_decode_attention(qq, k4, v4, lengths, ctx, None, block_t, warps, stages, kernel="ccs")
                assert float((slot.float() - base).abs().max() / base.abs().max()) < tol, ("ccs", block_t, stages)
