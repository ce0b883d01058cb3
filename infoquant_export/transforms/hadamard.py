"""Hadamard matrices of order K * 2^m (Sylvester x Paley / Williamson) and the fast transform ``x @ H``.

Construction: ``H_n = kron(H_K, H_p)`` with ``p`` a power of two (Sylvester, natural order) and ``K`` the smallest
constructible order: 1, a Paley order -- ``K = q + 1`` (Paley I, q a prime power, q = 3 mod 4) or ``K = 2 (q + 1)``
(Paley II, q a prime power, q = 1 mod 4), both from the quadratic character of GF(q), prime powers q = p^k with
real GF(p^k) arithmetic (polynomials over GF(p) modulo an irreducible polynomial found by search) -- or a Williamson
order of ``WILLIAMSON_ORDERS`` (172, for LLaMA-2-7B's 11008 = 172 x 64: the order QuaRot and the InfoQuant
reference use, half of the smallest Paley order 344).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np
import torch

from infoquant_export.errors import UserError

__all__ = [
    "GaloisField",
    "HadamardSizeError",
    "WILLIAMSON_ORDERS",
    "apply_hadamard",
    "block_hadamard_matrix",
    "galois_field",
    "hadamard_block",
    "hadamard_factors",
    "hadamard_int",
    "hadamard_matrix",
    "randomized_hadamard_matrix",
    "random_signs",
]


class HadamardSizeError(UserError):
    """No Hadamard construction exists (in this module) for the requested size or block split."""


# ----------------------------------------------------------------------------------------------
# Number theory and polynomials over GF(p)
# ----------------------------------------------------------------------------------------------


def _prime_power(q: int) -> tuple[int, int] | None:
    """Return ``(p, k)`` with ``q == p**k`` and p prime, or None if q is not a prime power."""
    if q < 2:
        return None
    d = 2
    while d * d <= q:
        if q % d == 0:
            k = 0
            while q % d == 0:
                q //= d
                k += 1
            return (d, k) if q == 1 else None
        d += 1
    return q, 1


def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """Remainder of ``a`` modulo monic ``f`` over GF(p); coefficients low -> high."""
    a = [c % p for c in a]
    deg_f = len(f) - 1
    for top in range(len(a) - 1, deg_f - 1, -1):
        c = a[top]
        if c:
            shift = top - deg_f
            for i, fc in enumerate(f):
                a[shift + i] = (a[shift + i] - c * fc) % p
    return a[:deg_f] if len(a) >= deg_f else a + [0] * (deg_f - len(a))


def _monic_polys(p: int, deg: int) -> list[list[int]]:
    """All monic polynomials of degree ``deg`` over GF(p), in lexicographic order of codes."""
    out = []
    for code in range(p**deg):
        coeffs = [(code // p**i) % p for i in range(deg)]
        out.append(coeffs + [1])
    return out


def _is_irreducible(f: list[int], p: int) -> bool:
    """Trial division by every monic polynomial of degree 1 .. deg(f) // 2."""
    deg = len(f) - 1
    for d in range(1, deg // 2 + 1):
        for g in _monic_polys(p, d):
            if not any(_poly_mod(f, g, p)):
                return False
    return True


@cache
def _irreducible_poly(p: int, k: int) -> tuple[int, ...]:
    """First monic irreducible polynomial of degree k over GF(p) (coefficients low -> high)."""
    for f in _monic_polys(p, k):
        if f[0] != 0 and _is_irreducible(f, p):
            return tuple(f)
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # unreachable


# ----------------------------------------------------------------------------------------------
# GF(p^k) with vectorized numpy arithmetic on integer element codes
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GaloisField:
    """GF(p^k). Element code ``c`` = sum_i d_i p^i is the polynomial sum_i d_i x^i mod ``modulus``."""

    p: int
    k: int
    modulus: tuple[int, ...]  # monic irreducible, coefficients low -> high, length k + 1

    @property
    def order(self) -> int:
        return self.p**self.k

    def digits(self, codes: np.ndarray) -> np.ndarray:
        """Polynomial coefficients, shape ``codes.shape + (k,)``."""
        powers = self.p ** np.arange(self.k, dtype=np.int64)
        return (np.asarray(codes, dtype=np.int64)[..., None] // powers) % self.p

    def encode(self, digits: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`digits` (digits are reduced mod p first)."""
        powers = self.p ** np.arange(self.k, dtype=np.int64)
        return ((np.asarray(digits, dtype=np.int64) % self.p) * powers).sum(-1)

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self._digitwise(a, b, 1)

    def sub(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self._digitwise(a, b, -1)

    def _digitwise(self, a: np.ndarray, b: np.ndarray, sign: int) -> np.ndarray:
        a, b = np.broadcast_arrays(np.asarray(a, np.int64), np.asarray(b, np.int64))
        out = np.zeros(a.shape, dtype=np.int64)
        for i in range(self.k):  # one digit at a time keeps memory at one code array
            w = self.p**i
            out += (((a // w) % self.p + sign * ((b // w) % self.p)) % self.p) * w
        return out

    def mul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Product: polynomial convolution, then reduction by ``x^j mod modulus`` rows."""
        da, db = self.digits(a), self.digits(b)
        shape = np.broadcast_shapes(da.shape[:-1], db.shape[:-1])
        conv = np.zeros(shape + (2 * self.k - 1,), dtype=np.int64)
        for i in range(self.k):
            for j in range(self.k):
                conv[..., i + j] += da[..., i] * db[..., j]
        return self.encode(conv % self.p @ self._reduction())

    def _reduction(self) -> np.ndarray:
        """Row j holds the digits of ``x^j mod modulus`` for j < 2k - 1."""
        f = list(self.modulus)
        rows = [_poly_mod([0] * j + [1], f, self.p) for j in range(2 * self.k - 1)]
        return np.array(rows, dtype=np.int64)

    def quadratic_character(self) -> np.ndarray:
        """chi[c] for every code c: 0 at zero, +1 on nonzero squares, -1 elsewhere (int8)."""
        elems = np.arange(self.order, dtype=np.int64)
        chi = -np.ones(self.order, dtype=np.int8)
        chi[self.mul(elems, elems)] = 1
        chi[0] = 0
        return chi


@cache
def galois_field(q: int) -> GaloisField:
    """GF(q) for a prime power q (the irreducible modulus is the first one found by search)."""
    pk = _prime_power(q)
    if pk is None:
        raise ValueError(f"{q} is not a prime power")
    p, k = pk
    modulus = (0, 1) if k == 1 else _irreducible_poly(p, k)  # x for prime fields: codes = integers
    return GaloisField(p, k, modulus)


# ----------------------------------------------------------------------------------------------
# Paley and Sylvester blocks
# ----------------------------------------------------------------------------------------------


@cache
def _paley_kind(order: int) -> tuple[str, int] | None:
    """``("I", q)`` or ``("II", q)`` if ``order`` is a Paley order, else None (Paley I preferred)."""
    q = order - 1
    if q % 4 == 3 and _prime_power(q):
        return "I", q
    if order % 2 == 0:
        q = order // 2 - 1
        if q % 4 == 1 and _prime_power(q):
            return "II", q
    return None


def _jacobsthal(q: int) -> np.ndarray:
    """Q[a, b] = chi(a - b) over GF(q), int8, indexed by element codes."""
    field = galois_field(q)
    chi = field.quadratic_character()
    codes = np.arange(q, dtype=np.int64)
    out = np.empty((q, q), dtype=np.int8)
    step = max(1, 2**22 // q)  # row chunks bound the int64 temporaries for large q
    for start in range(0, q, step):
        rows = codes[start : start + step, None]
        diff = (rows - codes) % q if field.k == 1 else field.sub(rows, codes[None, :])
        out[start : start + step] = chi[diff]
    return out


def _conference_core(q: int, skew: bool) -> np.ndarray:
    """[[0, 1^T], [+-1, Q]]: skew-symmetric (q = 3 mod 4) or symmetric (q = 1 mod 4)."""
    s = np.zeros((q + 1, q + 1), dtype=np.int8)
    s[0, 1:] = 1
    s[1:, 0] = -1 if skew else 1
    s[1:, 1:] = _jacobsthal(q)
    return s


@lru_cache(maxsize=32)
def _paley_block(order: int) -> np.ndarray:
    """Paley Hadamard matrix of the given order (read-only int8)."""
    kind = _paley_kind(order)
    if kind is None:
        raise ValueError(f"{order} is not a Paley order")
    name, q = kind
    if name == "I":
        h = np.eye(q + 1, dtype=np.int8) + _conference_core(q, skew=True)
    else:  # 0 -> [[1, -1], [-1, -1]], +-1 -> +-[[1, 1], [1, -1]]
        s = _conference_core(q, skew=False)
        eye = np.eye(q + 1, dtype=np.int8)
        h = np.kron(s, np.array([[1, 1], [1, -1]], np.int8)) + np.kron(eye, np.array([[1, -1], [-1, -1]], np.int8))
    h.setflags(write=False)
    return h


@lru_cache(maxsize=16)
def _sylvester(p: int) -> np.ndarray:
    """Natural-order Sylvester matrix: H[i, j] = (-1)^popcount(i & j) (read-only int8)."""
    idx = np.arange(p, dtype=np.int64)
    both = idx[:, None] & idx[None, :]
    parity = np.zeros_like(both)
    while both.any():  # popcount parity without np.bitwise_count (numpy >= 2), since nvidia-pytriton pins numpy < 2
        parity ^= both & 1
        both = both >> 1
    parity = parity.astype(np.int8)
    h = 1 - 2 * parity
    h.setflags(write=False)
    return h


# ----------------------------------------------------------------------------------------------
# Williamson blocks
# ----------------------------------------------------------------------------------------------

WILLIAMSON_ORDERS = {172: (43, 6)}
"""Order 4n -> (n, g): Williamson blocks, for orders without a Paley construction. ``A, B, C, D`` are symmetric
circulant +-1 matrices of order n constant on the orbits of the multiplier group ``<-1, g>`` mod n (for n = 43,
g = 6 has order 3: 8 orbits, 256 sequences to search, Williamson's own route to 172)."""


def _multiplier_orbits(n: int, g: int) -> list[list[int]]:
    """Orbits of Z_n under multiplication by the group generated by -1 and g, in order of their least element."""
    group = {1}
    while (grown := group | {x * m % n for x in group for m in (n - 1, g)}) != group:
        group = grown
    seen: set[int] = set()
    orbits = []
    for x in range(n):
        if x not in seen:
            orbit = sorted({x * m % n for m in group})
            seen.update(orbit)
            orbits.append(orbit)
    return orbits


@cache
def _williamson_rows(order: int) -> tuple[tuple[int, ...], ...]:
    """First rows of ``A, B, C, D``: the first quadruple (pairs in lexicographic order of the sequences' orbit
    codes) whose periodic autocorrelations sum to 0 at every nonzero shift, i.e. ``A^2 + B^2 + C^2 + D^2 = 4n I``.
    Exact integer arithmetic; an autocorrelation is constant on each orbit, so one shift per orbit is checked."""
    n, g = WILLIAMSON_ORDERS[order]
    orbits = _multiplier_orbits(n, g)
    seqs = np.empty((2 ** len(orbits), n), dtype=np.int64)
    for code in range(len(seqs)):
        for bit, orbit in enumerate(orbits):
            seqs[code, orbit] = -1 if code >> bit & 1 else 1
    shifts = [orbit[0] for orbit in orbits if orbit[0]]
    paf = np.stack([(seqs * np.roll(seqs, -s, axis=1)).sum(1) for s in shifts], axis=1)
    pairs = [(i, j) for i in range(len(seqs)) for j in range(i, len(seqs))]
    first: dict[bytes, tuple[int, int]] = {}
    for i, j in pairs:
        first.setdefault((paf[i] + paf[j]).tobytes(), (i, j))
    for i, j in pairs:
        match = first.get((-(paf[i] + paf[j])).tobytes())
        if match:
            return tuple(tuple(int(v) for v in seqs[t]) for t in (i, j, *match))
    raise AssertionError(f"no Williamson quadruple of order {order} in the searched orbits")  # unreachable


@lru_cache(maxsize=8)
def _williamson_block(order: int) -> np.ndarray:
    """``[[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]]`` (read-only int8)."""
    n = order // 4
    a, b, c, d = (np.array([np.roll(row, i) for i in range(n)], dtype=np.int8) for row in _williamson_rows(order))
    h = np.block([[a, b, c, d], [-b, a, -d, c], [-c, d, a, -b], [-d, -c, b, a]])
    assert np.array_equal(h.astype(np.int64) @ h.T.astype(np.int64), order * np.eye(order, dtype=np.int64))
    h.setflags(write=False)
    return h


def _constructible(k: int, williamson: bool = True) -> bool:
    return _paley_kind(k) is not None or (williamson and k in WILLIAMSON_ORDERS)


def hadamard_block(k: int) -> np.ndarray:
    """The +-1 block ``H_K`` of ``H_n = kron(H_K, H_p)``: ``[[1]]``, Paley or Williamson (read-only int8)."""
    if k == 1:
        return np.ones((1, 1), dtype=np.int8)
    return _williamson_block(k) if _paley_kind(k) is None else _paley_block(k)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def _size_error(n: int) -> HadamardSizeError:
    odd, e = n, 0
    while odd > 0 and odd % 2 == 0:
        odd, e = odd // 2, e + 1
    return HadamardSizeError(
        f"no Hadamard construction for size {n} ({n} = {odd} * 2^{e} and no Paley or Williamson order K "
        "divides it with a power-of-2 cofactor)",
        "choose a size K*2^m with K in {1, 12, 20, 28, 36, ...} or use a block-diagonal split / identity rotation",
    )


def hadamard_factors(n: int, williamson: bool = True) -> tuple[int, int]:
    """``(K, p)`` with ``n = K * p``, p a power of 2 and K the smallest constructible block (1 = Sylvester).
    ``williamson=False``: Paley orders only, the rule of transform schema versions 1-2 (e.g. 11008 = 344 x 32)."""
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise HadamardSizeError(f"no Hadamard construction for size {n!r}", "use a positive integer size")
    return _factors(int(n), williamson)


@cache
def _factors(n: int, williamson: bool) -> tuple[int, int]:
    odd = n
    while odd % 2 == 0:
        odd //= 2
    if odd == 1:
        return 1, n
    k = odd
    while n % k == 0:
        if _constructible(k, williamson):
            return k, n // k
        k *= 2
    raise _size_error(n)


def _kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``kron(a, b)`` for 2-D tensors in one broadcast multiply."""
    return (a[:, None, :, None] * b[None, :, None, :]).reshape(a.shape[0] * b.shape[0], a.shape[1] * b.shape[1])


def hadamard_int(n: int) -> torch.Tensor:
    """Unnormalized +-1 Hadamard matrix (int64), ``kron(H_K, H_p)``; exactly ``H @ H.T == n * I``."""
    k, p = hadamard_factors(n)
    return _kron(torch.tensor(hadamard_block(k), dtype=torch.int64), torch.tensor(_sylvester(p), dtype=torch.int64))


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthogonal Hadamard matrix ``hadamard_int(n) / sqrt(n)`` in ``dtype``."""
    k, p = hadamard_factors(n)
    hk = torch.tensor(hadamard_block(k), dtype=dtype) / math.sqrt(n)  # +-1/sqrt(n), then * +-1 (exact): same values
    return _kron(hk, torch.tensor(_sylvester(p), dtype=dtype))


def _block_size(n: int, num_blocks: int) -> int:
    if num_blocks < 1 or n % num_blocks:
        raise HadamardSizeError(
            f"size {n} cannot be split into num_blocks={num_blocks} equal Hadamard blocks",
            f"choose num_blocks >= 1 dividing {n}",
        )
    return n // num_blocks


def block_hadamard_matrix(n: int, num_blocks: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Block-diagonal matrix of ``num_blocks`` copies of ``hadamard_matrix(n // num_blocks)``."""
    h = hadamard_matrix(_block_size(n, num_blocks), dtype)
    return h if num_blocks == 1 else torch.block_diag(*([h] * num_blocks))


def random_signs(n: int, seed: int) -> torch.Tensor:
    """+-1 float64 vector: ``2 * randint(0, 2, (n,)) - 1`` from ``torch.Generator().manual_seed(seed)``."""
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64)
    return (2 * bits - 1).to(torch.float64)


def randomized_hadamard_matrix(
    n: int, seed: int, num_blocks: int = 1, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """``diag(random_signs(n, seed)) @ block_hadamard_matrix(n, num_blocks)`` (orthogonal)."""
    h = block_hadamard_matrix(n, num_blocks, dtype)
    return random_signs(n, seed).to(dtype)[:, None] * h


def _fwht(y: torch.Tensor) -> torch.Tensor:
    """Unnormalized ``y @ H_p`` over the last axis (Sylvester natural order), stages h = 1, 2, ..., p/2."""
    # Butterfly stages via reshape (no Sylvester matmul, for every p): log2(p) add/sub passes.
    p = y.shape[-1]
    lead = y.shape[:-1]
    h = 1
    while h < p:
        v = y.reshape(*lead, p // (2 * h), 2, h)
        a, b = v[..., 0, :], v[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2).reshape(*lead, p)
        h *= 2
    return y


def _block_factors(x: torch.Tensor, num_blocks: int, name: str) -> tuple[int, int, int, int]:
    """(n, n_block, K, p) of the block Hadamard applied to the last dim of a floating-point ``x``."""
    if not x.is_floating_point():
        raise TypeError(f"{name} needs a floating-point tensor, got {x.dtype}")
    n = x.shape[-1]
    n_block = _block_size(n, num_blocks)
    return (n, n_block, *hadamard_factors(n_block))


def _block_t(k: int, device: torch.device) -> torch.Tensor:
    """``H_K^T`` (the +-1 block, transposed) in float64 on ``device``."""
    return torch.tensor(hadamard_block(k), dtype=torch.float64, device=device).T


def apply_hadamard(x: torch.Tensor, num_blocks: int = 1) -> torch.Tensor:
    """``x @ block_hadamard_matrix(x.shape[-1], num_blocks)`` for row vectors, without a dense matrix.

    Computed in ``x.dtype`` (float32 / float64). With ``n_block = K * p`` (``hadamard_factors``) and each
    block reshaped row-major to ``X`` of shape ``(..., K, p)`` (index ``i = a * p + b``), the exact order is:

    1. FWHT over the p axis: butterfly stages ``h = 1, 2, 4, ..., p/2``; each stage maps the pair
       ``(y[j], y[j + h])`` (j with bit h clear) to ``(y[j] + y[j + h], y[j] - y[j + h])``. Unnormalized.
    2. ``H_K^T @ Y`` over the K axis: dense matmul with the int K x K block, computed in float64 and rounded
       once to ``x.dtype`` (so every summation order gives the same float32 result; skipped when K == 1).
    3. Multiply by the python float ``1 / math.sqrt(n_block)`` cast to ``x.dtype``.
    """
    _, _, k, p = _block_factors(x, num_blocks, "apply_hadamard")
    return _apply_factored(x, num_blocks, k, p)


def _apply_factored(x: torch.Tensor, num_blocks: int, k: int, p: int) -> torch.Tensor:
    """:func:`apply_hadamard` with the block's factors ``(k, p)`` given (``tools/bench_hadamard.py`` times other
    constructions of one size with it)."""
    lead, n_block = x.shape[:-1], k * p
    y = _fwht(x.reshape(*lead, num_blocks, k, p))
    if k > 1:
        y = torch.matmul(_block_t(k, x.device), y.double()).to(x.dtype)
    scale = torch.tensor(1.0 / math.sqrt(n_block), dtype=x.dtype)
    return (y * scale).reshape(*lead, num_blocks * n_block)


def apply_hadamard_fp16(x: torch.Tensor, num_blocks: int = 1) -> torch.Tensor:
    """The InfoQuant reference's float16 online Hadamard (numerics.md section 7.5), same matrix as
    :func:`apply_hadamard`, returned in ``x.dtype``:

    1. the unnormalized FWHT over the p axis in float32, rounded to float16 (large sums overflow to inf, as in
       the reference's ``--fp32_had False`` path);
    2. divided by ``sqrt(n_block)``: ``fp16(float32(y) / float32(sqrt(n_block)))``;
    3. ``H_K^T @ Y`` over the K axis computed in float64 from the float16 values and rounded once to float16.
    """
    n, n_block, k, p = _block_factors(x, num_blocks, "apply_hadamard_fp16")
    lead = x.shape[:-1]
    y = _fwht(x.float().reshape(*lead, num_blocks, k, p)).to(torch.float16)
    y = (y.float() / torch.tensor(math.sqrt(n_block), dtype=torch.float32)).to(torch.float16)
    if k > 1:
        y = torch.matmul(_block_t(k, x.device), y.double()).to(torch.float16)
    return y.reshape(*lead, n).to(x.dtype)
