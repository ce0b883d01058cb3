"""The row kernels' prologues (plugins/infoquant_kernels/quantize.py ``_prologue``): RMSNorm + quantize, SwiGLU +
(Hadamard +) quantize, RoPE + Hadamard for q and RoPE + Hadamard + cache quantize for K, each read in place from
the previous op's output. Bit-identical to the PyTorch ops of the fake-quant model (``rms_norm``, ``sigmoid64``,
``rotate_half``) followed by the primitives."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

from infoquant_export.kernels import ops, rows  # noqa: E402
from infoquant_export.kernels.ops import KernelInputError  # noqa: E402
from infoquant_export.models.model import rms_norm, rotate_half  # noqa: E402
from infoquant_export.quant.primitives import sigmoid64  # noqa: E402
from infoquant_export.transforms.hadamard import apply_hadamard, hadamard_factors  # noqa: E402
from tests.kernels.conftest import DEVICE, INTERPRETER_WARNING  # noqa: E402
from tests.kernels.test_kv import CLIP, assert_cache_holds  # noqa: E402
from tests.kernels.test_quantize import reference  # noqa: E402

pytestmark = pytest.mark.filterwarnings(INTERPRETER_WARNING)

EPS = 1e-5


def assert_packed_equal(got: ops.PackedRows, ref: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    codes, scale, zero = ref
    assert torch.equal(got.scale.cpu(), scale)
    assert torch.equal(got.zero.cpu(), zero)
    assert torch.equal(got.codes.cpu(), codes)
    assert int(zero.max()) > 0  # not a vacuous comparison


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("n,blocks", [(576, None), (4096, None), (192, 1)])
def test_rmsnorm_quantize(dtype, n, blocks):
    """``quantize_rows(x, prologue=rmsnorm_prologue(w, eps))`` = ``rms_norm`` (float64, rounded once to x's dtype)
    then (the Hadamard and) the quantizer, with a non-unit weight and a row of large values."""
    x = (torch.randn(6, n) * 3).to(dtype)
    x[2] *= 300.0  # the norm, not the raw range, sets this row's scale
    w = torch.rand(n) + 0.5
    got = ops.quantize_rows(x.to(DEVICE), 4, 0.9, None, blocks, prologue=ops.rmsnorm_prologue(w.to(DEVICE), EPS))
    assert_packed_equal(got, reference(rms_norm(x, w, EPS), 4, 0.9, None, blocks))


def swiglu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """The fake-quant model's ``gate * sigmoid64(gate) * up`` (float32), rounded to the input dtype."""
    g, u = gate_up.float().chunk(2, dim=-1)
    return (g * sigmoid64(g) * u).to(gate_up.dtype)


SWIGLU_CASES = {
    # name: (n, hadamard_blocks, chunk)
    "no_rotation_192": (192, None, None),
    "no_rotation_chunked_192": (192, None, 64),
    "paley_k12_1536_fused": (1536, 1, None),
    "williamson_k172_11008_unfused": (11008, 1, None),  # LLaMA-2-7B intermediate: FWHT kernel + float64 H_K^T
    "two_blocks_sylvester_512": (512, 2, None),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", SWIGLU_CASES)
def test_swiglu_quantize(case, dtype):
    n, blocks, chunk = SWIGLU_CASES[case]
    if case.endswith("unfused"):
        assert hadamard_factors(n) == (172, 64) and not ops.row_tile(n, 1, True).fused
    gate_up = (torch.randn(3, 2 * n) * 2).to(dtype)
    gate_up[1, : n // 4] *= 20.0  # saturating gates (sigmoid 0 / 1) in one row
    got = ops.quantize_rows_variant(gate_up.to(DEVICE), 4, 0.9, None, blocks, chunk=chunk, prologue=ops.SWIGLU)
    assert got.codes.shape == (3, n // 2)
    assert_packed_equal(got, reference(swiglu_reference(gate_up), 4, 0.9, None, blocks))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sigmoid_table_is_sigmoid64(dtype):
    """The SwiGLU prologue's table for 16-bit gates holds sigmoid64 of every bit pattern (all 65536)."""
    bits = torch.arange(65536, dtype=torch.int32)
    values = bits.to(torch.int16).view(dtype).float()  # int32 -> int16 wraps to the same 16 bits
    table = rows._sigmoid_table(dtype, torch.device("cpu"))
    expected = sigmoid64(values)
    finite = torch.isfinite(values)
    assert torch.equal(table[finite], expected[finite])
    assert table[values == float("inf")].eq(1.0).all() and table[values == float("-inf")].eq(0.0).all()


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The fake-quant model's RoPE in float32 on ``x [B, S, H, D]`` with tables ``[S, D]``."""
    xf = x.float()
    return xf * cos[None, :, None] + rotate_half(xf) * sin[None, :, None]


def qkv_views(b: int, s: int, hq: int, hkv: int, d: int, dtype: torch.dtype):
    """A fused QKV output and its q / k / v column views ``[B, S, H, D]`` (tokens strided by the QKV width)."""
    qkv = (torch.randn(b, s, (hq + 2 * hkv) * d) * 2).to(dtype).to(DEVICE)
    q, k, v = (t.unflatten(-1, (-1, d)) for t in qkv.split((hq * d, hkv * d, hkv * d), dim=-1))
    angles = torch.randn(s, d) * 3
    return q, k, v, angles.cos().to(DEVICE), angles.sin().to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotate", [True, False])
@pytest.mark.parametrize("b,s", [(2, 3), (3, 1)])
def test_rope_q(dtype, rotate, b, s):
    """q: RoPE, rounded to the dtype, then the per-head Hadamard -- read from the QKV output in place."""
    q, _, _, cos, sin = qkv_views(b, s, 4, 2, 64, dtype)
    got = ops.rope_rows(q, cos, sin, rotate)
    expected = rope_reference(q.cpu(), cos.cpu(), sin.cpu()).to(dtype)
    if rotate:
        expected = apply_hadamard(expected.float(), 1).to(dtype)  # a Hadamard of head_dim per head
    assert got.shape == q.shape and got.dtype == dtype and got.is_contiguous()
    assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("rotate", [True, False])
def test_rope_k_into_cache(dtype, rotate):
    """K: RoPE in float32 (not rounded), the per-head Hadamard and the cache quantizer, at positions 5..7 of the
    cache, from the QKV output in place; V from its columns without a copy."""
    b, s, hkv, d = 2, 3, 2, 64
    _, k, v, cos, sin = qkv_views(b, s, 4, hkv, d, dtype)
    k_cache, v_cache = ops.KVCache4.empty(b, hkv, 16, d, DEVICE), ops.KVCache4.empty(b, hkv, 16, d, DEVICE)
    ops.quantize_kv(k, k_cache, 5, CLIP, rotate, rope=(cos, sin))
    ops.quantize_kv(v, v_cache, 5, CLIP, False)
    assert_cache_holds(k_cache, rope_reference(k.cpu(), cos.cpu(), sin.cpu()), 5, rotate)
    assert_cache_holds(v_cache, v.cpu(), 5, False)


def test_prologue_bad_input():
    x = torch.randn(2, 64).to(DEVICE)
    with pytest.raises(KernelInputError, match="RMSNorm weight has 32 values, the rows 64"):
        ops.quantize_rows(x, prologue=ops.rmsnorm_prologue(torch.ones(32).to(DEVICE), EPS))
    with pytest.raises(KernelInputError, match=r"RMSNorm weight has shape \(2, 32\)"):
        ops.rmsnorm_prologue(torch.ones(2, 32), EPS)
    with pytest.raises(KernelInputError, match="SwiGLU row .* even width, got 63"):
        ops.quantize_rows(torch.randn(2, 63).to(DEVICE), prologue=ops.SWIGLU)
    q, k, _, cos, sin = qkv_views(1, 3, 2, 1, 64, torch.float16)
    with pytest.raises(KernelInputError, match=r"RoPE cos has shape \(2, 64\), expected \[seq=3, head_dim=64\]"):
        ops.rope_rows(q, cos[:2], sin[:2], True)
    with pytest.raises(KernelInputError, match="sin has dtype torch.float16; the kernel takes torch.float32"):
        ops.quantize_kv(k, ops.KVCache4.empty(1, 1, 8, 64, DEVICE), 0, CLIP, True, rope=(cos, sin.half()))
    with pytest.raises(KernelInputError, match="q .* does not have contiguous heads"):
        ops.rope_rows(q.transpose(1, 2), cos, sin, True)
    with pytest.raises(KernelInputError, match="RMSNorm prologue takes float16 or float32 rows, got bfloat16"):
        ops.quantize_rows(x.bfloat16(), prologue=ops.rmsnorm_prologue(torch.ones(64).to(DEVICE), EPS))
    with pytest.raises(KernelInputError, match="takes the RMSNorm or SwiGLU prologue"):
        ops.quantize_rows(x, prologue=ops.Prologue(ops.PRE_ROPE, cos, sin))
