"""Fused Hadamard + per-token quantization kernel (plugins/infoquant_kernels/quantize.py) through ``ops.quantize_rows``
and ``ops.hadamard``: bit-identical to the primitives (numerics.md sections 1, 3, 4)."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

from infoquant_export.kernels import k_step as k_step_module  # noqa: E402
from infoquant_export.kernels import ops, rows  # noqa: E402
from infoquant_export.quant.primitives import (  # noqa: E402
    SCALE_EPS,
    activation_qparams,
    pack_uint4,
    quantize_activation,
)
from infoquant_export.transforms.hadamard import apply_hadamard, hadamard_factors  # noqa: E402
from tests.kernels.conftest import DEVICE, INTERPRETER_WARNING  # noqa: E402

pytestmark = pytest.mark.filterwarnings(INTERPRETER_WARNING)


def reference(x: torch.Tensor, bits: int = 4, clip: float = 1.0, clip_min: float | None = None,
              blocks: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale [M], zero [M] uint8) from the primitives, on the CPU, for rows of ``x`` (any leading dims)."""
    xf = x.cpu().float().reshape(-1, x.shape[-1])
    xr = apply_hadamard(xf, blocks) if blocks is not None else xf
    s, z = activation_qparams(xr, bits, clip, clip_min)
    q = quantize_activation(xr, s, z, bits)
    return (pack_uint4(q) if bits == 4 else q), s.squeeze(-1), z.squeeze(-1).to(torch.uint8)


def assert_rows_equal(x: torch.Tensor, bits: int = 4, clip: float = 1.0, clip_min: float | None = None,
                      blocks: int | None = None) -> ops.PackedRows:
    got = ops.quantize_rows(x.to(DEVICE), bits, clip, clip_min, blocks)
    codes, scale, zero = reference(x, bits, clip, clip_min, blocks)
    assert got.bits == bits
    assert got.codes.dtype == torch.uint8 and got.zero.dtype == torch.uint8 and got.scale.dtype == torch.float32
    assert torch.equal(got.scale.cpu(), scale)
    assert torch.equal(got.zero.cpu(), zero)
    assert torch.equal(got.codes.cpu(), codes)
    # not a vacuous comparison: the zero points spread over the grid (no all-0 / all-qmax rows)
    assert int(zero.max()) > 0 or not x.any()
    return got


CASES = {
    # name: (n, hadamard_blocks, (K, p) of a block or None)
    "no_rotation_576_padded_to_1024": (576, None, None),
    "no_rotation_64": (64, None, None),
    "sylvester_256": (256, 1, (1, 256)),
    "paley_k12_192": (192, 1, (12, 16)),
    "paley_k12_1536": (1536, 1, (12, 128)),
    "two_blocks_sylvester_512": (512, 2, (1, 256)),
    "two_blocks_paley_384": (384, 2, (12, 16)),
    "three_blocks_padded_to_4_192": (192, 3, (1, 64)),
}


@pytest.mark.parametrize("case", CASES)
def test_quantize_rows_bit_identical(case):
    n, blocks, kp = CASES[case]
    if kp is not None:
        assert hadamard_factors(n // blocks) == kp  # the construction this case means to cover
        assert ops.row_tile(n, blocks, True).fused
    x = torch.randn(2, 3, n) * 3  # leading dims are flattened into rows
    x[0, 1, : n // 8] += 10.0  # one row with an outlier block
    assert_rows_equal(x, 4, 0.9, None, blocks)


@pytest.mark.parametrize("two_pass", [False, True])
def test_fwht_one_or_two_passes_same_bits(monkeypatch, two_pass):
    """A single power-of-two block's FWHT before quantizing, in one pass (the default) or two
    (``rows.FWHT_TWO_PASS``): the same stages in the same order, so the primitives' bits either way."""
    monkeypatch.setattr(rows, "FWHT_TWO_PASS", two_pass)
    x = torch.randn(3, 1024) * 3
    x[1, :64] += 10.0
    assert_rows_equal(x, 4, 0.9, None, 1)


@pytest.mark.parametrize("k_dot", [True, False])
@pytest.mark.parametrize("n,blocks", [(1536, 1), (384, 2), (5632, 1)])
def test_fused_k_step_forms(monkeypatch, n, blocks, k_dot):
    """The row kernel's fused K step as a float64 ``tl.dot`` (sm_80 / sm_90, the interpreter's default) and as the
    broadcast-and-sum (elsewhere): the same bits as the primitives for one Paley block (1536 = 12 x 128), two
    (384 = 2 x 12 x 16) and TinyLlama's 5632 = 44 x 128 (a 64 x 128 tile: four column chunks of 32)."""
    monkeypatch.setattr(rows, "k_dot", lambda cc: k_dot)
    assert ops.row_tile(n, blocks, True).fused and ops.row_tile(n, blocks, True).k > 1
    x = torch.randn(3, n) * 3
    x[1, : n // 8] += 10.0
    assert_rows_equal(x, 4, 0.9, None, blocks)
    assert torch.equal(ops.hadamard(x.to(DEVICE), blocks).cpu(), apply_hadamard(x, blocks))


def test_fused_k_step_bounded_scratch(monkeypatch):
    """With room for 2 rows of K-step scratch (``rows.SCRATCH_BYTES``), 5 rows of 1536 = 12 x 128 are quantized and
    rotated in 3 launches that reuse it: the primitives' bits."""
    monkeypatch.setattr(rows, "SCRATCH_BYTES", 2 * 4 * ops.row_tile(1536, 1, True).elements)
    x = torch.randn(5, 1536) * 3
    assert_rows_equal(x, 4, 0.9, None, 1)
    assert torch.equal(ops.hadamard(x.to(DEVICE), 1).cpu(), apply_hadamard(x, 1))


@pytest.mark.parametrize("few_rows", [128, 0])
def test_quantize_rows_unfused_large_k(monkeypatch, few_rows):
    """11008 = 172 x 64 in 3 launches. Fewer rows than ``FEW_ROWS`` (a decode step): the FWHT pass with a program
    per chunk, the K step, the one-pass row-tile quantize; otherwise (0: as for a prefill) a program per row loops
    over the chunks and the quantize is the chunked kernel. The primitives' bits either way."""
    n = 11008  # LLaMA-2-7B intermediate: 172 * 64, Williamson K = 172
    assert hadamard_factors(n) == (172, 64)
    assert not ops.row_tile(n, 1, True).fused  # H_K^T runs in the K-step kernel (a float64 GEMM)
    monkeypatch.setattr(rows, "FEW_ROWS", few_rows)
    x = torch.randn(2, n)
    x[1, :640] += 12.0
    assert_rows_equal(x, 4, 0.9, None, 1)


def k_step_reference(y: torch.Tensor, k: int, p: int) -> torch.Tensor:
    """H_K^T over each row's k x p view as the primitives compute it: a float64 matmul rounded once to float32."""
    from infoquant_export.transforms.hadamard import hadamard_block

    h_t = torch.tensor(hadamard_block(k), dtype=torch.float64).T
    return torch.matmul(h_t, y.double().view(-1, k, p)).float().reshape(y.shape)


@pytest.mark.parametrize("k,p,rows,tiles", [
    (172, 64, 3, None),               # 11008 (Williamson K): the default tile, 3 row tiles (K padded to 192)
    (172, 64, 3, (64, 16, 128, 4)),   # a wider column tile: 192 columns = one full and one partial column tile
    (344, 32, 3, None),               # 11008 as Paley 344 x 32: 96 columns = one full and one partial column tile
    (344, 32, 3, (64, 16, 32, 4)),    # a narrower column tile
    (12, 16, 5, (16, 16, 16, 1)),     # K = 12 < BA: padded rows and columns of H_K^T
    (44, 64, 2, (32, 16, 64, 2)),     # K = 44: the last K step half padding
    (172, 64, 1, (16, 16, 64, 2)),    # a decode step's tile (K_STEP_TILE_FEW_ROWS): 11 row tiles of 16 (K -> 176)
])
def test_k_step_kernel_exact(k, p, rows, tiles):
    """``hadamard_k_step_kernel``: H_K^T (float64, exact +-1 products) over each row's k x p view, rounded once to
    float32, as the primitives' float64 matmul; with the 1/sqrt(n) scale after the rounding. Inputs of mixed
    magnitude (a 2^12 outlier row block) exercise the float64 sum."""
    y = torch.randn(rows, k * p)
    y[0, :p] *= 4096.0
    want = k_step_reference(y, k, p)
    out = torch.full_like(y, float("nan")).to(DEVICE)
    ops.k_step(y.to(DEVICE), out, k, p, tiles=tiles)
    assert torch.equal(out.cpu(), want)
    scale = float(torch.tensor(1 / (k * p) ** 0.5, dtype=torch.float32))
    ops.k_step(y.to(DEVICE), out, k, p, out_scale=scale, tiles=tiles)
    assert torch.equal(out.cpu(), want * torch.tensor(scale, dtype=torch.float32))


def test_k_step_row_slices(monkeypatch):
    """More column tiles than CUDA's gridDim.y allows (65535) go in several launches over row slices: with the
    limit set to 1 tile, 5 rows of 344 x 32 take 3 launches of 2 rows (64 columns), same result."""
    monkeypatch.setattr(k_step_module, "MAX_GRID_Y", 1)
    y = torch.randn(5, 344 * 32)
    out = torch.full_like(y, float("nan")).to(DEVICE)
    ops.k_step(y.to(DEVICE), out, 344, 32)
    assert torch.equal(out.cpu(), k_step_reference(y, 344, 32))


def test_k_step_bad_input():
    y = torch.randn(2, 344 * 32).to(DEVICE)
    with pytest.raises(ops.KernelInputError, match="float32"):
        ops.k_step(y.half(), torch.empty_like(y), 344, 32)
    with pytest.raises(ops.KernelInputError, match=r"rows \[R, 344 \* 32\]"):
        ops.k_step(y, torch.empty(2, 100, device=DEVICE), 344, 32)


def test_quantize_rows_lac_clip_pair():
    """LAC: clip (row max) and clip_min (row min) differ; both float32 values from an artifact."""
    clip, clip_min = float(torch.tensor(0.8731, dtype=torch.float32)), float(torch.tensor(0.6542))
    x = torch.randn(6, 256) * 2
    got = assert_rows_equal(x, 4, clip, clip_min, 1)
    # the pair is really used: swapping it changes the scales
    swapped = ops.quantize_rows(x.to(DEVICE), 4, clip_min, clip, 1)
    assert not torch.equal(swapped.scale.cpu(), got.scale.cpu())


@pytest.mark.parametrize("blocks", [None, 1])
def test_quantize_rows_8bit(blocks):
    x = torch.randn(4, 192) * 2
    got = assert_rows_equal(x, 8, 0.9, None, blocks)
    assert got.codes.shape == (4, 192)  # one code per byte
    assert int(got.codes.max()) > 15  # really the 8-bit grid


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("blocks", [None, 1])
def test_quantize_rows_half_inputs(dtype, blocks):
    """16-bit inputs are read as float32 (exact), then quantized exactly like the float32 values."""
    x = (torch.randn(5, 192) * 3).to(dtype)
    assert_rows_equal(x, 4, 0.9, None, blocks)


def test_quantize_rows_all_zero_row():
    x = torch.randn(3, 128)
    x[1] = 0.0
    got = assert_rows_equal(x, 4, 0.9)
    assert got.scale[1].item() == torch.tensor(SCALE_EPS, dtype=torch.float32).item()
    assert got.zero[1].item() == 0
    assert not got.codes[1].any()


def _tie_rows() -> tuple[torch.Tensor, float]:
    """Rows whose scale is exactly 2^-2 (range 3.75 = 15 / 4), so that x / s of every (k + 0.5) / 4 is a tie.

    Row 0: min -1.25, max 2.5 -> s = 0.25, z = round(5.0) = 5; values (k + 0.5) * 0.25 for k = -5 .. 9.
    Row 1: min -0.625, max 3.125 -> s = 0.25, -min / s = 2.5: the zero point itself is a tie (half-even: 2).
    """
    ties = [(k + 0.5) * 0.25 for k in range(-5, 10)]
    row0 = [-1.25, 2.5, *ties]
    row1 = [-0.625, 3.125, *[t for t in ties if -0.625 <= t <= 3.125]]
    n = 64
    x = torch.zeros(2, n)
    x[0, : len(row0)] = torch.tensor(row0)
    x[1, : len(row1)] = torch.tensor(row1)
    return x, 0.25


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    return torch.sign(v) * torch.floor(v.abs() + 0.5)


def test_quantize_rows_rounding_ties_half_to_even():
    x, s_expected = _tie_rows()
    s, z = activation_qparams(x, 4, 1.0)
    assert torch.all(s == s_expected)  # a power of two: x / s is exact
    v = x / s
    is_tie = (v - torch.floor(v)) == 0.5
    assert int(is_tie[0].sum()) == 15 and int(is_tie[1].sum()) >= 10  # the ties are in the input
    assert (-x.amin(-1) / s.squeeze(-1)).tolist() == [5.0, 2.5]  # and row 1's zero point is one
    assert z.squeeze(-1).tolist() == [5.0, 2.0]  # half-to-even: 2.5 -> 2

    expected = torch.clamp(torch.round(v) + z, 0, 15).to(torch.uint8)  # torch.round is half-to-even
    away = torch.clamp(_round_half_away(v) + _round_half_away(-x.amin(-1, keepdim=True) / s), 0, 15)
    assert (away.to(torch.uint8) != expected).sum() >= 10  # a ties-away kernel would fail this test

    got = ops.quantize_rows(x.to(DEVICE), 4, 1.0)
    assert torch.equal(got.scale.cpu(), s.squeeze(-1))
    assert got.zero.cpu().tolist() == [5, 2]
    assert torch.equal(got.codes.cpu(), pack_uint4(expected))


def test_quantize_rows_rounding_ties_8bit():
    """8 bits: range 255 / 16 gives s = 2^-4; min -40.5 / 16 makes the zero point a tie (40.5 -> 40), and the max
    (214.5 / 16) and 85 more values are ties too."""
    xmin = -40.5 / 16
    ties = [(k + 0.5) / 16 for k in range(-40, 214, 3)]
    x = torch.zeros(1, 128)
    x[0, :2] = torch.tensor([xmin, 255 / 16 + xmin])
    x[0, 2 : 2 + len(ties)] = torch.tensor(ties)
    s, z = activation_qparams(x, 8, 1.0)
    assert s.item() == 2.0**-4 and z.item() == 40.0
    v = x / s
    assert int(((v - torch.floor(v)) == 0.5).sum()) == len(ties) + 2  # + the min and the max
    expected = torch.clamp(torch.round(v) + z, 0, 255).to(torch.uint8)
    away = torch.clamp(_round_half_away(v) + 41, 0, 255).to(torch.uint8)
    assert (away != expected).sum() >= len(ties)
    got = ops.quantize_rows(x.to(DEVICE), 8, 1.0)
    assert got.zero.item() == 40
    assert torch.equal(got.codes.cpu(), expected)


def test_quantize_rows_ieee_division_not_reciprocal():
    """x / s must be the correctly rounded division (numerics.md: div_rn), not x * (1 / s): values within 3 ulps of
    the ties (k + 0.5) * s of a row with a non-power-of-2 scale, where the two differ after rounding."""
    lo, hi = -1.6364436149597168, 1.988769769668579  # s = 3.6252134 / 15 = 0.24168089, 1 / s = 4.1376877
    s = (torch.tensor(hi) - torch.tensor(lo)) / 15
    ties = (torch.arange(-6, 8, dtype=torch.float32) + 0.5) * s
    near = [ties]
    up, down = ties, ties
    for _ in range(3):
        up = torch.nextafter(up, torch.full_like(up, float("inf")))
        down = torch.nextafter(down, torch.full_like(down, float("-inf")))
        near += [up, down]
    values = torch.cat(near)
    values = values[(values > lo) & (values < hi)]
    x = torch.zeros(1, 128)
    x[0, :2] = torch.tensor([lo, hi])
    x[0, 2 : 2 + len(values)] = values
    s_ref, _ = activation_qparams(x, 4, 1.0)
    assert s_ref.item() == s.item()
    assert int((torch.round(values / s) != torch.round(values * (1 / s))).sum()) >= 4  # the test can tell them apart
    assert_rows_equal(x, 4, 1.0)


@pytest.mark.parametrize("n,blocks", [(256, 1), (192, 1), (1536, 1), (384, 2), (192, 3), (11008, 1), (4096, 1),
                                     (4096, 32)])
def test_hadamard_equals_apply_hadamard(n, blocks):
    x = torch.randn(3, n)
    got = ops.hadamard(x.to(DEVICE), blocks).cpu()
    ref = apply_hadamard(x, blocks)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert torch.equal(got, ref)
    assert not torch.equal(ref, x)


def test_hadamard_half_input_rotates_in_float32():
    x = torch.randn(2, 4, 192).half()
    got = ops.hadamard(x.to(DEVICE), 1).cpu()
    assert got.dtype == torch.float16 and got.shape == x.shape
    assert torch.equal(got, apply_hadamard(x.float(), 1).half())


@pytest.mark.parametrize("few_rows", [128, 0])
def test_quantize_rows_long_rows(monkeypatch, few_rows):
    """Rows over ``CHUNKED_ABOVE`` without rotation: the one-pass row tile with 16 warps for a few rows (a decode
    step), the two-pass chunked kernel (no padding to 16384) otherwise (``FEW_ROWS`` 0)."""
    monkeypatch.setattr(rows, "FEW_ROWS", few_rows)
    n = 11008
    assert n > ops.CHUNKED_ABOVE
    x = torch.randn(3, n) * 2
    x[1, 5] = 60.0
    assert_rows_equal(x, 4, 0.9, None, None)
