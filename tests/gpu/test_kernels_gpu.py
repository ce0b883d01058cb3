"""Compiled kernels on the GPU against the numerics primitives (computed on the CPU), and against the interpreter.

Bit-identity of integer codes, scales, zero points, int32 GEMM results and the float32 epilogue is the claim; the
float32 attention and the float16 paths are compared with stated tolerances.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from infoquant_export.kernels import ops, rows
from infoquant_export.quant.primitives import (
    activation_qparams,
    dequantize_activation,
    integer_activation,
    integer_linear,
    pack_uint4,
    quantize_activation,
    quantize_weight,
    softmax64,
    weight_scale,
)
from infoquant_export.transforms.hadamard import apply_hadamard
from tests.helpers import sqnr_db

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
REPO = Path(__file__).resolve().parents[2]


def _ref_rows(x: torch.Tensor, blocks: int | None, clip: float = 0.9, clip_min: float | None = None):
    xr = apply_hadamard(x, blocks) if blocks else x
    s, z = activation_qparams(xr, 4, clip, clip_min)
    return pack_uint4(quantize_activation(xr, s, z, 4)), s.squeeze(-1), z.squeeze(-1).to(torch.uint8)


def _ties(m: int, n: int) -> torch.Tensor:
    """Rows with max 7.5 and min -7.5 (scale exactly 1 at clip 1) holding values at k + 0.5: round-half-even ties."""
    x = torch.randint(-8, 7, (m, n)).float() + 0.5
    x[:, 0], x[:, 1] = 7.5, -7.5
    return x


@pytest.mark.parametrize("n,blocks", [(4096, None), (4096, 1), (1536, 1), (576, None), (11008, 43), (11008, 1),
                                      (2048, 2)])
def test_quantize_rows_bit_identical(n, blocks):
    x = torch.randn(512, n) * 2
    x[:3] *= 40  # outlier tokens
    codes, scale, zero = _ref_rows(x, blocks)
    got = ops.quantize_rows(x.to(CUDA), 4, 0.9, None, blocks)
    assert torch.equal(got.codes.cpu(), codes)
    assert torch.equal(got.scale.cpu(), scale)
    assert torch.equal(got.zero.cpu(), zero)


@pytest.mark.parametrize("k_dot", [True, False])
@pytest.mark.parametrize("n", [1536, 5632, 14336])
def test_fused_k_step_forms_bit_identical(monkeypatch, n, k_dot):
    """The row kernel's fused K step as a float64 tl.dot (DMMA) and as the broadcast-and-sum, compiled: the
    primitives' bits for the demo's 1536 = 12 x 128, TinyLlama's 5632 = 44 x 128, LLaMA-3-8B's 14336 = 28 x 512."""
    monkeypatch.setattr(rows, "k_dot", lambda cc: k_dot)
    x = torch.randn(256, n) * 2
    x[:3] *= 40
    codes, scale, zero = _ref_rows(x, 1)
    got = ops.quantize_rows(x.to(CUDA), 4, 0.9, None, 1)
    assert torch.equal(got.codes.cpu(), codes) and torch.equal(got.scale.cpu(), scale)
    assert torch.equal(got.zero.cpu(), zero)


def test_fused_k_step_sliced_launches(monkeypatch):
    """The K-step scratch bound (``rows.SCRATCH_BYTES``) set to 64 rows: 300 rows of 1536 = 12 x 128 in 5 launches
    (the SLICED kernel), the primitives' bits."""
    monkeypatch.setattr(rows, "SCRATCH_BYTES", 64 * 4 * ops.row_tile(1536, 1, True).elements)
    x = torch.randn(300, 1536) * 2
    codes, scale, zero = _ref_rows(x, 1)
    got = ops.quantize_rows(x.to(CUDA), 4, 0.9, None, 1)
    assert torch.equal(got.codes.cpu(), codes) and torch.equal(got.scale.cpu(), scale)
    assert torch.equal(got.zero.cpu(), zero)


def test_quantize_ties_round_half_even():
    x = _ties(64, 256)
    s, z = activation_qparams(x, 4, 1.0)
    assert torch.all(s == 1.0)  # (7.5 + 7.5) / 15: x / s lands on k + 0.5 for every element
    got = ops.quantize_rows(x.to(CUDA), 4, 1.0)
    assert torch.equal(got.codes.cpu(), pack_uint4(quantize_activation(x, s, z, 4)))


@pytest.mark.parametrize("n,blocks", [(4096, None), (4096, 1), (11008, None), (11008, 43), (2048, 2)])
def test_fast_division_same_codes(monkeypatch, n, blocks):
    """``rows.FAST_DIV`` (x / scale as common.div_by's multiply and two FMAs) against div.rn.f32 per element, both
    compiled: the same codes, scales and zero points, on rows whose quotients sit on and next to half-integers
    (scale exactly 1 with k + 0.5 values, then those values nudged by one float32 ulp) and on wide-range rows."""
    ties = _ties(256, n)
    nudged = torch.nextafter(ties, torch.where(torch.rand_like(ties) < 0.5, -1e9, 1e9))
    wide = torch.randn(256, n) * 10.0 ** torch.randint(-6, 5, (256, 1)).float()
    x = torch.cat([ties, nudged, wide]).to(CUDA)
    monkeypatch.setattr(rows, "FAST_DIV", False)
    ref = ops.quantize_rows(x, 4, 1.0, None, blocks)  # clip 1: the tie rows keep a scale of exactly 1
    monkeypatch.setattr(rows, "FAST_DIV", True)
    got = ops.quantize_rows(x, 4, 1.0, None, blocks)
    assert torch.equal(got.codes, ref.codes) and torch.equal(got.scale, ref.scale)
    assert torch.equal(got.zero, ref.zero)


@pytest.mark.parametrize("two_pass", [False, True])
def test_fwht_passes_bit_identical(monkeypatch, two_pass):
    """The Hadamard(4096) + quantize row kernel with its FWHT in one pass (the default) and in two
    (``rows.FWHT_TWO_PASS``): the primitives' codes, scales and zero points either way, outlier rows included."""
    x = torch.randn(512, 4096)
    x[::7, :64] += 40.0
    monkeypatch.setattr(rows, "FWHT_TWO_PASS", two_pass)
    codes, scale, zero = _ref_rows(x, 1)
    got = ops.quantize_rows(x.to(CUDA), 4, 0.9, None, 1)
    assert torch.equal(got.codes.cpu(), codes) and torch.equal(got.scale.cpu(), scale)
    assert torch.equal(got.zero.cpu(), zero)


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("blocks", [None, 1, 43])
def test_few_rows_routes_bit_identical(monkeypatch, m, blocks):
    """A decode step's rows of 11008 (``rows.FEW_ROWS``: the FWHT pass a program per chunk, the 16-row K-step tile,
    the one-pass row kernel with 16 warps) against the primitives, and with the SwiGLU prologue against the
    prefill routes (``FEW_ROWS`` 0): the same codes, scales and zero points."""
    x = torch.randn(m, 11008) * 2
    x[0, :640] += 30.0
    codes, scale, zero = _ref_rows(x, blocks)
    got = ops.quantize_rows(x.to(CUDA), 4, 0.9, None, blocks)
    assert torch.equal(got.codes.cpu(), codes) and torch.equal(got.scale.cpu(), scale)
    assert torch.equal(got.zero.cpu(), zero)
    gate_up = (torch.randn(m, 2 * 11008) * 2).half().to(CUDA)
    few = ops.quantize_rows(gate_up, 4, 0.9, None, blocks, prologue=ops.SWIGLU)
    monkeypatch.setattr(rows, "FEW_ROWS", 0)
    many = ops.quantize_rows(gate_up, 4, 0.9, None, blocks, prologue=ops.SWIGLU)
    assert torch.equal(few.codes, many.codes) and torch.equal(few.scale, many.scale)
    assert torch.equal(few.zero, many.zero)


def test_hadamard_bit_identical():
    for n, blocks in ((4096, 1), (1536, 1), (11008, 1), (128, 1)):
        x = torch.randn(64, n)
        assert torch.equal(ops.hadamard(x.to(CUDA), blocks).cpu(), apply_hadamard(x, blocks)), n


@pytest.mark.parametrize("tile", [None, (64, 16, 64, 4), (64, 16, 32, 4), (64, 16, 128, 8), (32, 16, 128, 4),
                                  (16, 16, 64, 2)])
@pytest.mark.parametrize("k,p", [(172, 64), (344, 32)])
def test_k_step_float64_gemm_bit_identical(tile, k, p):
    """The float64 H_K^T step (DMMA on sm_80 / sm_90) of 11008 = 172 x 64 (Williamson) and 344 x 32 (Paley) on
    2048 rows (6 outlier rows of 2^12 x the rest): rounded once to float32 like the CPU's float64 matmul."""
    from infoquant_export.transforms.hadamard import hadamard_block

    y = torch.randn(2048, k * p)
    y[:6, ::7] *= 4096.0
    ht = torch.tensor(hadamard_block(k), dtype=torch.float64).T
    want = torch.matmul(ht, y.double().view(-1, k, p)).float().reshape(y.shape)
    out = torch.empty_like(y, device=CUDA)
    ops.k_step(y.to(CUDA), out, k, p, tiles=tile)
    assert torch.equal(out.cpu(), want)


@pytest.mark.parametrize("m", [1, 16, 300, 2048])
def test_w4a4_gemm_bit_identical(m):
    n, k = 1024, 4096
    x, w = torch.randn(m, k), torch.randn(n, k)
    ws = weight_scale(w, 4)
    wc = quantize_weight(w, ws, 4)
    bias, resid = torch.randn(n), torch.randn(m, n)
    a_int, a_s = integer_activation(x, 4, 0.9)
    ref = resid + integer_linear(a_int, a_s, wc.float(), ws.reshape(-1), bias)
    weight = ops.PackedWeight.from_codes(wc, ws, bias).to(CUDA)
    act = ops.quantize_rows(x.to(CUDA), 4, 0.9)
    got = ops.w4a4_linear(act, weight, resid.to(CUDA))
    assert torch.equal(got.cpu(), ref)
    half = ops.w4a4_linear(act, weight, resid.to(CUDA), out_dtype=torch.float16)
    assert torch.equal(half.cpu(), ref.half())  # float16 output = the float32 result rounded once


def test_kv_cache_quantize_dequantize_bit_identical():
    b, s, h, d = 2, 40, 8, 128
    cache = ops.KVCache4.empty(b, h, 256, d, CUDA)
    x = torch.randn(b, s, h, d)
    ops.quantize_kv(x.to(CUDA), cache, 17, 0.95, True)
    xr = apply_hadamard(x.transpose(1, 2).contiguous())
    sc, zp = activation_qparams(xr, 4, 0.95)
    q = quantize_activation(xr, sc, zp, 4)
    assert torch.equal(cache.codes[:, :, 17:57].cpu(), pack_uint4(q))
    assert torch.equal(cache.scale[:, :, 17:57].cpu(), sc.squeeze(-1))
    deq = ops.dequantize_kv(cache, 57)
    assert torch.equal(deq[:, :, 17:57].cpu(), dequantize_activation(q, sc, zp))


@pytest.mark.parametrize("hq,hkv,ctx", [(32, 32, 4096), (9, 3, 1000), (32, 8, 333)])
def test_decode_attention_close_to_float64(hq, hkv, ctx):
    b, d = 3, 128 if hq == 32 else 64
    k4, v4 = ops.KVCache4.empty(b, hkv, ctx, d, CUDA), ops.KVCache4.empty(b, hkv, ctx, d, CUDA)
    ops.quantize_kv(torch.randn(b, ctx, hkv, d, device=CUDA), k4, 0, 0.95, False)
    ops.quantize_kv(torch.randn(b, ctx, hkv, d, device=CUDA), v4, 0, 0.95, False)
    q = torch.randn(b, hq, d, device=CUDA)
    lengths = torch.tensor([ctx, ctx // 2, 1], dtype=torch.int32, device=CUDA)
    out = ops.kv4_decode_attention(q, k4, v4, lengths, ctx)
    kd, vd = ops.dequantize_kv(k4, ctx).double(), ops.dequantize_kv(v4, ctx).double()
    worst = 0.0
    for i, n in enumerate(lengths.tolist()):
        kk = kd[i, :, :n].repeat_interleave(hq // hkv, 0)
        vv = vd[i, :, :n].repeat_interleave(hq // hkv, 0)
        p = softmax64((q[i].double()[:, None, :] @ kk.transpose(-1, -2)).squeeze(1) * d ** -0.5)
        ref = (p[:, None, :] @ vv).squeeze(1)
        worst = max(worst, float((out[i].double() - ref).abs().max() / ref.abs().max()))
    assert worst < 1e-5, worst
    half = ops.kv4_decode_attention(q.half(), k4, v4, lengths, ctx).float()  # float16 tensor-core dots
    assert float((half - out).abs().max() / out.abs().max()) < 5e-3


def test_interpreter_agrees_with_compiled(tmp_path):
    """The same inputs through TRITON_INTERPRET=1 (CPU, a subprocess) and compiled (GPU): identical bits."""
    torch.manual_seed(3)
    x = torch.randn(8, 1536) * 3
    w = torch.randint(-8, 8, (128, 1536), dtype=torch.int8)
    torch.save({"x": x, "w": w}, tmp_path / "in.pt")
    script = (
        "import torch, sys\n"
        "from infoquant_export.kernels import ops\n"
        "d = torch.load(sys.argv[1], weights_only=True)\n"
        "a = ops.quantize_rows(d['x'], 4, 0.9, None, 1)\n"
        "y = ops.w4a4_linear(a, ops.PackedWeight.from_codes(d['w'], torch.full((128,), 0.01)))\n"
        "torch.save({'codes': a.codes, 'scale': a.scale, 'zero': a.zero, 'y': y}, sys.argv[2])\n")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    extra = os.environ.get("INFOQUANT_INTERPRETER_PYTHONPATH")  # numpy < 2.4 for triton 3.6's interpreter
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra, str(REPO), str(REPO / "plugins"),
                                                    env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    interp = torch.load(tmp_path / "out.pt", weights_only=True)
    a = ops.quantize_rows(x.to(CUDA), 4, 0.9, None, 1)
    y = ops.w4a4_linear(a, ops.PackedWeight.from_codes(w, torch.full((128,), 0.01)).to(CUDA))
    for name, got in (("codes", a.codes), ("scale", a.scale), ("zero", a.zero), ("y", y)):
        assert torch.equal(got.cpu(), interp[name]), name


def test_kernel_model_layers_match_fake_quant_layers():
    """Teacher-forced: every decoder layer gets the fake-quant model's input; a W4A4 model is chaotic end to end
    (one flipped code cascades), so per-layer agreement is the meaningful parity measure."""
    from infoquant_export.kernels.model import KernelCausalLM
    from infoquant_export.kernels.random_model import random_w4a4kv4_model

    model = random_w4a4kv4_model("smollm2-135m", 4, "cuda")
    ids = torch.randint(0, model.cfg.vocab_size, (2, 256), device=CUDA)
    report = {}
    for dtype in (torch.float32, torch.float16):
        km = KernelCausalLM(model, dtype)
        x, cos, sin, mask = model.layer_inputs(ids)
        cache, rope = km.new_cache(2, 256), km.rope(0, 256)
        sqnrs = []
        for i, layer in enumerate(model.layers):
            ref, _ = layer(x, cos, sin, mask)
            sqnrs.append(sqnr_db(ref, km.layer_forward(i, x, cache, 0, rope)))
            x = ref
        report[str(dtype)] = sqnrs
    print(json.dumps(report))
    # H100, 2 x 256 tokens, 2026-11-27: float32 40.9 / 41.7 / 44.0 / 60.3 dB (CPU interpreter, 24 tokens: 134-142);
    # float16 activations 9.7 / 13.2 / 17.7 / 22.4 dB: float16 rounding of the residual stream moves 4-bit codes
    assert min(report["torch.float32"]) >= 30, report
    assert min(report["torch.float16"]) >= 8, report


def test_kernel_model_decode_equals_prefill():
    from infoquant_export.kernels.model import KernelCausalLM
    from infoquant_export.kernels.random_model import random_w4a4kv4_model

    km = KernelCausalLM(random_w4a4kv4_model("smollm2-135m", 2, "cuda"), torch.float32)
    ids = torch.randint(0, 1000, (1, 40), device=CUDA)
    full, _ = km(ids)
    logits, cache = km(ids[:, :32])
    steps = [logits]
    for i in range(32, 40):
        logits, cache = km(ids[:, i:i + 1], cache)
        steps.append(logits)
    inc = torch.cat(steps, 1)
    assert float((full.argmax(-1) == inc.argmax(-1)).float().mean()) >= 0.95
    assert sqnr_db(full, inc) >= 30


def test_kernel_model_cuda_graph_decode():
    """Decode steps through ``forward`` replay the cache's CUDA graph: each replay gives the bits of the same step
    run eagerly (``decode_step`` on a copy of the cache at the same position), the graph is captured again when the
    cache grows (capacity 32 -> 64 with block=16), and the logits match one prefill like the eager steps do."""
    from infoquant_export.kernels.model import KernelCache, KernelCausalLM
    from infoquant_export.kernels.random_model import random_w4a4kv4_model

    km = KernelCausalLM(random_w4a4kv4_model("smollm2-135m", 2, "cuda"), torch.float32, block=16)
    assert km.cuda_graphs
    ids = torch.randint(0, 1000, (1, 40), device=CUDA)
    full, _ = km(ids)
    logits, cache = km(ids[:, :28])
    assert cache.capacity == 32
    steps, graphs = [logits], set()
    for i in range(28, 40):
        twin = KernelCache([tuple(ops.KVCache4(c.codes.clone(), c.scale.clone(), c.zero.clone()) for c in pair)
                            for pair in cache.layers], cache.length)
        km._grow(twin, i + 1)
        expected = km.decode_step(ids[:, i:i + 1], torch.tensor([i], dtype=torch.int32, device=CUDA), twin)
        logits, cache = km(ids[:, i:i + 1], cache)
        graphs.add(cache.graph.key)
        assert torch.equal(logits, expected), i
        steps.append(logits)
    assert cache.capacity == 64 and cache.length == 40 and len(graphs) == 2
    inc = torch.cat(steps, 1)
    assert float((full.argmax(-1) == inc.argmax(-1)).float().mean()) >= 0.95
    assert sqnr_db(full, inc) >= 30


def test_kernel_model_graph_capture_failure_falls_back(monkeypatch):
    """A decode step that cannot be captured (here: a host read inside it) makes the model warn once and decode
    eagerly from then on; the tokens stay those of the eager model."""
    from infoquant_export.kernels.model import KernelCausalLM
    from infoquant_export.kernels.random_model import random_w4a4kv4_model

    model = random_w4a4kv4_model("smollm2-135m", 1, "cuda")
    km, eager = KernelCausalLM(model, torch.float32), KernelCausalLM(model, torch.float32, cuda_graphs=False)
    step = km.decode_step

    def syncing(tokens, pos, cache):
        int(pos.sum())  # a device -> host copy: not allowed while capturing
        return step(tokens, pos, cache)

    monkeypatch.setattr(km, "decode_step", syncing)
    ids = torch.randint(0, 1000, (1, 20), device=CUDA)
    logits, cache = km(ids[:, :16])
    ref, ref_cache = eager(ids[:, :16])
    stream = torch.cuda.current_stream()
    with pytest.warns(RuntimeWarning, match="CUDA graph capture of the decode step failed"):
        logits, cache = km(ids[:, 16:17], cache)
    assert not km.cuda_graphs and cache.graph is None
    assert torch.cuda.current_stream() == stream  # not left on the failed capture's stream
    for i in range(17, 20):
        logits, cache = km(ids[:, i:i + 1], cache)
    for i in range(16, 20):
        ref, ref_cache = eager(ids[:, i:i + 1], ref_cache)
    assert torch.equal(logits, ref) and cache.length == ref_cache.length == 20


def test_cpu_tensor_refused_by_compiled_kernels():
    with pytest.raises(ops.KernelInputError, match="CUDA tensors"):
        ops.quantize_rows(torch.randn(4, 256), 4, 0.9)
    with pytest.raises(ops.KernelInputError, match="different devices"):
        act = ops.quantize_rows(torch.randn(4, 256, device=CUDA), 4, 0.9)
        ops.w4a4_linear(act, ops.PackedWeight.from_codes(torch.zeros(64, 256, dtype=torch.int8), torch.ones(64)))
