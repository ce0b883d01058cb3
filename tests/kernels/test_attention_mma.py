"""The Gluon mma.sync decode attention (``plugins/infoquant_kernels/attention_mma.py``) on the CPU.

Gluon has no interpreter, so its compiled outputs are checked on a GPU (``tests/gpu/test_variants_gpu.py``). Here:
its dequantizing inline PTX runs, as written, in a model of the six instructions it uses (every code and zero
point); the head-dimension orders of its MMA operands are checked against the reshapes that build them and against
the mma.sync fragments' ownership; the kernel's own source runs on numpy (``gluon_numpy``) against float64
attention; bad input gets a one-line error. ``test_aot.py`` compiles it (operands in registers, no shared memory in
the loop, the asm's operands); ``test_aot_specs.py`` checks its specs against the wrapper's launch.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from infoquant_kernels import attention_mma as am  # noqa: E402

from infoquant_export.kernels import kernel_module, ops  # noqa: E402
from infoquant_export.kernels.checks import triton_cdiv  # noqa: E402
from tests.kernels.conftest import DEVICE, INTERPRETER_WARNING  # noqa: E402
from tests.kernels.gluon_numpy import Pointer, f16x2, gl_numpy, mma_numpy, on_numpy, run_ptx, to_f16x2  # noqa: E402
from tests.kernels.test_kv import attention_reference, random_cache  # noqa: E402

PI = [0, 4, 1, 5, 2, 6, 3, 7]  # the word's nibble that element j of an unpacking asm holds


def _pair(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return to_f16x2(np.asarray(lo, np.float64), np.asarray(hi, np.float64))


def _magic(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's ``_magic``: ``z | 0x6400`` as float16 (1024 + z) and 960 - that (-(64 + z)), as float64."""
    zz = (z.astype(np.uint16) | 0x6400).view(np.float16)
    return zz.astype(np.float64), (np.float16(960.0) - zz).astype(np.float64)


def _constraints(s: str) -> tuple[int, int]:
    kinds = s.split(",")
    return kinds.count("=r"), kinds.count("r")


def test_k_unpack_asm_gives_code_minus_zero():
    """The K asm (pack of 8: one word, its token's 1024 + z and -(64 + z) pairs): output element j is the word's
    nibble PI[j] minus z, exactly, for 2^16 random words (every nibble value at every position) and every z."""
    assert _constraints(am._K_CONSTRAINTS.value) == (4, 16)
    rng = np.random.default_rng(0)
    words = np.repeat(rng.integers(0, 2**32, 2**16, dtype=np.uint64).astype(np.uint32), 16)
    z = np.tile(np.arange(16), 2**16)
    zz, nz16 = _magic(z)
    ops_in = {4 + i: words for i in range(8)}
    ops_in.update({12 + i: _pair(zz, zz) for i in range(4)})
    ops_in.update({16 + i: _pair(nz16, nz16) for i in range(4)})
    out = run_ptx(am._K_ASM.value, ops_in, 4)
    for j in range(8):
        got = f16x2(out[j // 2])[j % 2]
        want = ((words >> np.uint32(4 * PI[j])) & 15).astype(np.float64) - z
        assert np.array_equal(got, want), j


def test_v_unpack_asm_gives_two_tokens_codes_minus_zero():
    """The V asm (pack of 16: two tokens A, B): output register j is (A's nibble PI[j] - zA, B's - zB), exactly."""
    assert _constraints(am._V_CONSTRAINTS.value) == (8, 32)
    rng = np.random.default_rng(1)
    n = 2**16
    wa = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    wb = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    za, zb = rng.integers(0, 16, n), rng.integers(0, 16, n)
    (zza, nza), (zzb, nzb) = _magic(za), _magic(zb)
    ops_in = {8 + i: (wa if i % 2 == 0 else wb) for i in range(16)}
    ops_in.update({24 + i: _pair(zza, zzb) for i in range(8)})
    ops_in.update({32 + i: _pair(nza, nzb) for i in range(8)})
    out = run_ptx(am._V_ASM.value, ops_in, 8)
    for j in range(8):
        lo, hi = f16x2(out[j])
        assert np.array_equal(lo, ((wa >> np.uint32(4 * PI[j])) & 15).astype(np.float64) - za), j
        assert np.array_equal(hi, ((wb >> np.uint32(4 * PI[j])) & 15).astype(np.float64) - zb), j


def test_asm_uses_only_modelled_instructions():
    for asm in (am._K_ASM.value, am._V_ASM.value):
        ops_used = {line.split()[0] for line in asm.strip().strip("{}").split(";") if line.strip()
                    and not line.strip().startswith(".reg")}
        assert ops_used <= {"mov.b32", "lop3.b32", "shr.u32", "prmt.b32", "sub.rn.f16x2", "fma.rn.f16x2"}
        assert all(int(lut, 16) == 0xEA for lut in re.findall(r"lop3\.b32 [^;]*, (0x[0-9A-F]+);", asm))


@pytest.mark.parametrize("d", [64, 128, 256])
def test_mma_index_orders(d):
    """``k_dim`` / ``v_dim`` (the head dimension at each MMA index, used for q and the output) are what the kernel's
    reshape + permute of the unpacked words put there, and each thread's MMA fragment (mma.sync m16n8k16, PTX ISA:
    lane 4g + t holds B rows k = 2t, 2t + 1, 2t + 8, 2t + 9 and A rows m = g, g + 8 of every 16) is exactly the
    head dimensions of the words that thread loads."""
    unpacked = 8 * np.arange(d // 8)[:, None] + np.array(PI)[None, :]      # [word, element]: its head dimension
    k_order = unpacked.reshape(1, 1, 4, d // 32, 2, 2, 2).transpose(am.K_ORDER.value).reshape(d)
    v_order = unpacked.reshape(1, 1, 8, d // 64, 2, 2, 2).transpose(am.V_ORDER.value).reshape(d)
    idx = np.arange(d)
    assert np.array_equal(am.k_dim.fn(idx, d), k_order)
    assert np.array_equal(am.v_dim.fn(idx, d), v_order)
    assert sorted(k_order) == sorted(v_order) == list(range(d))
    for t in range(4):  # scores: thread t loads words d/32 * t + [0, d/32) of its tokens
        ks = [16 * kc + r for kc in range(d // 16) for r in (2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9)]
        assert sorted(k_order[ks]) == sorted(unpacked[d // 32 * t:d // 32 * (t + 1)].ravel())
    for g in range(8):  # values: thread g loads words d/64 * g + [0, d/64) of its tokens
        ms = [16 * mt + r for mt in range(d // 16) for r in (g, g + 8)]
        assert sorted(v_order[ms]) == sorted(unpacked[d // 64 * g:d // 64 * (g + 1)].ravel())


def test_mma_decode_bad_input():
    """kernel='mma' refuses what it does not cover with one line that names the fix, before any launch."""
    b, hkv, d, cap = 1, 2, 64, 32
    k = ops.KVCache4.empty(b, hkv, cap, d, DEVICE)
    v = ops.KVCache4.empty(b, hkv, cap, d, DEVICE)
    lengths = torch.full((b,), 8, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ops.KernelInputError, match="kernel='mma' takes a float16 q.*use kernel='tc'"):
        ops.kv4_decode_attention(torch.randn(b, 4, d, device=DEVICE), k, v, lengths, 8, kernel="mma")
    with pytest.raises(ops.KernelInputError, match="GQA groups of up to 8 query heads.*group 9"):
        ops.kv4_decode_attention(torch.randn(b, 18, d, device=DEVICE).half(), k, v, lengths, 8, kernel="mma")
    with pytest.raises(ops.KernelInputError, match="head_dim 32"):
        k32, v32 = ops.KVCache4.empty(b, hkv, cap, 32, DEVICE), ops.KVCache4.empty(b, hkv, cap, 32, DEVICE)
        ops.kv4_decode_attention(torch.randn(b, 4, 32, device=DEVICE).half(), k32, v32, lengths, 8, kernel="mma")
    if DEVICE == "cpu":
        with pytest.raises(ops.KernelInputError, match="compiled GPU code.*use kernel='tc'"):
            ops.kv4_decode_attention(torch.randn(b, 4, d).half(), k, v, lengths, 8, kernel="mma")
    with pytest.raises(ops.KernelInputError, match="kernel='nope' is not one of"):
        ops.kv4_decode_attention(torch.randn(b, 4, d, device=DEVICE).half(), k, v, lengths, 8, kernel="nope")


def attention_asm(text: str, args: list[np.ndarray], pack: int) -> np.ndarray:
    """``inline_asm_elementwise`` of ``attention_mma`` on numpy, grouped as the kernel's layouts group a pack (the
    compiled LLVM IR shows it, ``test_aot.py``): K (pack 8) one call per word [NW, BTW, W] for its 8 elements; V
    (pack 16) one call per word of the token pair 2i, 2i + 1 (axis 1: A, B)."""
    words = args[0][..., 0].astype(np.int64).astype(np.uint32)
    zz, nz16 = args[1][..., 0], args[2][..., 0]
    out = np.empty(words.shape + (8,), np.float16)
    if pack == 8:
        regs = run_ptx(text, {**{4 + i: words for i in range(8)}, **{12 + i: _pair(zz, zz) for i in range(4)},
                              **{16 + i: _pair(nz16, nz16) for i in range(4)}}, 4)
        for j in range(8):
            out[..., j] = f16x2(regs[j // 2])[j % 2]
        return out
    assert pack == 16
    regs = run_ptx(text, {**{8 + i: words[:, i % 2::2] for i in range(16)},
                          **{24 + i: _pair(zz[:, 0::2], zz[:, 1::2]) for i in range(8)},
                          **{32 + i: _pair(nz16[:, 0::2], nz16[:, 1::2]) for i in range(8)}}, 8)
    for j in range(8):
        out[:, 0::2, :, j], out[:, 1::2, :, j] = f16x2(regs[j])
    return out


def mma_decode_on_numpy(q: torch.Tensor, k: ops.KVCache4, v: ops.KVCache4, lengths: list[int], max_len: int,
                        splits: int, block_t: int, warps: int, prefetch: bool) -> torch.Tensor:
    """``kv4_decode_attention(..., kernel="mma")`` with the partial kernel's own source run on numpy (every program
    of the grid in turn) and the combine kernel in Triton's interpreter."""
    b, hq, d = q.shape
    hkv = k.codes.shape[1]
    step = block_t * warps
    chunk = triton_cdiv(triton_cdiv(max_len, splits), step) * step
    part_o = np.full(b * hq * splits * d, np.nan, np.float32)
    part_m = np.full(b * hq * splits, np.nan, np.float32)
    part_l = np.full(b * hq * splits, np.nan, np.float32)
    pid = [0, 0]
    kernel = on_numpy(am, "kv4_decode_partial_mma_kernel", gl_numpy(warps, pid, attention_asm), mma_v2=mma_numpy)

    def ptr(x: torch.Tensor) -> Pointer:
        return Pointer(x.detach().cpu().contiguous().reshape(-1).numpy())

    args = (ptr(q), q.stride(0), q.stride(1), ptr(k.codes), ptr(k.scale), ptr(k.zero), ptr(v.codes), ptr(v.scale),
            ptr(v.zero), k.codes.stride(0), k.codes.stride(1), k.codes.stride(2), k.scale.stride(0),
            k.scale.stride(1), ptr(torch.tensor(lengths, dtype=torch.int32)), Pointer(part_o), Pointer(part_m),
            Pointer(part_l), hkv, chunk, max_len, float(d ** -0.5 * np.log2(np.e)))
    with np.errstate(invalid="raise"):  # a NaN from inf - inf would be a bug
        for pid[0] in range(b * hkv):
            for pid[1] in range(splits):
                kernel(*args, G=hq // hkv, D=d, BTW=block_t, SPLITS=splits, PREFETCH=prefetch, MMA=None, KW4=None,
                       VW4=None)
    parts = [torch.from_numpy(x) for x in (part_o, part_m, part_l)]
    written = [x[:b * hq * splits].view(b, hq, splits, -1) for x in parts]
    assert not any(bool(torch.isnan(x).any()) for x in written)  # every program wrote its rows
    out = torch.empty(b, hq, d, dtype=torch.float16)
    kernel_module("attention").kv4_decode_combine_kernel[(b * hq,)](*parts, out, SPLITS=splits, SP=splits, D=d,
                                                                    num_warps=4)
    return out


@pytest.mark.filterwarnings(INTERPRETER_WARNING)
@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("splits,block_t,warps", [(1, 16, 2), (4, 16, 4), (2, 32, 1)])
@pytest.mark.parametrize("groups,head_dim", [(1, 128), (3, 64), (8, 64)])
def test_mma_decode_source_on_numpy(groups, head_dim, splits, block_t, warps, prefetch):
    """The kernel's own source (its Python body: indexing, permuted head-dimension orders, masked / clamped last
    steps, per-warp softmax, warp merge, split partials) on numpy, with its asm in the PTX model, against float64
    attention over the dequantized caches. Rows of 150, 37 and 1 tokens (cache 160): whole and partial steps,
    empty splits and warps, several steps per split."""
    b, hkv, t, cap = 3, 2, 150, 160
    lengths = [t, 37, 1]
    kc, k_hat = random_cache(b, hkv, t, cap, head_dim)
    vc, v_hat = random_cache(b, hkv, t, cap, head_dim, 1.0)
    q = (torch.randn(b, hkv * groups, head_dim) * 2).half()
    out = mma_decode_on_numpy(q, kc, vc, lengths, t, splits, block_t, warps, prefetch)
    ref = attention_reference(q, k_hat, v_hat, lengths)
    rel = float((out.double() - ref).abs().max() / ref.abs().max())
    # float16 rounding of q * scale, p * s_v and the output (2^-11 relative each), as the tensor-core kernel with a
    # float16 q (< 4e-3 in test_kv); measured 4.5e-4 - 6.3e-4 here (seed 0)
    assert rel < 4e-3, rel
    # the length-1 row attends to its only token: p = 1, so the output is that V row up to float16 roundings
    one = v_hat[2, :, 0].repeat_interleave(groups, 0).double()
    assert float((out[2].double() - one).abs().max() / one.abs().max()) < 2e-3


@pytest.mark.filterwarnings(INTERPRETER_WARNING)
@pytest.mark.parametrize("block_t,warps,stages", [(*ops.DECODE_MMA_TILE, 1), (16, 4, 2)])
def test_mma_decode_source_on_numpy_at_llama_shape(block_t, warps, stages):
    """The benchmark's shape: LLaMA-2-7B heads (32 x 128, MHA), a 4096-token cache holding 4091 tokens, split as on an
    H200 (132 SMs: 32 splits of 128 tokens), the default tile and the 2-stage 16 x 4 one. Every load stays in the
    cache (the model raises on any access outside a buffer). Measured 8.2e-4 relative to float64 for both."""
    ctx = 4096
    kc, k_hat = random_cache(1, 32, ctx, ctx, 128)
    vc, v_hat = random_cache(1, 32, ctx, ctx, 128, 1.0)
    q = (torch.randn(1, 32, 128) * 2).half()
    splits = ops.decode_splits(32, ctx, block_t * warps, 4 * 132)
    out = mma_decode_on_numpy(q, kc, vc, [ctx - 5], ctx, splits, block_t, warps, stages == 2)
    ref = attention_reference(q, k_hat, v_hat, [ctx - 5])
    assert float((out.double() - ref).abs().max() / ref.abs().max()) < 4e-3
