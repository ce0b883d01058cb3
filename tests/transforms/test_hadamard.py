"""Tests for infoquant_export.transforms.hadamard (exact int checks, GF(p^k), fast transform)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from infoquant_export.errors import UserError
from infoquant_export.transforms import hadamard as hm
from infoquant_export.transforms.hadamard import (
    HadamardSizeError,
    apply_hadamard,
    block_hadamard_matrix,
    galois_field,
    hadamard_factors,
    hadamard_int,
    hadamard_matrix,
    random_signs,
    randomized_hadamard_matrix,
)

# size -> (K, p): the smallest constructible K, with the Paley / Williamson construction that builds it.
EXPECTED_FACTORS = {
    64: (1, 64),
    128: (1, 128),
    144: (36, 4),  # Paley II, q = 17
    288: (36, 8),
    576: (36, 16),
    1280: (20, 64),  # Paley I, q = 19
    1536: (12, 128),  # Paley I, q = 11
    2048: (1, 2048),
    2560: (20, 128),
    4096: (1, 4096),
    5120: (20, 256),
    8192: (1, 8192),
    5504: (172, 32),  # Williamson, n = 43 (Qwen1.5-1.8B's intermediate)
    11008: (172, 64),  # Williamson, n = 43 (LLaMA-2-7B's intermediate; Paley only: 344 x 32)
    13824: (108, 128),  # Paley I, q = 107
    14336: (28, 512),  # Paley I over GF(3^3)
    28672: (28, 1024),
}
PALEY_KINDS = {12: ("I", 11), 20: ("I", 19), 28: ("I", 27), 36: ("II", 17), 108: ("I", 107), 344: ("I", 343)}
FULL_CHECK_MAX = 2560  # dense n x n exact product; larger sizes use factor checks + exact row samples


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Many small matmuls: one intra-op thread is faster and immune to CPU oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _exact_gram(h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Exact int64 ``H[rows] @ H.T``: float64 products of +-1 entries are exact integers (|sum| <= n < 2^53)."""
    assert h.dtype == torch.int64
    hf = h.to(torch.float64)
    return (hf[rows] @ hf.T).to(torch.int64)


def _assert_hadamard_int(h: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    n = h.shape[0]
    assert h.shape == (n, n) and h.dtype == torch.int64
    assert bool((h.abs() == 1).all())
    rows = torch.arange(n) if rows is None else rows
    expected = torch.zeros(len(rows), n, dtype=torch.int64)
    expected[torch.arange(len(rows)), rows] = n
    assert torch.equal(_exact_gram(h, rows), expected)


@pytest.mark.parametrize("n", sorted(EXPECTED_FACTORS))
def test_factors(n: int) -> None:
    k, p = hadamard_factors(n)
    assert (k, p) == EXPECTED_FACTORS[n] and k * p == n and p & (p - 1) == 0
    if k in hm.WILLIAMSON_ORDERS:
        assert hm._paley_kind(k) is None
    elif k > 1:
        assert hm._paley_kind(k) == PALEY_KINDS[k]


@pytest.mark.parametrize("k", sorted(PALEY_KINDS))
def test_paley_blocks_exact(k: int) -> None:
    _assert_hadamard_int(torch.tensor(hm._paley_block(k), dtype=torch.int64))


def test_all_paley_orders_up_to_400_exact() -> None:
    orders = [k for k in range(3, 401) if hm._paley_kind(k) is not None]
    assert {12, 20, 28, 36, 52, 100, 108, 244, 340, 344} <= set(orders)  # 52/100/340: Paley II over GF(5^2/7^2/13^2)
    for k in orders:
        _assert_hadamard_int(torch.tensor(hm._paley_block(k), dtype=torch.int64))


def test_williamson_172_exact() -> None:
    """H_172 = [[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]] with A..D symmetric circulant +-1
    blocks of order 43, constant on the orbits of <-1, 6> mod 43 (8 orbits); exactly H H^T = 172 I."""
    h = torch.tensor(hm.hadamard_block(172), dtype=torch.int64)
    _assert_hadamard_int(h)
    blocks = [h[:43, 43 * i : 43 * (i + 1)] for i in range(4)]
    orbits = hm._multiplier_orbits(43, 6)
    assert len(orbits) == 8 and sorted(orbits[1]) == [1, 6, 7, 36, 37, 42]
    for i, block in enumerate(blocks):
        row = block[0]
        assert torch.equal(block, torch.stack([row.roll(j) for j in range(43)]))  # circulant
        assert torch.equal(block, block.T)  # symmetric
        assert all(len(set(row[o].tolist())) == 1 for o in orbits), i  # constant on the multiplier orbits
    a, b, c, d = blocks
    assert torch.equal(h[43:86], torch.cat([-b, a, -d, c], 1)) and torch.equal(h[129:], torch.cat([-d, -c, b, a], 1))


# (hidden, intermediate, head_dim) of LLaMA-family checkpoints users quantize (their config.json values)
MODEL_SIZES = {
    "SmolLM2-135M": (576, 1536, 64), "SmolLM2-360M": (960, 2560, 64), "SmolLM2-1.7B": (2048, 8192, 64),
    "TinyLlama-1.1B": (2048, 5632, 64), "Qwen1.5-1.8B": (2048, 5504, 128), "Qwen2.5-0.5B": (896, 4864, 64),
    "Qwen2.5-1.5B": (1536, 8960, 128), "Qwen2.5-3B": (2048, 11008, 128), "Qwen2.5-7B": (3584, 18944, 128),
    "Qwen2.5-14B": (5120, 13824, 128), "LLaMA-2-7B": (4096, 11008, 128), "LLaMA-2-13B": (5120, 13824, 128),
    "LLaMA-2-70B": (8192, 28672, 128), "LLaMA-3-8B": (4096, 14336, 128), "LLaMA-3.2-3B": (3072, 8192, 128),
    "Mistral-7B": (4096, 14336, 128), "Gemma-2-2B": (2304, 9216, 256),
    "Qwen2-72B": (8192, 29568, 128),  # 29568 = 231 x 2^7 (QuaRot #41: "no known Hadamard of order 231"): 924 x 32
}


@pytest.mark.parametrize("model", sorted(MODEL_SIZES))
def test_common_model_sizes_have_a_construction(model: str) -> None:
    """Every rotation size of these models (residual, down_proj input, per head) has a Hadamard with p >= 16 (the
    kernels' tile); 11008 and 5504 need the Williamson 172 (Paley only: 344 x 32 and 344 x 16)."""
    for n in MODEL_SIZES[model]:
        k, p = hadamard_factors(n)
        assert k * p == n and p >= 16, (model, n, k, p)
    intermediate = MODEL_SIZES[model][1]
    assert (hadamard_factors(intermediate)[0] == 172) == (intermediate in (11008, 5504))
    if intermediate == 29568:
        assert hadamard_factors(intermediate) == (924, 32) and hm._paley_kind(924) == ("II", 461)


def test_paley_only_rule_of_older_schemas() -> None:
    assert hadamard_factors(11008, williamson=False) == (344, 32)
    assert hadamard_factors(1536, williamson=False) == hadamard_factors(1536) == (12, 128)
    with pytest.raises(HadamardSizeError):
        hadamard_factors(172, williamson=False)


@pytest.mark.parametrize("p", [2**i for i in range(12)])
def test_sylvester_exact(p: int) -> None:
    _assert_hadamard_int(hadamard_int(p))


@pytest.mark.parametrize("n", sorted(EXPECTED_FACTORS))
def test_hadamard_int_exact(n: int) -> None:
    if n <= FULL_CHECK_MAX:
        _assert_hadamard_int(hadamard_int(n))
    elif n <= 11008:  # dense int64 is affordable: exact check on random rows against all of H
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(n))[:16]
        _assert_hadamard_int(hadamard_int(n), rows)
    # every size (including 13824 / 14336 / 28672, whose dense int64 matrix is 1.5-6.6 GB) is kron(H_K, H_p)
    # of two exactly checked factors, and kron of Hadamard matrices is Hadamard.
    k, p = hadamard_factors(n)
    small = k * min(p, 4)
    expected = torch.kron(torch.tensor(hm.hadamard_block(k), dtype=torch.int64), hadamard_int(min(p, 4)))
    assert torch.equal(hadamard_int(small), expected)


def test_sweep_factorizations_up_to_30000() -> None:
    supported = 0
    for n in range(1, 30001):
        try:
            k, p = hadamard_factors(n)
        except HadamardSizeError:
            assert n & (n - 1) and not any(hm._constructible(j) for j in _odd_times_pow2(n))
            continue
        supported += 1
        assert k * p == n and p & (p - 1) == 0 and (k == 1 or hm._constructible(k))
        assert not any(hm._constructible(j) for j in _odd_times_pow2(n) if 1 < j < k)  # smallest K
    assert supported == 4137  # measured (4136 with Paley orders only: 172 itself is new, 172 * 2^m had 344)


def _odd_times_pow2(n: int) -> list[int]:
    odd = n
    while odd % 2 == 0:
        odd //= 2
    return [odd * 2**i for i in range(n.bit_length()) if n % (odd * 2**i) == 0]


@pytest.mark.parametrize("q", [25, 27, 49, 343])
def test_galois_field_axioms(q: int) -> None:
    field = galois_field(q)
    assert field.order == q and field.p**field.k == q
    elems = np.arange(q)
    nonzero = elems[1:]
    table = field.mul(nonzero[:, None], nonzero[None, :])
    assert (table != 0).all()  # no zero divisors
    assert all(len(np.unique(row)) == q - 1 for row in table)  # Latin rows: every element has an inverse
    assert ((table == 1).sum(axis=1) == 1).all()
    assert np.array_equal(field.mul(nonzero, 1), nonzero)  # code 1 is the identity
    order = _multiplicative_orders(field)
    assert ((q - 1) % order == 0).all() and order.max() == q - 1  # cyclic group of order q - 1
    rng = np.random.default_rng(q)
    a, b, c = rng.integers(0, q, size=(3, 200))
    assert np.array_equal(field.mul(a, field.add(b, c)), field.add(field.mul(a, b), field.mul(a, c)))
    assert np.array_equal(field.mul(field.mul(a, b), c), field.mul(a, field.mul(b, c)))
    assert np.array_equal(field.add(field.sub(a, b), b), a)
    chi = field.quadratic_character()
    assert (chi == 1).sum() == (q - 1) // 2 and (chi == -1).sum() == (q - 1) // 2 and chi[0] == 0


def test_gf343_group_order() -> None:
    field = galois_field(343)
    assert (field.p, field.k) == (7, 3)
    assert _multiplicative_orders(field).max() == 342
    f = field.modulus  # degree 3 with no root in GF(7) <=> irreducible
    assert len(f) == 4 and f[-1] == 1
    assert all(sum(c * x**i for i, c in enumerate(f)) % 7 for x in range(7))


def _multiplicative_orders(field: hm.GaloisField) -> np.ndarray:
    nonzero = np.arange(1, field.order)
    order = np.zeros_like(nonzero)
    power = nonzero.copy()
    for i in range(1, field.order):
        order[(power == 1) & (order == 0)] = i
        power = field.mul(power, nonzero)
    assert (order > 0).all()
    return order


@pytest.mark.parametrize("n", [64, 576, 1536])
def test_hadamard_matrix_is_scaled_int(n: int) -> None:
    for dtype in (torch.float32, torch.float64):
        assert torch.equal(hadamard_matrix(n, dtype), hadamard_int(n).to(dtype) / math.sqrt(n))
    h = hadamard_matrix(n)
    assert (h @ h.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-12  # measured <= 2.3e-14 (n=1536)


# (n, num_blocks, float64 bound) with the measured max |apply - dense| beside each bound.
APPLY_CASES = [
    (64, 1, 1e-12),  # measured 1.4e-15
    (576, 1, 1e-12),  # measured 6.7e-15
    (1536, 1, 1e-12),  # measured 1.1e-14
    (11008, 1, 1e-12),  # measured 4.0e-14
    (576, 2, 1e-12),  # measured 4.9e-15
    (576, 4, 1e-12),  # measured 3.6e-15
    (5120, 4, 1e-12),  # measured 9.8e-15
]
# float32 apply vs the float64 product of the same float32 input, x ~ N(0, 1): measured max 2.0e-6 (n=11008),
# 2.3e-7 .. 8.0e-7 for the others (a dense float32 matmul is worse: up to 1.4e-5 at n=11008).
F32_TOL = 1e-5


@pytest.mark.parametrize(("n", "num_blocks", "bound"), APPLY_CASES)
def test_apply_matches_dense(n: int, num_blocks: int, bound: float) -> None:
    x = torch.randn(3, 2, n, generator=torch.Generator().manual_seed(n + num_blocks), dtype=torch.float64)
    h = block_hadamard_matrix(n, num_blocks)
    ref = x @ h
    assert (apply_hadamard(x, num_blocks) - ref).abs().max().item() < bound
    y32 = apply_hadamard(x.to(torch.float32), num_blocks)
    assert y32.dtype == torch.float32
    ref32 = x.to(torch.float32).to(torch.float64) @ h
    assert (y32.to(torch.float64) - ref32).abs().max().item() < F32_TOL


@pytest.mark.parametrize(("n", "num_blocks"), [(576, 1), (1536, 1), (576, 4), (5120, 4)])
def test_round_trip_transpose(n: int, num_blocks: int) -> None:
    x = torch.randn(4, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = block_hadamard_matrix(n, num_blocks)
    assert (x @ h @ h.T - x).abs().max() < 1e-12  # measured <= 1.1e-14
    assert (apply_hadamard(x, num_blocks) @ h.T - x).abs().max() < 1e-12  # measured <= 9.8e-15


@pytest.mark.parametrize(("n", "num_blocks"), [(576, 1), (1536, 2), (1280, 4)])
def test_randomized_orthogonal(n: int, num_blocks: int) -> None:
    r = randomized_hadamard_matrix(n, seed=7, num_blocks=num_blocks)
    assert (r @ r.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-12  # measured <= 1.3e-14
    signs = random_signs(n, 7)
    assert torch.equal(signs, random_signs(n, 7)) and torch.equal(signs.abs(), torch.ones(n, dtype=torch.float64))
    assert torch.equal(r, signs[:, None] * block_hadamard_matrix(n, num_blocks))  # == diag(signs) @ B


@pytest.mark.parametrize("n", [6, 14, 22, 3 * 7])
def test_unsupported_size(n: int) -> None:
    with pytest.raises(HadamardSizeError, match=rf"\bsize {n}\b") as info:
        hadamard_factors(n)
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)
    with pytest.raises(HadamardSizeError, match=rf"\bsize {n}\b"):
        hadamard_matrix(n)
    with pytest.raises(HadamardSizeError, match=rf"\bsize {n}\b"):
        apply_hadamard(torch.zeros(2, n))


def test_bad_block_split() -> None:
    with pytest.raises(HadamardSizeError, match=r"\bsize 576\b"):
        block_hadamard_matrix(576, 5)
    with pytest.raises(HadamardSizeError, match=r"\bsize 100\b"):
        apply_hadamard(torch.zeros(2, 100), 3)
    with pytest.raises(HadamardSizeError, match=r"\bsize 576\b"):
        randomized_hadamard_matrix(576, seed=0, num_blocks=7)


def test_bench_hadamard_tool_smoke():
    """``tools/bench_hadamard.py`` times both constructions of a size; each is orthogonal (row norms kept)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[2] / "tools" / "bench_hadamard.py"
    proc = subprocess.run([sys.executable, str(tool), "--n", "1376", "--rows", "4", "--repeat", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout)["constructions"]
    assert (rows["this build"]["K"], rows["paley only"]["K"]) == (172, 344)  # 1376 = 172 x 8 = 344 x 4
    assert all(r["max_rel_row_norm_error"] < 1e-6 for r in rows.values())  # measured 1.5e-8, 1.6e-8
