"""The checked wrappers (infoquant_export/kernels/, through ``ops``) reject unsupported inputs with a one-line
KernelInputError (a UserError) naming the constraint, before anything is launched."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

from infoquant_export.errors import UserError  # noqa: E402
from infoquant_export.kernels import interpreted, ops  # noqa: E402
from infoquant_export.kernels.ops import KernelInputError  # noqa: E402
from infoquant_export.quant.primitives import activation_qparams, dequantize_activation, quantize_activation  # noqa: E402
from infoquant_export.transforms.hadamard import HadamardSizeError  # noqa: E402
from tests.kernels.conftest import DEVICE, INTERPRETER_WARNING  # noqa: E402

pytestmark = pytest.mark.filterwarnings(INTERPRETER_WARNING)

REPO = Path(__file__).resolve().parents[2]


def rows(m: int = 2, n: int = 64, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(m, n).to(dtype).to(DEVICE)


def weight(n: int = 16, k: int = 64) -> ops.PackedWeight:
    return ops.PackedWeight.from_codes(torch.randint(-8, 8, (n, k)), torch.ones(n)).to(DEVICE)


def caches(b: int = 1, h: int = 1, cap: int = 8, d: int = 64) -> tuple[ops.KVCache4, ops.KVCache4]:
    return ops.KVCache4.empty(b, h, cap, d, DEVICE), ops.KVCache4.empty(b, h, cap, d, DEVICE)


def test_kernel_input_error_is_a_one_line_user_error():
    err = KernelInputError("the problem", "the fix")
    assert isinstance(err, UserError) and str(err) == "the problem; the fix"


def test_non_contiguous_input():
    x = torch.randn(64, 4).to(DEVICE).t()
    with pytest.raises(KernelInputError, match=r"x must be contiguous \(shape \(4, 64\), strides \(1, 4\)\)"):
        ops.quantize_rows(x)
    with pytest.raises(KernelInputError, match=r"k/v \(shape \(1, 2, 2, 64\), strides \(256, 128, 1, 2\)\) does not "
                                               "have contiguous heads"):
        ops.quantize_kv(torch.randn(1, 2, 64, 2).to(DEVICE).transpose(2, 3), caches()[0], 0, 0.95, False)


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64])
def test_wrong_dtype(dtype):
    with pytest.raises(KernelInputError, match=f"x has dtype {dtype}; the kernel takes torch.float32"):
        ops.quantize_rows(torch.ones(2, 64, dtype=dtype, device=DEVICE))


def test_empty_input():
    with pytest.raises(KernelInputError, match="x is empty"):
        ops.quantize_rows(torch.empty(0, 64, device=DEVICE))


def test_unsupported_bits():
    with pytest.raises(KernelInputError, match="4 or 8 bits, not 3"):
        ops.quantize_rows(rows(), bits=3)


def test_odd_row_for_4bit():
    with pytest.raises(KernelInputError, match="4-bit codes pack in pairs; a block of 575 values is odd"):
        ops.quantize_rows(rows(n=575))
    with pytest.raises(KernelInputError, match="a block of 33 values is odd"):
        ops.quantize_rows(torch.randn(3, 2, 33).to(DEVICE))


def test_blocks_do_not_divide_row():
    with pytest.raises(KernelInputError, match="a row of 192 values does not split into 5 equal blocks"):
        ops.quantize_rows(rows(n=192), hadamard_blocks=5)


def test_hadamard_size_without_construction():
    # 944 = 59 * 16: no Paley order divides it with a power-of-2 cofactor (the construction's own UserError)
    with pytest.raises(HadamardSizeError, match="no Hadamard construction for size 944"):
        ops.quantize_rows(rows(n=944), hadamard_blocks=1)
    with pytest.raises(HadamardSizeError, match="no Hadamard construction for size 944"):
        ops.hadamard(rows(n=944))
    # 224 = 28 x 8: a Paley block exists but its power-of-2 factor is below the kernel's 16
    with pytest.raises(KernelInputError, match=r"Hadamard block 224 = 28 x 8: the kernel needs a power-of-2 factor"):
        ops.quantize_rows(rows(n=224), hadamard_blocks=1)


def test_row_tile_too_large():
    with pytest.raises(KernelInputError, match="needs a 65536-value tile"):
        ops.quantize_rows(rows(m=1, n=40000))


def test_gemm_in_features_not_multiple_of_64():
    with pytest.raises(KernelInputError, match=r"weight codes \(16, 96\): the GEMM needs \[out, in\] with in % 64"):
        ops.PackedWeight.from_codes(torch.zeros(16, 96, dtype=torch.int8), torch.ones(16))
    with pytest.raises(KernelInputError, match="in_features 96 is not a multiple of 64"):
        ops.w4a4_linear(ops.quantize_rows(rows(n=96)), ops.PackedWeight(
            torch.zeros(16, 48, dtype=torch.uint8, device=DEVICE), torch.ones(16, device=DEVICE),
            torch.zeros(16, dtype=torch.int32, device=DEVICE)))


def test_gemm_mismatched_k():
    with pytest.raises(KernelInputError, match="activation has 128 features but the weight expects 64"):
        ops.w4a4_linear(ops.quantize_rows(rows(n=128)), weight(k=64))


def test_gemm_needs_4bit_activations():
    with pytest.raises(KernelInputError, match="takes 4-bit activations, got 8-bit"):
        ops.w4a4_linear(ops.quantize_rows(rows(), bits=8), weight())


def test_gemm_residual_wrong_shape():
    with pytest.raises(KernelInputError, match=r"residual \(16, 2\) does not match the output \(2, 16\)"):
        ops.w4a4_linear(ops.quantize_rows(rows()), weight(), torch.zeros(16, 2, device=DEVICE))


def test_gemm_bad_out_dtype():
    with pytest.raises(KernelInputError, match="out_dtype has dtype torch.int32"):
        ops.w4a4_linear(ops.quantize_rows(rows()), weight(), out_dtype=torch.int32)


def test_decode_head_dim_not_power_of_two():
    k, v = caches(d=96)
    with pytest.raises(KernelInputError, match="head_dim 96 is not a power of two >= 16"):
        ops.kv4_decode_attention(torch.randn(1, 1, 96, device=DEVICE), k, v,
                                 torch.ones(1, dtype=torch.int32, device=DEVICE), 1)


def test_decode_bad_shapes():
    k, v = caches(h=2)
    lengths = torch.ones(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(KernelInputError, match="3 query heads are not a multiple of 2 KV heads"):
        ops.kv4_decode_attention(torch.randn(1, 3, 64, device=DEVICE), k, v, lengths, 1)
    with pytest.raises(KernelInputError, match="do not fit q"):
        ops.kv4_decode_attention(torch.randn(1, 2, 32, device=DEVICE), k, v, lengths, 1)
    with pytest.raises(KernelInputError, match="max_len 9 / lengths"):
        ops.kv4_decode_attention(torch.randn(1, 2, 64, device=DEVICE), k, v, lengths, 9)  # cache holds 8
    with pytest.raises(KernelInputError, match=r"kernel='wgmma' is not one of \('tc', 'cc', 'ccs', 'mma'\)"):
        ops.kv4_decode_attention(torch.randn(1, 2, 64, device=DEVICE), k, v, lengths, 1, kernel="wgmma")
    with pytest.raises(KernelInputError, match="lengths has dtype torch.int64"):
        ops.kv4_decode_attention(torch.randn(1, 2, 64, device=DEVICE), k, v, lengths.long(), 1)


def test_cache_overflow():
    k, _ = caches(cap=8)
    x = torch.randn(1, 3, 1, 64).to(DEVICE)
    with pytest.raises(KernelInputError, match="tokens 6..8 do not fit a cache of 8 positions"):
        ops.quantize_kv(x, k, 6, 0.95, False)
    with pytest.raises(KernelInputError, match="tokens -1..1 do not fit"):
        ops.quantize_kv(x, k, -1, 0.95, False)
    ops.quantize_kv(x, k, 5, 0.95, False)  # 5..7 fits exactly
    with pytest.raises(KernelInputError, match="cannot read 9 tokens from a cache of 8"):
        ops.dequantize_kv(k, 9)


def test_kv_cache_shape_mismatch():
    k, _ = caches(h=2)
    with pytest.raises(KernelInputError, match=r"k/v \[B=1, H=3, D=64\] does not fit the cache"):
        ops.quantize_kv(torch.randn(1, 1, 3, 64).to(DEVICE), k, 0, 0.95, False)
    with pytest.raises(KernelInputError, match="k/v must be \\[batch, seq, heads, head_dim\\]"):
        ops.quantize_kv(torch.randn(1, 2, 64).to(DEVICE), k, 0, 0.95, False)


@pytest.mark.skipif(interpreted(), reason="a CUDA-vs-CPU device mismatch needs compiled kernels (a CUDA device)")
def test_device_mismatch():
    k, _ = caches()  # on DEVICE (cuda)
    with pytest.raises(KernelInputError, match="kernel inputs on different devices"):
        ops.quantize_kv(torch.randn(1, 1, 1, 64), ops.KVCache4(k.codes, k.scale.cpu(), k.zero), 0, 0.95, False)
    with pytest.raises(KernelInputError, match="compiled kernels need CUDA tensors, got cpu"):
        ops.quantize_rows(torch.randn(2, 64))


@pytest.mark.skipif(not interpreted(), reason="only the interpreter depends on the import order")
def test_kernels_work_or_explain_after_triton_was_imported():
    code = (
        "import triton, torch\n"
        "from infoquant_export.errors import UserError\n"
        "from infoquant_export.kernels import ops\n"
        "try:\n"
        "    ops.quantize_rows(torch.ones(2, 64))\n"
        "except UserError as exc:\n"
        "    print('USERERROR', exc)\n"
        "else:\n"
        "    print('OK')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr.strip()[-300:]
    assert last == "OK" or (last.startswith("USERERROR") and "TRITON_INTERPRET" in last), last


def test_decode_lengths_beyond_max_len():
    """300 valid tokens but max_len 16: the split chunks cover at most max_len rounded up to a token tile (<= 128
    positions), so most of the context is skipped without an error."""
    t = 300
    k, v = caches(cap=320)
    for cache in (k, v):  # filled directly (the quantize kernel is tested elsewhere)
        cache.codes[:, :, :t] = torch.randint(0, 256, (1, 1, t, 32), dtype=torch.uint8, device=DEVICE)
        cache.scale[:, :, :t] = 0.1
        cache.zero[:, :, :t] = 8
    q = torch.randn(1, 1, 64).to(DEVICE)
    lengths = torch.tensor([t], dtype=torch.int32, device=DEVICE)
    correct = ops.kv4_decode_attention(q, k, v, lengths, t).cpu()
    try:
        short = ops.kv4_decode_attention(q, k, v, lengths, 16).cpu()
    except KernelInputError:
        return
    assert torch.allclose(short, correct, atol=1e-5)


def test_kv_head_dim_not_power_of_two():
    """head_dim 96: the cache kernels pad to 128 inside the tile (decode attention refuses such heads)."""
    k, v = caches(d=96)
    x = torch.randn(1, 2, 1, 96)
    ops.quantize_kv(x.to(DEVICE), k, 0, 0.95, False)
    out = ops.dequantize_kv(k, 2).cpu()
    s, z = activation_qparams(x.transpose(1, 2), 4, 0.95)
    assert torch.equal(out, dequantize_activation(quantize_activation(x.transpose(1, 2), s, z, 4), s, z))
    with pytest.raises(KernelInputError, match="head_dim 96 is not a power of two"):
        ops.kv4_decode_attention(torch.randn(1, 1, 96).to(DEVICE), k, v,
                                 torch.tensor([2], dtype=torch.int32, device=DEVICE), 2)


def test_decode_splits_not_power_of_two():
    k, v = caches(cap=64)
    ops.quantize_kv(torch.randn(1, 64, 1, 64).to(DEVICE), k, 0, 0.95, False)
    ops.quantize_kv(torch.randn(1, 64, 1, 64).to(DEVICE), v, 0, 0.95, False)
    q = torch.randn(1, 1, 64, device=DEVICE)
    lengths = torch.tensor([64], dtype=torch.int32, device=DEVICE)
    try:
        out = ops.kv4_decode_attention(q, k, v, lengths, 64, splits=3).cpu()
    except KernelInputError:
        return
    assert torch.allclose(out, ops.kv4_decode_attention(q, k, v, lengths, 64, splits=1).cpu(), atol=1e-5)


def test_decode_stages_below_one():
    k, v = caches(cap=64)
    q = torch.randn(1, 1, 64, device=DEVICE)
    lengths = torch.tensor([64], dtype=torch.int32, device=DEVICE)
    with pytest.raises(KernelInputError, match="num_stages=0 is below 1"):
        ops.kv4_decode_attention(q, k, v, lengths, 64, num_stages=0, kernel="cc")
