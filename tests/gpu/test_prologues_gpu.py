"""The row kernels' prologues compiled on the GPU (RMSNorm with float64 sqrt/div, the float64 exp or the sigmoid
table of SwiGLU, RoPE), at LLaMA-2-7B widths with 512 rows, against the PyTorch ops + primitives on the CPU: the
same bits as in Triton's interpreter (tests/kernels/test_prologues.py)."""

from __future__ import annotations

import pytest
import torch

from infoquant_export.kernels import ops
from infoquant_export.models.model import rms_norm
from infoquant_export.transforms.hadamard import apply_hadamard
from tests.kernels.test_kv import CLIP, assert_cache_holds
from tests.kernels.test_prologues import EPS, assert_packed_equal, rope_reference, swiglu_reference
from tests.kernels.test_quantize import reference

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.mark.parametrize("dtype,n", [(torch.float16, 4096), (torch.float32, 576)])
def test_rmsnorm_quantize_gpu(dtype, n):
    x = (torch.randn(512, n) * 3).to(dtype)
    x[:3] *= 300.0
    w = torch.rand(n) + 0.5
    got = ops.quantize_rows(x.to(CUDA), 4, 0.9, prologue=ops.rmsnorm_prologue(w.to(CUDA), EPS))
    assert_packed_equal(got, reference(rms_norm(x, w, EPS), 4, 0.9))


@pytest.mark.parametrize("dtype,n,blocks", [
    (torch.float16, 11008, 1),      # unfused K = 172: FWHT + prologue -> float64 H_K^T -> scaled quantize
    (torch.float16, 11008, None),   # chunked kernel
    (torch.float16, 11008, 43),     # 43 fused blocks of 256
    (torch.float32, 1536, 1),       # fused Paley K = 12, float64 exp (no table)
    (torch.bfloat16, 11008, 1),
])
def test_swiglu_quantize_gpu(dtype, n, blocks):
    gate_up = (torch.randn(512, 2 * n) * 2).to(dtype)
    gate_up[:3, : n // 4] *= 20.0
    got = ops.quantize_rows(gate_up.to(CUDA), 4, 0.9, None, blocks, prologue=ops.SWIGLU)
    assert_packed_equal(got, reference(swiglu_reference(gate_up), 4, 0.9, None, blocks))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rope_q_and_k_gpu(dtype):
    """LLaMA-2-7B heads (32 q, 32 KV, 128): q RoPE + Hadamard and K RoPE + Hadamard + cache, from a QKV output."""
    b, s, h, d = 4, 64, 32, 128
    qkv = (torch.randn(b, s, 3 * h * d) * 2).to(dtype)
    q, k, _ = (t.unflatten(-1, (h, d)) for t in qkv.split(h * d, dim=-1))
    angles = torch.randn(s, d) * 3
    cos, sin = angles.cos(), angles.sin()
    qkv_gpu = qkv.to(CUDA)
    q_gpu, k_gpu, _ = (t.unflatten(-1, (h, d)) for t in qkv_gpu.split(h * d, dim=-1))
    got = ops.rope_rows(q_gpu, cos.to(CUDA), sin.to(CUDA), True)
    expected = apply_hadamard(rope_reference(q, cos, sin).to(dtype).float(), 1).to(dtype)
    assert torch.equal(got.cpu(), expected)
    cache = ops.KVCache4.empty(b, h, 128, d, CUDA)
    ops.quantize_kv(k_gpu, cache, 7, CLIP, True, rope=(cos.to(CUDA), sin.to(CUDA)))
    assert_cache_holds(cache, rope_reference(k, cos, sin), 7, True)
