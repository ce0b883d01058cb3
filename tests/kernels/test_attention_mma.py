"""The Gluon mma.sync decode attention (``plugins/infoquant_kernels/attention_mma.py``) on the CPU.

Gluon has no interpreter, so its outputs are checked on a GPU (``tests/gpu/test_variants_gpu.py``). Here: its
dequantizing inline PTX runs, as written, in a model of the six instructions it uses (every code and zero point),
the head-dimension orders of its MMA operands are checked against the reshapes that build them and against the
mma.sync fragments' ownership, and bad input gets a one-line error. ``test_aot.py`` compiles it (operands in
registers, no shared memory in the loop); ``test_aot_specs.py`` checks its specs against the wrapper's launch.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from infoquant_kernels import attention_mma as am  # noqa: E402

from infoquant_export.kernels import ops  # noqa: E402
from tests.kernels.conftest import DEVICE  # noqa: E402

PI = [0, 4, 1, 5, 2, 6, 3, 7]  # the word's nibble that element j of an unpacking asm holds


def _lop3(a: np.ndarray, b: np.ndarray, c: np.ndarray, lut: int) -> np.ndarray:
    out = np.zeros_like(a)
    for i in range(8):  # minterm i = (a bit, b bit, c bit) = (i >> 2, i >> 1, i) & 1
        if lut >> i & 1:
            out |= (a if i & 4 else ~a) & (b if i & 2 else ~b) & (c if i & 1 else ~c)
    return out


def _prmt(a: np.ndarray, b: np.ndarray, sel: int) -> np.ndarray:
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = np.zeros_like(a)
    for i in range(4):
        nib = sel >> (4 * i) & 0xF
        assert nib < 8, "sign-replicating selectors are not modelled"
        out |= src[nib] << np.uint32(8 * i)
    return out


def _f16x2(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two float16 halves (low, high) of 32-bit registers, as float64."""
    return ((x & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float64),
            (x >> 16).astype(np.uint16).view(np.float16).astype(np.float64))


def _to_f16x2(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Round each half once to float16 (the operands here are integers < 2^11 and 2^-4: the float64 results are
    exact, so this is the instruction's single rounding)."""
    return (lo.astype(np.float16).view(np.uint16).astype(np.uint32)
            | hi.astype(np.float16).view(np.uint16).astype(np.uint32) << np.uint32(16))


def run_ptx(asm: str, operands: dict[int, np.ndarray], outputs: int) -> list[np.ndarray]:
    """Run the asm block on numpy uint32 arrays: ``$N`` operands, local ``.reg`` registers, immediates."""
    regs: dict[str, np.ndarray] = {f"${n}": v.astype(np.uint32) for n, v in operands.items()}
    shape = next(iter(operands.values())).shape

    def val(tok: str) -> np.ndarray:
        tok = tok.strip()
        return regs[tok] if tok in regs else np.full(shape, int(tok, 0), dtype=np.uint32)

    for line in asm.strip().strip("{}").split(";"):
        line = line.strip()
        if not line or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        dst, *src = [a.strip() for a in args.split(",")]
        if op == "mov.b32":
            res = val(src[0])
        elif op == "lop3.b32":
            res = _lop3(val(src[0]), val(src[1]), val(src[2]), int(src[3], 0))
        elif op == "shr.u32":
            res = val(src[0]) >> np.uint32(int(src[1], 0))
        elif op == "prmt.b32":
            res = _prmt(val(src[0]), val(src[1]), int(src[2], 0))
        elif op == "sub.rn.f16x2":
            (a0, a1), (b0, b1) = _f16x2(val(src[0])), _f16x2(val(src[1]))
            res = _to_f16x2(a0 - b0, a1 - b1)
        elif op == "fma.rn.f16x2":
            (a0, a1), (b0, b1), (c0, c1) = _f16x2(val(src[0])), _f16x2(val(src[1])), _f16x2(val(src[2]))
            res = _to_f16x2(a0 * b0 + c0, a1 * b1 + c1)
        else:
            raise AssertionError(f"instruction {op!r} is not modelled")
        regs[dst] = res
    return [regs[f"${n}"] for n in range(outputs)]


def _pair(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return _to_f16x2(lo.astype(np.float64), hi.astype(np.float64))


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
        got = _f16x2(out[j // 2])[j % 2]
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
        lo, hi = _f16x2(out[j])
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
