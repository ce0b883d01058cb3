"""W4A4 GEMM kernel (plugins/infoquant_kernels/gemm.py) through ``ops.w4a4_linear``: bit-identical to
``integer_linear`` (numerics.md section 5, "integer GEMM"), int32 accumulation."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

from infoquant_export.kernels import interpreted, ops  # noqa: E402
from infoquant_export.quant.primitives import (  # noqa: E402
    integer_activation,
    integer_linear,
    pack_uint4,
    quantize_weight,
    weight_scale,
)
from tests.kernels.conftest import DEVICE, INTERPRETER_WARNING  # noqa: E402

pytestmark = pytest.mark.filterwarnings(INTERPRETER_WARNING)

N_OUT = 80  # not a multiple of any BN: the last column tile wraps its loads and masks its stores
TILE_KEYS = ("BM", "BN", "BK2", "GROUP_M", "num_warps", "num_stages")  # the order of ops.GEMM_TILES entries


def make_layer(m: int, k: int, n: int = N_OUT, seed: int = 0):
    """Activations ``x [m, k]``, a 4-bit RTN weight (codes [n, k] int8, scale [n, 1]) and a bias."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 2
    x[:, :4] *= 8  # outlier channels: scales differ a lot between rows
    w = torch.randn(n, k, generator=g)
    ws = weight_scale(w, 4)
    wc = quantize_weight(w, ws, 4)
    bias = torch.randn(n, generator=g)
    return x, wc, ws, bias


def reference(x: torch.Tensor, wc: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    a_int, a_scale = integer_activation(x, 4, 0.9)
    return integer_linear(a_int, a_scale, wc.float(), ws.reshape(-1), bias)


def run(x, wc, ws, bias=None, residual=None, out_dtype=torch.float32, config=None) -> torch.Tensor:
    act = ops.quantize_rows(x.to(DEVICE), 4, 0.9)
    weight = ops.PackedWeight.from_codes(wc, ws, bias).to(DEVICE)
    res = None if residual is None else residual.to(DEVICE)
    return ops.w4a4_linear(act, weight, res, out_dtype=out_dtype, config=config).cpu()


def test_gemm_config_buckets():
    """M = 1, 17 and 300 fall in the three tile buckets (small M: weight-bandwidth bound; large M: MMA bound); every
    candidate's BK2 divides K/2, and a K/2 that no tuned BK2 divides falls back to BK2 = 32."""
    defaults = {m: ops.gemm_config(m, 256) for m in (1, 17, 300)}
    assert [defaults[m] for m in (1, 17, 300)] == [dict(zip(TILE_KEYS, tiles[0], strict=True))
                                                   for tiles in ops.GEMM_TILES.values()]
    assert len({d["BM"] for d in defaults.values()}) == 3
    for m in (1, 17, 130, 300):
        for k2 in (32, 96, 128, 256, 288):
            candidates = ops.gemm_candidates(m, k2)
            assert candidates[0] == ops.gemm_config(m, k2)
            assert all(k2 % c["BK2"] == 0 for c in candidates)
    assert [c["BK2"] for c in ops.gemm_candidates(17, 96)] == [32]


@pytest.mark.parametrize("k", [64, 192, 256, 576])  # K/2 = 32, 96, 128, 288: tuned BK2 or the 32 fallback
@pytest.mark.parametrize("m", [1, 17, 130])  # buckets small, mid, mid (several row tiles, the last partial)
def test_w4a4_linear_bit_identical(m, k):
    x, wc, ws, bias = make_layer(m, k)
    ref = reference(x, wc, ws, None)
    assert ref.abs().max() > 0
    assert torch.equal(run(x, wc, ws), ref)


@pytest.mark.parametrize("m", [1, 17, 130, 300])  # 300: the large bucket (its BM does not divide 300)
def test_w4a4_linear_bias_and_residual(m):
    x, wc, ws, bias = make_layer(m, 192, seed=1)
    residual = torch.randn(m, N_OUT) * 4
    assert torch.equal(run(x, wc, ws, bias), reference(x, wc, ws, bias))
    assert torch.equal(run(x, wc, ws, bias, residual), residual + reference(x, wc, ws, bias))


ALL_TILES = [(bucket, i) for bucket, tiles in ops.GEMM_TILES.items() for i in range(len(tiles))]


@pytest.mark.parametrize("bucket,index", ALL_TILES)
def test_w4a4_linear_every_tile_config(bucket, index):
    """M = 17, K = 512 (every tuned BK2 divides K/2 = 256) with each tile config of every bucket forced (the GPU
    autotuner may pick any of them): BM 16 gives two row tiles, the second wrapping its rows; larger BM one
    partial tile."""
    m, k = 17, 512
    config = dict(zip(TILE_KEYS, ops.GEMM_TILES[bucket][index], strict=True))
    x, wc, ws, bias = make_layer(m, k, seed=2)
    residual = torch.randn(m, N_OUT)
    got = run(x, wc, ws, bias, residual, config=config)
    assert torch.equal(got, residual + reference(x, wc, ws, bias))


@pytest.mark.parametrize("splits", [2, 4, 8])
@pytest.mark.parametrize("m,k", [(1, 512), (16, 576), (3, 1024)])
def test_w4a4_linear_split_k(m, k, splits):
    """Split-K (the M <= 16 autotune candidates ``GEMM_SPLITK``): int32 partial sums over K ranges added in the
    epilogue kernel give the one-pass bits, with bias, residual and float16 output; K/2 = 288 with BK2 = 32 leaves
    uneven ranges, 8 splits of K/2 = 256 at BK2 = 128 leave empty ones."""
    x, wc, ws, bias = make_layer(m, k, seed=3)
    residual = torch.randn(m, N_OUT)
    bk2 = 32 if k == 576 else 128
    config = {**dict(zip(TILE_KEYS, (16, 32, bk2, 1, 4, 4), strict=True)), "SPLITS": splits}
    got = run(x, wc, ws, bias, residual, config=config)
    assert torch.equal(got, residual + reference(x, wc, ws, bias))
    half = run(x, wc, ws, bias, residual.half(), out_dtype=torch.float16, config=config)
    assert torch.equal(half, run(x, wc, ws, bias, residual.half(), out_dtype=torch.float16))


def test_split_k_candidates():
    """M <= 16 with packed operands gets the split-K candidates after the tile table (the default stays one pass);
    larger M does not."""
    one = ops.linear_candidates(1, 2048, False, 90, True)
    assert "SPLITS" not in one[0] and {c.get("SPLITS") for c in one} == {None, 2, 4, 8}
    assert all("SPLITS" not in c for c in ops.linear_candidates(17, 2048, False, 90, True))
    assert all("SPLITS" not in c for c in ops.linear_candidates(1, 2048, True, 90, True))  # planar operands
    act = ops.quantize_rows(torch.randn(1, 64).to(DEVICE), 4)
    weight = ops.PackedWeight.from_codes(torch.randint(-8, 8, (16, 64)), torch.ones(16)).to(DEVICE)
    with pytest.raises(ops.KernelInputError, match="SPLITS=3 takes packed operands and a power-of-two"):
        ops.w4a4_linear(act, weight, config={**ops.gemm_config(1, 32), "SPLITS": 3})


def test_w4a4_linear_grouped_tile_order():
    """M = 600 with BM 64 and GROUP_M 8: ten row tiles in two groups, the last of 2 tiles (the grouped program
    order must still visit every (row tile, column tile) once)."""
    m, k = 600, 256
    x, wc, ws, bias = make_layer(m, k, n=200, seed=4)
    config = {"BM": 64, "BN": 64, "BK2": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
    assert torch.equal(run(x, wc, ws, bias, config=config), reference(x, wc, ws, bias))


@pytest.mark.parametrize("res_dtype", [torch.float32, torch.float16])
def test_w4a4_linear_float16_output(res_dtype):
    """out_dtype float16: the float32 result (bias and residual added in float32) rounded once to float16, so exactly
    ``ref.half()`` (tolerance 0: no other rounding is allowed)."""
    m, k = 17, 192
    x, wc, ws, bias = make_layer(m, k, seed=3)
    residual = (torch.randn(m, N_OUT) * 4).to(res_dtype)
    got = run(x, wc, ws, bias, residual, out_dtype=torch.float16)
    assert got.dtype == torch.float16
    ref = residual.float() + reference(x, wc, ws, bias)
    assert torch.equal(got, ref.half())
    assert not torch.equal(got.float(), ref)  # the float16 rounding did happen


def _codes_rows(codes: list[int], k: int, zero: list[int]) -> ops.PackedRows:
    q = torch.tensor(codes, dtype=torch.uint8)[:, None].expand(-1, k).contiguous()
    return ops.PackedRows(pack_uint4(q).to(DEVICE), torch.ones(len(codes), device=DEVICE),
                          torch.tensor(zero, dtype=torch.uint8, device=DEVICE), 4)


def test_w4a4_linear_extreme_codes_int32_exact():
    """Extreme codes, K = 4096: activation code 15 with zero point 0 (q - z = 15) and code 0 with zero point 15
    (q - z = -15, through the z * rowsum correction), all weights -8, unit scales: +-15 * 8 * 4096 = -+491520."""
    k, n = 4096, 16
    act = _codes_rows([15, 0], k, [0, 15])
    wc = torch.full((n, k), -8, dtype=torch.int8)
    weight = ops.PackedWeight.from_codes(wc, torch.ones(n)).to(DEVICE)
    assert int(weight.rowsum[0]) == -8 * k
    y = ops.w4a4_linear(act, weight).cpu()
    assert y[0].tolist() == [-491520.0] * n and y[1].tolist() == [491520.0] * n
    a_int = torch.tensor([[15.0], [-15.0]]).expand(-1, k)
    assert torch.equal(y, integer_linear(a_int, torch.ones(2, 1), wc.float(), torch.ones(n)))


def test_w4a4_linear_int32_accumulator_beyond_float32_range():
    """K = 2^18 > 139810 (numerics.md: the float32 GEMM stays exact only below this): the accumulator must be an
    integer. Activation codes 15, z = 0; weight row j holds j sevens and K - j eights (-8):
    acc_j = -120 K + 225 j, |acc| ~ 3.1e7 > 2^24, odd for odd j, so not a float32 value: the output must be the
    exact integer rounded once to float32 (as int32 -> float32 conversion does)."""
    k, n = 1 << 18, 16
    act = _codes_rows([15], k, [0])
    wc = torch.full((n, k), -8, dtype=torch.int8)
    for j in range(n):
        wc[j, :j] = 7
    weight = ops.PackedWeight.from_codes(wc, torch.ones(n)).to(DEVICE)
    exact = torch.tensor([-120 * k + 225 * j for j in range(n)], dtype=torch.int64)
    assert exact.abs().min() > 2**24 and not torch.equal(exact.float().long(), exact)  # some are not float32 values
    # the interpreter takes long K steps to stay fast; compiled, the default tiles (BK2 = 64, 2048 steps)
    config = {"BM": 16, "BN": 16, "BK2": 4096, "GROUP_M": 1, "num_warps": 4, "num_stages": 1} if interpreted() \
        else None
    y = ops.w4a4_linear(act, weight, config=config).cpu()
    assert torch.equal(y[0], exact.float())
