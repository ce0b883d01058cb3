"""The 4-bit KV cache: quantize (per token and KV head, after the per-head Hadamard for K), dequantize, and the
split-K decode attention kernel (plugins/infoquant_kernels/quantize.py, attention.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
import triton  # noqa: E402  (conftest imported infoquant_export.kernels: TRITON_INTERPRET is set without a GPU)
import triton.language as tl  # noqa: E402
from infoquant_kernels.attention import _nibble, _zero_magic  # noqa: E402

from infoquant_export.kernels import ops, rows  # noqa: E402
from infoquant_export.quant.primitives import (  # noqa: E402
    activation_qparams,
    dequantize_activation,
    pack_uint4,
    quantize_activation,
    softmax64,
)
from infoquant_export.transforms.hadamard import apply_hadamard  # noqa: E402
from tests.kernels.conftest import DEVICE, INTERPRETER_WARNING  # noqa: E402

pytestmark = pytest.mark.filterwarnings(INTERPRETER_WARNING)

CLIP = 0.95  # the KV quantizers' static clip


def reference_kv(x: torch.Tensor, rotate: bool, clip: float = CLIP):
    """Primitives per (batch, head, token) for ``x [B, S, H, D]``: codes [B, H, S, D], scale / zero [B, H, S, 1]."""
    xh = x.float().transpose(1, 2)  # [B, H, S, D]: a row per (batch, head, token)
    if rotate:
        xh = apply_hadamard(xh)  # a full Hadamard of head_dim on each head
    s, z = activation_qparams(xh, 4, clip)
    return quantize_activation(xh, s, z, 4), s, z


def assert_cache_holds(cache: ops.KVCache4, x: torch.Tensor, pos0: int, rotate: bool) -> None:
    q, s, z = reference_kv(x, rotate)
    span = slice(pos0, pos0 + x.shape[1])
    assert torch.equal(cache.codes[:, :, span].cpu(), pack_uint4(q))
    assert torch.equal(cache.scale[:, :, span].cpu(), s.squeeze(-1))
    assert torch.equal(cache.zero[:, :, span].cpu(), z.squeeze(-1).to(torch.uint8))


def assert_untouched(cache: ops.KVCache4, keep: list[slice]) -> None:
    """Positions outside the written spans still hold KVCache4.empty's values (no stray writes)."""
    written = torch.zeros(cache.capacity, dtype=torch.bool)
    for span in keep:
        written[span] = True
    free = ~written
    assert not cache.codes[:, :, free].any() and not cache.zero[:, :, free].any()
    assert torch.all(cache.scale[:, :, free] == 1.0)


@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quantize_kv_at_offset(rotate, dtype):
    """B=2, S=5 tokens at positions 3..7 of a 16-token cache, H=3 KV heads (tile padded to 4) of 64; then one
    decode token at position 8."""
    b, s, h, d = 2, 5, 3, 64
    cache = ops.KVCache4.empty(b, h, 16, d, DEVICE)
    x = (torch.randn(b, s, h, d) * 2).to(dtype)
    x[0, 1, 2, 0] = 40.0  # an outlier in one (batch, token, head): per-head scales must differ
    ops.quantize_kv(x.to(DEVICE), cache, 3, CLIP, rotate)
    assert_cache_holds(cache, x, 3, rotate)
    step = torch.randn(b, 1, h, d).to(dtype)
    ops.quantize_kv(step.to(DEVICE), cache, 8, CLIP, rotate)
    assert_cache_holds(cache, step, 8, rotate)
    assert_cache_holds(cache, x, 3, rotate)  # the earlier tokens are intact
    assert_untouched(cache, [slice(3, 9)])
    assert cache.scale[0, 2, 4] > 1.5 * cache.scale[0, 1, 4]  # the outlier head has its own scale


@pytest.mark.parametrize("rotate", [False, True])
def test_quantize_kv_position_from_device(rotate):
    """The position as an int32 [1] tensor that the kernel reads (a CUDA-graph decode step): the same bits at the
    same place as the int form, with K's RoPE; a position at or past the capacity (or negative) writes nothing."""
    b, h, d = 2, 3, 64
    x = torch.randn(b, 1, h, d)
    cos, sin = torch.randn(1, d), torch.randn(1, d)
    by_int, by_tensor = ops.KVCache4.empty(b, h, 8, d, DEVICE), ops.KVCache4.empty(b, h, 8, d, DEVICE)
    rope = (cos.to(DEVICE), sin.to(DEVICE))
    ops.quantize_kv(x.to(DEVICE), by_int, 5, CLIP, rotate, rope=rope)
    ops.quantize_kv(x.to(DEVICE), by_tensor, torch.tensor([5], dtype=torch.int32, device=DEVICE), CLIP, rotate,
                    rope=rope)
    for a, c in ((by_int.codes, by_tensor.codes), (by_int.scale, by_tensor.scale), (by_int.zero, by_tensor.zero)):
        assert torch.equal(a.cpu(), c.cpu())
    assert_untouched(by_tensor, [slice(5, 6)])
    for outside in (8, 1000, -1):
        ops.quantize_kv(x.to(DEVICE), by_tensor, torch.tensor([outside], dtype=torch.int32, device=DEVICE), CLIP,
                        rotate)
        assert_untouched(by_tensor, [slice(5, 6)])


@pytest.mark.parametrize("pos,message", [
    (torch.tensor([1], dtype=torch.int64), "pos0 has dtype torch.int64"),
    (torch.tensor([1, 2], dtype=torch.int32), r"shape \[1\]"),
])
def test_quantize_kv_bad_position_tensor(pos, message):
    cache = ops.KVCache4.empty(1, 2, 8, 64, DEVICE)
    with pytest.raises(ops.KernelInputError, match=message):
        ops.quantize_kv(torch.randn(1, 1, 2, 64, device=DEVICE), cache, pos.to(DEVICE), CLIP, False)


@pytest.mark.parametrize("heads", [2, 5])
def test_quantize_kv_paley_head_dim(heads):
    """head_dim 192 = 12 x 16 (Paley K = 12): fused for 2 heads ([2, 16, 16] tile), for 5 heads the K step runs
    unfused (8 x 16 > 64 rows) and the cache is then written per head without rotation."""
    b, s, d = 1, 3, 192
    assert ops.row_tile(heads * d, heads, True).fused == (heads == 2)
    cache = ops.KVCache4.empty(b, heads, 4, d, DEVICE)
    x = torch.randn(b, s, heads, d)
    ops.quantize_kv(x.to(DEVICE), cache, 1, CLIP, True)
    assert_cache_holds(cache, x, 1, True)
    assert_untouched(cache, [slice(1, 4)])


def test_quantize_kv_fused_k_step_in_several_launches(monkeypatch):
    """The row kernel's K-step scratch is bounded (``rows.SCRATCH_BYTES``): rows beyond it go in further launches
    that reuse it. With room for 4 rows, 2 sequences x 3 tokens of 2 heads of 192 = 12 x 16 take two launches, the
    second starting inside the second sequence; the cache holds the same bits at the same positions."""
    tile = ops.row_tile(2 * 192, 2, True)
    assert tile.fused and tile.k == 12
    monkeypatch.setattr(rows, "SCRATCH_BYTES", 4 * 4 * tile.elements)
    cache = ops.KVCache4.empty(2, 2, 8, 192, DEVICE)
    x = torch.randn(2, 3, 2, 192)
    ops.quantize_kv(x.to(DEVICE), cache, 2, CLIP, True)
    assert_cache_holds(cache, x, 2, True)
    assert_untouched(cache, [slice(2, 5)])


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_dequantize_kv_exact(out_dtype):
    """(codes - z) * s per token: exactly dequantize_activation, over 40 tokens (two token tiles of 32, the second
    partial) and over a prefix of 5."""
    b, s, h, d = 2, 40, 3, 64
    cache = ops.KVCache4.empty(b, h, 64, d, DEVICE)
    x = torch.randn(b, s, h, d)
    ops.quantize_kv(x.to(DEVICE), cache, 0, CLIP, True)
    q, sc, z = reference_kv(x, True)
    ref = dequantize_activation(q, sc, z)
    assert ref.dtype == torch.float32
    for n in (40, 5):
        got = ops.dequantize_kv(cache, n, out_dtype).cpu()
        assert got.shape == (b, h, n, d) and got.dtype == out_dtype
        assert torch.equal(got, ref[:, :, :n].to(out_dtype))


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """float64 softmax attention of q [B, Hq, D] over k, v [B, Hkv, T, D] (the dequantized caches); GQA by
    repeat_interleave (query head i uses KV head i // G)."""
    b, hq, d = q.shape
    groups = hq // k.shape[1]
    out = torch.empty(b, hq, d, dtype=torch.float64)
    for i, n in enumerate(lengths):
        kk = k[i, :, :n].double().repeat_interleave(groups, 0)
        vv = v[i, :, :n].double().repeat_interleave(groups, 0)
        scores = (q[i].double()[:, None, :] @ kk.transpose(-1, -2)).squeeze(1) * d**-0.5
        out[i] = (softmax64(scores)[:, None, :] @ vv).squeeze(1)
    return out


# Measured (interpreter, float32 q, "ieee" dots): max |out - ref| / max |ref| between 2.1e-7 and 3.9e-7 over the
# cases below (up to 4.2e-7 with other seeds); the kernel runs in float32 (scores as (q . (code - z)) * s, exp2,
# partial results merged across tiles and splits). 1e-5 leaves a margin of > 20x while an indexing / masking / GQA /
# rescaling / split-merge mistake gives errors of order 1e-1.
REL_TOL = 1e-5


def random_cache(b: int, h: int, t: int, cap: int, d: int, spread: float = 2.0) -> tuple[ops.KVCache4, torch.Tensor]:
    """A cache filled from the primitives (not through quantize_kv, which is tested above) with t tokens of random
    data, and its dequantized float32 values [B, H, t, D] (dequantize_activation)."""
    x = torch.randn(b, h, t, d) * spread
    s, z = activation_qparams(x, 4, CLIP)
    q = quantize_activation(x, s, z, 4)
    cache = ops.KVCache4.empty(b, h, cap, d, "cpu")
    cache.codes[:, :, :t] = pack_uint4(q)
    cache.scale[:, :, :t] = s.squeeze(-1)
    cache.zero[:, :, :t] = z.squeeze(-1).to(torch.uint8)
    dev = ops.KVCache4(cache.codes.to(DEVICE), cache.scale.to(DEVICE), cache.zero.to(DEVICE))
    return dev, dequantize_activation(q, s, z)


# Measured (interpreter, float32 q): max |out - ref| / max |ref| = 2.3e-7 (G=1, D=128) and 2.5e-7 (G=3, D=64) for
# every split count here (other seeds: up to 4.2e-7; the CUDA-core kernel "cc" 2.2e-7 - 3.1e-7, here and with
# seed 0 per case 2.9e-7 - 6.6e-7, "ccs" with its running max per token slot 2.9e-7 - 5.4e-7); the kernel runs
# in float32 (scores as (q . (code - z)) * s, exp2, partial results merged across splits). 1e-5 leaves a margin of
# > 20x while an indexing / masking / GQA / split-merge mistake gives errors of order 1e-1.
REL_TOL = 1e-5


@pytest.mark.parametrize("kernel", ["tc", "cc", "ccs"])
@pytest.mark.parametrize("splits,block_t", [(1, None), (4, None), (None, None), (1, 16), (4, 16)])
@pytest.mark.parametrize("groups,head_dim", [(1, 128), (3, 64)])
def test_kv4_decode_attention(groups, head_dim, splits, block_t, kernel):
    """Batch rows of 150, 37 and 1 tokens (max_len 150, cache 160): with 4 splits the chunks are partly and wholly
    empty; block_t = 16 puts several token tiles in one chunk (the online-softmax rescaling between tiles)."""
    b, hkv, t, cap = 3, 2, 150, 160
    lengths = [t, 37, 1]
    kc, k_hat = random_cache(b, hkv, t, cap, head_dim)
    vc, v_hat = random_cache(b, hkv, t, cap, head_dim, 1.0)
    q = torch.randn(b, hkv * groups, head_dim) * 2
    out = ops.kv4_decode_attention(q.to(DEVICE), kc, vc, torch.tensor(lengths, dtype=torch.int32, device=DEVICE),
                                   t, splits=splits, block_t=block_t, kernel=kernel).cpu()
    assert out.dtype == torch.float32 and out.shape == q.shape
    ref = attention_reference(q, k_hat, v_hat, lengths)
    rel = float((out.double() - ref).abs().max() / ref.abs().max())
    assert rel < REL_TOL, rel
    # the length-1 row attends to its only token: the output is that token's V row (of the query's KV head)
    assert torch.allclose(out[2], v_hat[2, :, 0].repeat_interleave(groups, 0), rtol=0, atol=1e-6)


def test_kv4_decode_attention_float16_query():
    """float16 q: the dot products run in float16 (q and p * s_v rounded to float16, code - z exact), softmax and
    accumulation in float32, the output rounded once to float16."""
    b, hkv, groups, d, t = 2, 2, 2, 64, 70
    kc, k_hat = random_cache(b, hkv, t, t, d)
    vc, v_hat = random_cache(b, hkv, t, t, d, 1.0)
    q = torch.randn(b, hkv * groups, d).half()
    lengths = [t, 20]
    out = ops.kv4_decode_attention(q.to(DEVICE), kc, vc, torch.tensor(lengths, dtype=torch.int32, device=DEVICE),
                                   t, splits=2).cpu()
    assert out.dtype == torch.float16
    ref = attention_reference(q, k_hat, v_hat, lengths)
    rel = float((out.double() - ref).abs().max() / ref.abs().max())
    # float16 rounding of q, p * s_v and the output (2^-11 relative each): measured 7.0e-4 here, up to 9.4e-4 in
    # the shapes of test_kv4_decode_attention with a float16 q
    assert rel < 4e-3, rel
    # the CUDA-core kernel computes in float32 from the float16 q: only the output's float16 rounding (2^-11 of
    # max |ref| at most); measured 2.4e-4 here (3.0e-4 before the word-wise nibble decode)
    for kernel in ("cc", "ccs"):  # ccs (a running max per token slot): measured 2.4e-4 too
        out_cc = ops.kv4_decode_attention(q.to(DEVICE), kc, vc,
                                          torch.tensor(lengths, dtype=torch.int32, device=DEVICE), t, splits=2,
                                          kernel=kernel).cpu()
        assert out_cc.dtype == torch.float16
        rel_cc = float((out_cc.double() - ref).abs().max() / ref.abs().max())
        assert rel_cc < 6e-4, (kernel, rel_cc)


@triton.jit
def _decode_nibbles(words_ptr, z_ptr, out_ptr, magic_bits, N: tl.constexpr):
    """Each word's 8 nibbles through the CUDA-core decode kernel's ``_nibble`` (as its loop calls it)."""
    i = tl.arange(0, N)
    w = tl.load(words_ptr + i)
    z = tl.load(z_ptr + i).to(tl.float32)
    h = w >> 12
    tl.store(out_ptr + 8 * i, _nibble(w, 0, _zero_magic(z, 0), magic_bits))
    tl.store(out_ptr + 8 * i + 1, _nibble(w, 1, _zero_magic(z, 1), magic_bits))
    tl.store(out_ptr + 8 * i + 2, _nibble(w, 2, _zero_magic(z, 2), magic_bits))
    tl.store(out_ptr + 8 * i + 3, _nibble(w, 3, _zero_magic(z, 3), magic_bits))
    tl.store(out_ptr + 8 * i + 4, _nibble(w, 4, _zero_magic(z, 4), magic_bits))
    tl.store(out_ptr + 8 * i + 5, _nibble(h, 5, _zero_magic(z, 5), magic_bits))
    tl.store(out_ptr + 8 * i + 6, _nibble(h, 6, _zero_magic(z, 6), magic_bits))
    tl.store(out_ptr + 8 * i + 7, _nibble(h, 7, _zero_magic(z, 7), magic_bits))


def test_cc_nibble_decode_exhaustive():
    """The CUDA-core decode kernel's ``_nibble``: every code (0..15) at each of the 8 nibble positions of a word,
    with every zero point, gives ``(code - z) * 2^e`` exactly (the nibble ORed into the mantissa of 2^23; a
    position reaching bit 23, the exponent, would fail here)."""
    code, zero = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    code, zero = code.reshape(-1), zero.reshape(-1)  # 256 (code, z) pairs
    codes = code[:, None].expand(-1, 8)  # the same code in every nibble of a word
    packed = pack_uint4(codes.to(torch.uint8)).contiguous()  # [256, 4] bytes = one word per pair
    words = packed.view(torch.int32).reshape(-1).to(DEVICE)
    out = torch.empty(256 * 8, device=DEVICE)
    _decode_nibbles[(1,)](words.view(torch.uint32), zero.to(torch.uint8).to(DEVICE), out, ops.FLOAT_2_23_BITS,
                          N=256)
    e = torch.tensor([0, 4, 8, 12, 16, 8, 12, 16], dtype=torch.float32)
    expected = (code - zero).float()[:, None] * 2.0 ** e
    assert torch.equal(out.cpu().reshape(256, 8), expected)
