"""The word-parallel nibble unpacking of the compiled GEMMs (``common.UNPACK_*_PTX``, inline PTX that Triton's
interpreter cannot run): the exact PTX strings the kernels use, executed by a small emulator of their four
instructions on uint32 words, against the primitives' unpacking. Exhaustive over every pair of adjacent byte lanes
(the only cross-lane paths are the shifts), plus random words; the compiled kernels' bits are checked on a GPU
(tests/gpu) and the instruction counts in tests/kernels/test_aot.py."""

from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
from infoquant_kernels import common  # noqa: E402

from infoquant_export.quant.primitives import unpack_int4  # noqa: E402


def run_ptx(asm: str, word: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """($0, $1) of ``asm`` with $2 = ``word`` (uint32); and / or / shr.u32 / mul.lo.u32 only, else it fails."""
    regs: dict[str, np.ndarray] = {"$2": word.astype(np.uint32)}

    def val(tok: str) -> np.ndarray:
        tok = tok.strip()
        return np.uint32(int(tok, 0)) if re.fullmatch(r"(0x[0-9A-Fa-f]+|\d+)", tok) else regs[tok]

    body = asm.strip().strip("{}")
    for stmt in (s.strip() for s in body.split(";") if s.strip()):
        if stmt.startswith(".reg"):
            continue
        op, args = stmt.split(None, 1)
        dst, a, b = (val(x) if i else x.strip() for i, x in enumerate(args.split(",")))
        ops = {"and.b32": np.bitwise_and, "or.b32": np.bitwise_or, "shr.u32": np.right_shift,
               "mul.lo.u32": np.multiply}
        with np.errstate(over="ignore"):
            regs[dst] = np.asarray(ops[op](a, b)).astype(np.uint32)  # uint32 products wrap: mul.lo
    return regs["$0"], regs["$1"]


def lanes(word: np.ndarray, signed: bool) -> np.ndarray:
    """uint32 words -> their 4 bytes (little-endian lanes) as int8 (signed) or uint8 values, [n, 4]."""
    b = word.astype("<u4").view(np.uint8).reshape(-1, 4)
    return b.view(np.int8) if signed else b


def words_under_test() -> np.ndarray:
    rng = np.random.default_rng(0)
    pairs = np.arange(1 << 16, dtype=np.uint32)
    out = [rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint32)]
    for shift in (0, 8, 16):  # lanes (0, 1), (1, 2), (2, 3) exhaustively, the others random
        other = rng.integers(0, 1 << 32, pairs.size, dtype=np.uint32) & ~np.uint32(0xFFFF << shift)
        out.append((pairs << np.uint32(shift)) | other)
    return np.concatenate(out)


@pytest.mark.parametrize("signed", [False, True])
def test_word_unpack_matches_primitives(signed):
    words = words_under_test()
    asm = (common.UNPACK_SIGNED_PTX if signed else common.UNPACK_UNSIGNED_PTX).value
    lo, hi = run_ptx(asm, words)
    packed = torch.from_numpy(lanes(words, False).copy())  # [n, 4] bytes: elements 2i (low) and 2i+1 (high)
    if signed:
        ref = unpack_int4(packed).numpy()  # two's-complement nibbles, [n, 8] int8
    else:
        ref = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(-1, 8).numpy()
    assert np.array_equal(lanes(lo, signed), ref[:, 0::2]), "low nibbles"
    assert np.array_equal(lanes(hi, signed), ref[:, 1::2]), "high nibbles"
    assert words.size == (1 << 20) + 3 * (1 << 16)
