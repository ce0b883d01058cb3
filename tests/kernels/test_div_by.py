"""``common.div_by``: the quantize kernels divide by a row's scale as ``q0 = x * inv_s``, ``r = fma(-q0, s, x)``,
``fma(r, inv_s, q0)`` with ``inv_s = RN(1 / s)`` (compiled code only: Triton's interpreter rounds inside its
``tl.fma``). This checks, in exact arithmetic, that the sequence gives IEEE float32 division's result (Markstein's
theorem) on the values the kernels see and on the cases built to break it: quotients next to half-integers (where
the integer code would change), exact multiples, power-of-two scales, huge and tiny quotients. The compiled
kernels' codes are compared with the primitives' on a GPU (tests/gpu)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np

F32, F64 = np.float32, np.float64


def rn32(v: np.ndarray) -> np.ndarray:
    """float64 -> float32, round to nearest even (numpy's cast)."""
    return v.astype(F32)


def fma32_exact_residual(q0: np.ndarray, s: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``RN32(x - q0 * s)``: the product is exact in float64 (24 + 24 bits) and so is the difference, because q0 is
    within one ulp of x / s (the result spans < 30 bits); one rounding to float32."""
    return rn32(x.astype(F64) - q0.astype(F64) * s.astype(F64))


def fma32_sum(r: np.ndarray, y: np.ndarray, q0: np.ndarray) -> np.ndarray:
    """``RN32(r * y + q0)`` exactly: ``t = r * y`` is exact in float64; the sum ``q0 + t`` is held exactly as
    ``hi + lo`` (Knuth's TwoSum), and ``hi`` rounded to float32 is the answer unless ``hi`` sits exactly on a float32
    midpoint, where the sign of ``lo`` decides (a tie with lo = 0 stays numpy's round-half-even)."""
    t = r.astype(F64) * y.astype(F64)
    a = q0.astype(F64)
    hi = a + t
    bb = hi - a
    lo = (a - (hi - bb)) + (t - bb)
    c = rn32(hi)
    up, dn = np.nextafter(c, F32(np.inf)), np.nextafter(c, F32(-np.inf))
    on_mid_up = hi == (c.astype(F64) + up.astype(F64)) / 2
    on_mid_dn = hi == (c.astype(F64) + dn.astype(F64)) / 2
    return np.where(on_mid_up & (lo > 0), up, np.where(on_mid_dn & (lo < 0), dn, c))


def div_by(x: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The kernels' compiled ``div_by``, emulated exactly."""
    y = F32(1) / s  # RN32(1 / s): numpy's float32 division is IEEE
    q0 = x * y  # RN32(x * y)
    return fma32_sum(fma32_exact_residual(q0, s, x), y, q0)


def ieee_div(x: np.ndarray, s: np.ndarray) -> np.ndarray:
    """RN32(x / s): float64 division rounded again to float32 is correctly rounded (53 >= 2 * 24 + 2 bits)."""
    return rn32(x.astype(F64) / s.astype(F64))


def cases(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n = 400_000
    xs, ss = [], []
    # activations and their row scales as the kernels compute them: s = (max - min) / 15 >= 1e-8
    rows = (rng.standard_normal((n // 256, 256)) * 10.0 ** rng.integers(-6, 5, (n // 256, 1))).astype(F32)
    rs = np.maximum((rows.max(1) - np.minimum(rows.min(1), 0)) / F32(15), F32(1e-8)).astype(F32)
    xs.append(rows.ravel())
    ss.append(np.repeat(rs, 256))
    # wide exponent ranges, both signs
    xs.append((rng.uniform(1, 2, n) * 2.0 ** rng.integers(-40, 40, n) * rng.choice([-1, 1], n)).astype(F32))
    ss.append((rng.uniform(1, 2, n) * 2.0 ** rng.integers(-27, 20, n)).astype(F32))
    # quotients next to half-integers and integers: x = RN32((k + 0.5) s) and RN32(k s), +-0..3 ulps
    s = (rng.uniform(1, 2, n) * 2.0 ** rng.integers(-27, 10, n)).astype(F32)
    k = rng.integers(-40, 40, n) + rng.choice([0.0, 0.5], n)
    x = rn32(k * s.astype(F64))
    steps = rng.integers(-3, 4, n)
    for j in (1, 2, 3):
        x = np.where(steps >= j, np.nextafter(x, F32(np.inf)), np.where(steps <= -j, np.nextafter(x, F32(-np.inf)), x))
    xs.append(x)
    ss.append(s)
    # the quantizer's regime: x within +-16 scales of 0, full-mantissa scales from 2^-27 (~1e-8) to 2^10
    s = (rng.uniform(1, 2, n) * 2.0 ** rng.integers(-27, 10, n)).astype(F32)
    xs.append((rng.uniform(-16, 16, n) * s.astype(F64)).astype(F32))
    ss.append(s)
    # power-of-two scales (an exact reciprocal) and scales with all-ones significands
    xs.append(rng.standard_normal(n).astype(F32) * F32(100))
    ss.append(np.where(rng.random(n) < 0.5, 2.0 ** rng.integers(-26, 10, n),
                       (2 - 2.0 ** -23) * 2.0 ** rng.integers(-26, 10, n)).astype(F32))
    return np.concatenate(xs), np.concatenate(ss)


def test_div_by_is_ieee_division():
    x, s = (np.concatenate(a) for a in zip(*(cases(np.random.default_rng(seed)) for seed in range(5)), strict=True))
    got, want = div_by(x, s), ieee_div(x, s)
    # Markstein's theorem assumes nothing underflows: a normal quotient, and |x| >= 2^-100 so that the residual
    # (~2^-23 |x|, its last bit ~2^-47 |x|) stays a multiple of the smallest subnormal. Below, 1-ulp errors do
    # occur (e.g. x = 4e-45, s = 1.4e-7), on quotients that round to the integer 0.
    normal = (np.abs(want) >= np.finfo(F32).tiny) & (np.abs(x) >= F32(2.0 ** -100))
    bad = normal & (got != want)
    assert not bad.any(), list(zip(x[bad][:5], s[bad][:5], got[bad][:5], want[bad][:5], strict=True))
    assert normal.mean() > 0.95  # measured 0.9987 of 10.0 M: the checked cases are the normal ones
    # the integer codes agree everywhere, the underflowing cases included (they round to 0 either way)
    assert np.array_equal(np.rint(got), np.rint(want))
    # the cases reach the rounding decisions that matter: quotients within 4 ulps of a half-integer
    frac = np.abs(want - np.floor(want) - F32(0.5))
    assert (frac <= 4 * np.spacing(np.abs(want))).sum() > 500_000  # measured 2,307,859
    # and x * RN(1 / s) alone would change the integer code there: the correction step is what makes it exact
    q0 = x * (F32(1) / s)
    assert (np.rint(q0) != np.rint(want)).sum() > 50_000  # measured 286,421


def test_emulation_against_fractions():
    """The float64 emulation itself, on a sample, against exact rational arithmetic."""
    rng = np.random.default_rng(1)
    x, s = (a[rng.choice(a.size, 3000, replace=False)] for a in cases(np.random.default_rng(2)))
    got = div_by(x, s)
    for xi, si, gi in zip(x.tolist(), s.tolist(), got.tolist(), strict=True):
        y = float(F32(1) / F32(si))
        q0 = float(F32(xi) * F32(y))
        r = float(F32(Fraction(xi) - Fraction(q0) * Fraction(si)))
        exact = Fraction(r) * Fraction(y) + Fraction(q0)
        assert gi == float(F32(float(exact))) or _midpoint_case(exact, gi)


def _midpoint_case(exact: Fraction, got: float) -> bool:
    """``float(exact)`` rounds twice (to float64, then float32); accept ``got`` when it is the correct RN32."""
    lo = float(np.nextafter(F32(got), F32(-np.inf)))
    hi = float(np.nextafter(F32(got), F32(np.inf)))
    return abs(exact - Fraction(got)) <= min(abs(exact - Fraction(lo)), abs(exact - Fraction(hi)))
