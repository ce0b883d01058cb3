"""The Gluon sm_90 GEMM (``plugins/infoquant_kernels/gemm_wgmma.py``) on the CPU: its own source run on numpy
(``gluon_numpy``; Gluon has no interpreter) with Hopper's asynchronous ops as a sequential protocol model
(``HopperModel``): every barrier wait must find its phase completed and be that barrier's next phase (else the GPU
would hang or read a stale stage), no stage may be refilled while an MMA group not yet retired reads it, no output
buffer rewritten while a TMA store still reads it. Its values must be the ``tl`` plane GEMM's bits (interpreter).
What the model cannot show (the hardware's timing, the compiled code) needs the GPU test
(``tests/gpu/test_variants_gpu.py::test_wgmma_gemm_same_bits``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from infoquant_kernels import gemm_wgmma as gw  # noqa: E402

from infoquant_export.kernels import ops  # noqa: E402
from infoquant_export.quant.primitives import activation_qparams, quantize_activation  # noqa: E402
from tests.kernels.conftest import DEVICE, INTERPRETER_WARNING  # noqa: E402
from tests.kernels.gluon_numpy import HopperModel, Pointer, ProtocolError, descriptor, gl_numpy, on_numpy  # noqa: E402
from tests.kernels.test_gemm import make_layer, reference  # noqa: E402

pytestmark = pytest.mark.filterwarnings(INTERPRETER_WARNING)
PLANES = {"W_PLANES": 1, "SWAP": 0}


def wgmma_on_numpy(act: ops.PackedRows, weight: ops.PackedWeight, residual: torch.Tensor | None, tile: tuple,
                   persistent: bool = False, programs: int = 2, kernel_module: object = gw) -> torch.Tensor:
    """``w4a4_linear(..., config={"WGMMA": 1, ...})`` (output in the residual's dtype, float16 without one): every
    program of the grid in turn, on numpy, through the protocol model (one model per program: programs share
    nothing but global memory)."""
    bm, bn, bk2, group_m, warps, stages = tile
    m, n, k = act.codes.shape[0], weight.planes.shape[0], act.codes.shape[1]
    out_dtype = np.float16 if residual is None else residual.numpy().dtype
    y = np.zeros((m, n), out_dtype)
    res = None if residual is None else residual.numpy()
    ptr = lambda t: Pointer(t.contiguous().reshape(-1).numpy())  # noqa: E731
    args = (descriptor(act.codes.numpy(), [bm, 2 * bk2]), ptr(act.scale), ptr(act.zero),
            descriptor(weight.planes.numpy(), [bn, 2 * bk2]), ptr(weight.scale), ptr(weight.rowsum),
            ptr(weight.bias), descriptor(res if res is not None else y, [bm, bn]), descriptor(y, [bm, bn]), m, n, k)
    consts = dict(HAS_BIAS=True, HAS_RES=res is not None, GROUP_M=group_m, STAGES=stages, ACC_LAYOUT=None)
    tiles = -(-m // bm) * -(-n // bn)
    grid = min(tiles, programs) if persistent else tiles
    for p in range(grid):
        model = HopperModel()
        shim = gl_numpy(warps, [p])
        shim.allocate_shared_memory = model.allocate
        name = "w4a4_gemm_wgmma_persistent_kernel" if persistent else "w4a4_gemm_wgmma_kernel"
        kernel = on_numpy(kernel_module, name, shim, tl=shim, **model.replace)
        kernel(*args, **consts, **({"NUM_PROGRAMS": programs} if persistent else {}))
        model.check_end()
    return torch.from_numpy(y)


@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("m,k,stages", [(40, 256, 3), (16, 192, 4), (40, 128, 2)])
def test_wgmma_source_on_numpy_same_bits(m, k, stages, persistent):
    """The plane GEMM's bits (bias, residual; M = 40 and N = 80 leave partial tiles, several K steps per tile, the
    ring wrapping around its stages; the persistent form with 2 programs over 9 or 3 tiles, its ring running on
    into the next tile)."""
    x, wc, ws, bias = make_layer(m, k, seed=m + k)
    residual = (torch.randn(m, 80) * 4).half()
    act = ops.quantize_rows_variant(x.to(DEVICE), 4, 0.9, planes=True)
    weight = ops.PackedWeight.from_codes(wc, ws, bias).to(DEVICE).with_planes()
    ref = ops.w4a4_linear(act, weight, residual.to(DEVICE), out_dtype=torch.float16,
                          config={"BM": 16, "BN": 32, "BK2": 16, "GROUP_M": 2, "num_warps": 4, "num_stages": 2,
                                  **PLANES}).cpu()
    got = wgmma_on_numpy(act, weight, residual, (16, 32, 16, 2, 4, stages), persistent)
    assert torch.equal(got, ref), float((got.float() - ref.float()).abs().max())
    no_res = ops.w4a4_linear(act, weight, None, out_dtype=torch.float16,
                             config={"BM": 16, "BN": 32, "BK2": 16, "GROUP_M": 2, "num_warps": 4, "num_stages": 2,
                                     **PLANES}).cpu()
    assert torch.equal(wgmma_on_numpy(act, weight, None, (16, 32, 16, 2, 4, stages), persistent), no_res)


def test_protocol_model_catches_a_stage_refilled_too_early(monkeypatch):
    """The model is not blind: a kernel that waits for no MMA group before refilling (``num_outstanding`` = 2
    instead of 1) overwrites a stage that a group in flight still reads, and one that waits for the wrong phase
    would hang."""
    x, wc, ws, bias = make_layer(40, 256, seed=1)
    act = ops.quantize_rows_variant(x.to(DEVICE), 4, 0.9, planes=True)
    weight = ops.PackedWeight.from_codes(wc, ws, bias).to(DEVICE).with_planes()
    source = open(gw.__file__).read()
    for old, new, message in (("num_outstanding=1", "num_outstanding=2", "MMA group not yet retired"),
                              ("(i // STAGES) & 1)", "(i // STAGES + 1) & 1)", "would never return")):
        assert old in source
        mutated = type(gw)("gemm_wgmma_mutated")
        mutated.__dict__.update({k: v for k, v in vars(gw).items() if k.startswith("__") and k != "__dict__"})
        exec(compile(source.replace(old, new), gw.__file__, "exec"), mutated.__dict__)
        with pytest.raises(ProtocolError, match=message):
            wgmma_on_numpy(act, weight, None, (16, 32, 16, 2, 4, 3), kernel_module=mutated)


@pytest.mark.parametrize("tile,persistent", [(t, False) for t in ops.GEMM_WGMMA_TILES]
                         + [(t, True) for t in ops.GEMM_WGMMA_PERSISTENT_TILES])
def test_wgmma_tiles_on_numpy_against_primitives(tile, persistent):
    """The tiles the wrapper launches (``GEMM_WGMMA_TILES``, the persistent ones), float32 out, against the numerics
    primitives bit for bit (as tests/kernels/test_gemm.py judges the ``tl`` GEMM): M = 300 and N = 320 leave partial
    tiles; K = 512 is the shortest K the 4-stage tiles take (4 K steps of 128 plane columns)."""
    m, k, n = 300, 512, 320
    x, wc, ws, bias = make_layer(m, k, n, seed=7)
    residual = torch.randn(m, n) * 4
    scale, zero = activation_qparams(x, 4, 0.9)  # the activation planes from the primitives (the interpreter's
    codes = quantize_activation(x, scale, zero, 4).to(torch.int8)  # quantize of 300 rows takes 8 s)
    act = ops.PackedRows(torch.cat([codes[:, 0::2], codes[:, 1::2]], 1), scale.reshape(-1),
                         zero.reshape(-1).to(torch.uint8), planes=True)
    weight = ops.PackedWeight.from_codes(wc, ws, bias).with_planes()
    got = wgmma_on_numpy(act, weight, residual, tile, persistent, programs=4)
    assert torch.equal(got, residual + reference(x, wc, ws, bias))
