"""The performance variants (issue 6) in Triton's interpreter: the same bits as the default kernels and the
primitives. GEMM operand layouts (``w4a4_gemm_v2_kernel``: int8 planes, swapped MMA), the planar and chunked
activation quantization (``quantize_rows_variant``), the weight planes (``PackedWeight.with_planes``)."""

from __future__ import annotations

import itertools

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

from infoquant_export.kernels import aot, kernel_module, linear, ops, rows  # noqa: E402
from tests.kernels.conftest import DEVICE, INTERPRETER_WARNING  # noqa: E402
from tests.kernels.test_gemm import make_layer, reference  # noqa: E402

pytestmark = pytest.mark.filterwarnings(INTERPRETER_WARNING)
SMALL = {"BM": 16, "BN": 32, "BK2": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}


def _planes(packed: torch.Tensor) -> torch.Tensor:
    """Packed unsigned codes [M, n/2] -> int8 planes [M, n] (even elements, then odd elements)."""
    return torch.cat([packed & 15, packed >> 4], dim=1).to(torch.int8)


@pytest.mark.parametrize("n,blocks", [(256, None), (200, None), (256, 1), (192, 3), (512, 8), (448, 7)])
def test_quantize_variants_same_bits(n, blocks):
    """Every variant gives the row kernel's bits; the chunked kernel also with power-of-two Hadamard blocks
    (8 / 7 blocks of 64 in chunks of 64 or 128: the chunks rotate their blocks as loaded; 7 blocks leave the last
    chunk half masked). Other rotations fall back to the row kernel."""
    x = torch.randn(5, n) * 3
    x[1] *= 30
    x[2, :3] = torch.tensor([7.5, -7.5, 0.5])  # a tie-prone row
    ref = ops.quantize_rows(x.to(DEVICE), 4, 0.9, None, blocks)
    for chunk, planes in itertools.product((None, 64, 128), (False, True)):
        got = ops.quantize_rows_variant(x.to(DEVICE), 4, 0.9, None, blocks, chunk=chunk, planes=planes)
        assert got.planes == planes
        assert torch.equal(got.codes, _planes(ref.codes) if planes else ref.codes), (chunk, planes)
        assert torch.equal(got.scale, ref.scale) and torch.equal(got.zero, ref.zero)
    assert ops.quantize_rows_variant(x.to(DEVICE), 4, 0.9, None, blocks, chunk=64).k2 == n // 2
    piped = ops.quantize_rows_variant(x.to(DEVICE), 4, 0.9, None, blocks, chunk=64, stages=3)  # cp.async on a GPU
    assert torch.equal(piped.codes, ref.codes) and torch.equal(piped.scale, ref.scale)


def test_weight_planes():
    wc = torch.randint(-8, 8, (8, 64), dtype=torch.int8)
    w = ops.PackedWeight.from_codes(wc, torch.ones(8)).with_planes()
    assert w.planes.dtype == torch.int8 and torch.equal(w.planes, torch.cat([wc[:, 0::2], wc[:, 1::2]], 1))
    assert torch.equal(w.to("cpu").planes, w.planes)


@pytest.mark.parametrize("m,k", [(17, 128), (40, 192)])  # K/2 = 64 (two K steps of 32), 96; M, N = 80 partial
def test_gemm_layouts_same_bits(m, k):
    x, wc, ws, bias = make_layer(m, k, seed=m)
    residual = torch.randn(m, 80) * 4
    ref = residual + reference(x, wc, ws, bias)
    act = ops.quantize_rows(x.to(DEVICE), 4, 0.9)
    act_p = ops.quantize_rows_variant(x.to(DEVICE), 4, 0.9, planes=True)
    w = ops.PackedWeight.from_codes(wc, ws, bias).to(DEVICE).with_planes()
    res = residual.to(DEVICE)
    for a_planes, w_planes, swap in itertools.product((False, True), (False, True), (False, True)):
        cfg = {**SMALL, "W_PLANES": int(w_planes), "SWAP": int(swap)}
        got = ops.w4a4_linear(act_p if a_planes else act, w, res, config=cfg).cpu()
        assert torch.equal(got, ref), (a_planes, w_planes, swap)
    for a_planes, w_planes, persistent in itertools.product((False, True), (False, True), (0, 1)):  # descriptors
        cfg = {**SMALL, "W_PLANES": int(w_planes), "SWAP": 0, "TMA": 1, "PERSISTENT": persistent}
        got = ops.w4a4_linear(act_p if a_planes else act, w, res, config=cfg).cpu()
        assert torch.equal(got, ref), ("tma", a_planes, w_planes, persistent)
    for out_dtype in (torch.float32, torch.float16):  # the library's int8 GEMM on the planes + the epilogue kernel
        cfg = {**ops.GEMM_INT_MM_EPILOGUE, "INT_MM": 1}
        got = ops.w4a4_linear(act_p, w, res.to(out_dtype), out_dtype=out_dtype, config=cfg).cpu()
        assert torch.equal(got, ref if out_dtype == torch.float32 else ops.w4a4_linear(
            act_p, w, res.half(), out_dtype=torch.float16, config=SMALL).cpu()), ("int_mm", out_dtype)
    # the defaults: planar activations (swap), weight planes from M >= W_PLANES_MIN_M, the GEMM_PLANE_TILES configs
    assert torch.equal(ops.w4a4_linear(act_p, w, res).cpu(), ref)
    assert torch.equal(ops.w4a4_linear(act, w, res).cpu(), ref)


def test_int_mm_candidate():
    """The INT_MM config joins the autotune candidates on a GPU for M > 16 when both operands are planes."""
    assert ops.linear_candidates(17, 2048, True, 90, True, int_mm_ok=True)[-1] == {**ops.GEMM_INT_MM_EPILOGUE,
                                                                                  "INT_MM": 1}
    assert all("INT_MM" not in c for c in ops.linear_candidates(16, 2048, True, 90, True, int_mm_ok=True))
    assert all("INT_MM" not in c for c in ops.linear_candidates(17, 2048, True, 90, True, int_mm_ok=False))
    assert all("INT_MM" not in c for c in ops.linear_candidates(17, 2048, True, None, False, int_mm_ok=True))


def test_variant_bad_input():
    x = torch.randn(4, 64)
    with pytest.raises(ops.KernelInputError, match="power of two"):
        ops.quantize_rows_variant(x, 4, chunk=100)
    with pytest.raises(ops.KernelInputError, match="stages=0 is below 1"):
        ops.quantize_rows_variant(x, 4, chunk=64, stages=0)
    with pytest.raises(ops.KernelInputError, match="4-bit"):
        ops.quantize_rows_variant(x, 8, planes=True)
    act = ops.quantize_rows(x.to(DEVICE), 4)
    w = ops.PackedWeight.from_codes(torch.zeros(16, 64, dtype=torch.int8), torch.ones(16)).to(DEVICE)
    with pytest.raises(ops.KernelInputError, match="no planes"):
        ops.w4a4_linear(act, w, config={**SMALL, "W_PLANES": 1})
    with pytest.raises(ops.KernelInputError, match="TMA=1"):
        ops.w4a4_linear(act, w, config={**SMALL, "TMA": 1, "SWAP": 1})
    with pytest.raises(ops.KernelInputError, match="PERSISTENT=1 is a mode of the tensor-descriptor kernel"):
        ops.w4a4_linear(act, w, config={**SMALL, "PERSISTENT": 1})
    odd = ops.PackedWeight.from_codes(torch.zeros(6, 64, dtype=torch.int8), torch.ones(6)).to(DEVICE)
    with pytest.raises(ops.KernelInputError, match="16 bytes"):  # fp16 rows of 6 outputs: 12 bytes
        ops.w4a4_linear(act, odd, out_dtype=torch.float16, config={**SMALL, "TMA": 1})
    with pytest.raises(ops.KernelInputError, match="INT_MM=1 takes int8 planes of both operands"):
        ops.w4a4_linear(act, w.with_planes(), config={**ops.GEMM_INT_MM_EPILOGUE, "INT_MM": 1})
    with pytest.raises(ops.KernelInputError, match="WGMMA=1 takes int8 planes of both operands"):
        ops.w4a4_linear(act, w.with_planes(), config={**SMALL, "W_PLANES": 1, "WGMMA": 1})
    act_p = ops.quantize_rows_variant(x.to(DEVICE), 4, planes=True)
    with pytest.raises(ops.KernelInputError, match="sm_90 Gluon kernel"):  # the interpreter, or a GPU other than sm_90
        ops.w4a4_linear(act_p, w.with_planes(), config={**SMALL, "W_PLANES": 1, "SWAP": 0, "WGMMA": 1})
    with pytest.raises(ops.KernelInputError, match="gluon=True takes 4-bit packed codes of rows of 1024-8192"):
        ops.quantize_rows_variant(torch.randn(4, 4096), 4, hadamard_blocks=2, gluon=True)
    with pytest.raises(ops.KernelInputError, match="gluon=True is compiled GPU code"):
        ops.quantize_rows_variant(torch.randn(4, 4096).to(DEVICE), 4, hadamard_blocks=1, gluon=True)
    with pytest.raises(ops.KernelInputError, match="prefetches 2 K steps of 64, more than in_features 64"):
        ops.w4a4_linear(act_p, w.with_planes(), config={**SMALL, "num_stages": 3, "W_PLANES": 1, "WGMMA": 1})
    bad = ops.PackedWeight(w.codes, w.scale, w.rowsum, planes=torch.zeros(16, 32, dtype=torch.int8, device=DEVICE))
    with pytest.raises(ops.KernelInputError, match="planes"):
        ops.w4a4_linear(act, bad)


def test_autotune_skips_a_failing_candidate():
    """A non-default candidate that raises (an untested tensor-descriptor tile, say) is skipped and recorded; the
    default's own error propagates."""
    last: dict = {}

    def run(cfg):
        last.clear()
        last.update(cfg)
        if cfg["BM"] == 2:
            raise RuntimeError("descriptor encode failed")

    def timer(fn):
        fn()
        return {1: 2.0, 3: 1.0}[last["BM"]]

    key = ("test_autotune_skips_a_failing_candidate",)
    linear._TUNED.pop(key, None)
    assert linear._autotune(key, run, [{"BM": 1}, {"BM": 2, "TMA": 1}, {"BM": 3}], timer) == {"BM": 3}
    assert "descriptor encode failed" in linear.TUNE_ERRORS[(key, (("BM", 2), ("TMA", 1)))]
    with pytest.raises(RuntimeError, match="descriptor"):
        linear._autotune(("test_autotune_default_error",), run, [{"BM": 2}, {"BM": 1}], timer)


def test_wgmma_candidates_opt_in():
    """The Gluon GEMM joins the autotune candidates only when asked (``WGMMA_CANDIDATES``), on sm_90, for M > 16
    with both operands as planes; M <= 256 keeps the tiles that still fill the SMs, M > 256 adds the persistent
    form."""
    def wgmma(m, cc=90, ok=True, k2=2048):
        return [c for c in ops.linear_candidates(m, k2, True, cc, True, True, ok) if c.get("WGMMA")]

    assert not wgmma(2048, ok=False) and not wgmma(2048, cc=89) and not wgmma(16)
    assert len(wgmma(2048)) == len(ops.GEMM_WGMMA_TILES) + len(ops.GEMM_WGMMA_PERSISTENT_TILES)
    assert {(c["BM"], c["BN"]) for c in wgmma(256)} == {(128, 128), (64, 128)}
    assert sum(c.get("PERSISTENT", 0) for c in wgmma(256)) == 0
    assert not wgmma(2048, k2=64)  # K = 128: fewer K steps than any tile's prologue prefetches


def test_autotune_drops_a_candidate_with_other_bits():
    """A candidate of a kernel no GPU has validated (``WGMMA``) is compared with the default's bits before it is
    timed; if they differ it is dropped and recorded, however fast."""
    last: dict = {}

    def run(cfg):
        last.clear()
        last.update(cfg)

    def timer(fn):
        fn()
        return {1: 2.0, 2: 0.5, 3: 1.0}[last["BM"]]

    key = ("test_autotune_drops_a_candidate_with_other_bits",)
    linear._TUNED.pop(key, None)
    candidates = [{"BM": 1}, {"BM": 2, "WGMMA": 1}, {"BM": 3, "WGMMA": 1}]
    chosen = linear._autotune(key, run, candidates, timer, same_bits=lambda cfg: cfg["BM"] != 2)
    assert chosen == {"BM": 3, "WGMMA": 1}
    assert linear.TUNE_ERRORS[(key, (("BM", 2), ("WGMMA", 1)))] == "different bits from the default config"
    linear._TUNED.pop(key, None)
    assert linear._autotune(key, run, candidates, timer, same_bits=lambda cfg: True) == {"BM": 2, "WGMMA": 1}


def test_chunked_kernel_rotates_power_of_two_blocks(monkeypatch):
    """The chunked kernel takes rows with a block-diagonal Hadamard of power-of-two blocks no larger than the
    chunk (43 blocks of 256 at 11008 in chunks of 1024, with the SwiGLU prologue); larger blocks or a Paley K fall
    back to the row kernel. ``quantize_rows`` takes the chunked form (``CHUNK_ROTATED``, timed on an H200)."""
    module = kernel_module("quantize")
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launches.append(grid)
            return self.kernel[grid]

    monkeypatch.setattr(module, "quantize_rows_chunked_kernel", Recorder(module.quantize_rows_chunked_kernel))
    monkeypatch.setattr(rows, "FEW_ROWS", 0)  # the routing of many rows (a prefill) with 2 rows
    gate_up = (torch.randn(2, 2 * 11008) * 2).half().to(DEVICE)
    ref = ops.quantize_rows_variant(gate_up, 4, 0.9, None, 43, prologue=ops.SWIGLU)  # the one-pass row kernel
    assert not launches and ops.CHUNK_ROTATED
    got = ops.quantize_rows(gate_up, 4, 0.9, None, 43, prologue=ops.SWIGLU)  # chunks of ops.CHUNK = 1024
    assert len(launches) == 1
    assert torch.equal(got.codes, ref.codes) and torch.equal(got.scale, ref.scale) and torch.equal(got.zero, ref.zero)
    for n, blocks, chunk in ((512, 2, 128), (192, 1, 1024)):  # a 256 block in 128 chunks; Paley K = 12
        ops.quantize_rows_variant(torch.randn(2, n).to(DEVICE), 4, 0.9, None, blocks, chunk=chunk)
    assert len(launches) == 1


@pytest.mark.parametrize("few_rows", [128, 0])
def test_few_rows_take_the_latency_kernels(monkeypatch, few_rows):
    """Which kernels LLaMA-2-7B's down_proj input (SwiGLU, then the 11008 = 172 x 64 Hadamard) launches for 2 rows:
    fewer than ``FEW_ROWS`` (a decode step) -> the FWHT pass with a program per chunk, the K step with
    ``K_STEP_TILE_FEW_ROWS``, the one-pass row kernel with ``FEW_ROWS_WARPS`` warps; as for many rows
    (``FEW_ROWS`` 0) -> a program per row and the chunked quantize kernel. Recorded, not run (the bits of both
    routes: tests/kernels/test_quantize.py)."""
    monkeypatch.setattr(rows, "FEW_ROWS", few_rows)
    gate_up = torch.empty(2, 2 * 11008, dtype=torch.float16, device=DEVICE)
    with aot.recorded_launches("quantize") as launches:
        ops.quantize_rows(gate_up, 4, 0.9, None, 1, prologue=ops.SWIGLU)
    got = [(launch.kernel, launch.kwargs.get("CHUNK_GRID"), launch.kwargs.get("QUANT"), launch.kwargs.get("BA"),
            launch.kwargs.get("num_warps")) for launch in launches]
    if few_rows:
        assert got == [("quantize_rows_chunked_kernel", True, False, None, 4),
                       ("hadamard_k_step_kernel", None, None, 16, 2),  # K_STEP_TILE_FEW_ROWS
                       ("hadamard_quantize_kernel", None, True, None, rows.FEW_ROWS_WARPS)]
    else:
        assert got == [("quantize_rows_chunked_kernel", False, False, None, 4),
                       ("hadamard_k_step_kernel", None, None, 64, 4),
                       ("quantize_rows_chunked_kernel", False, True, None, 4)]
