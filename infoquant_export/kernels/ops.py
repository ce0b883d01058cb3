"""Checked Python entry points of the W4A4KV4 kernels (numerics.md sections 1, 3, 4, 5).

Every function validates shapes, dtypes, devices and contiguity and raises :class:`KernelInputError` (a one-line
``UserError``) naming the constraint, before anything is launched. Tensors must all be on one CUDA device, or all
on the CPU when the kernels run in Triton's interpreter.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache

import torch

from infoquant_export.errors import UserError
from infoquant_export.kernels import interpreted, kernel_module
from infoquant_export.quant.primitives import pack_int4, unpack_int4
from infoquant_export.transforms.hadamard import hadamard_block, hadamard_factors

MAX_ROW_TILE = 32768  # one program holds a row tile of at most this many float32 values
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class KernelInputError(UserError):
    """An input the kernels do not support (shape, dtype, device, layout)."""


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _check_device(*tensors: torch.Tensor) -> torch.device:
    device = tensors[0].device
    for t in tensors:
        if t.device != device:
            raise KernelInputError(f"kernel inputs on different devices ({device} and {t.device})",
                                   "move every tensor to one CUDA device")
    if interpreted() and device.type != "cpu":
        raise KernelInputError(f"TRITON_INTERPRET=1 runs kernels on CPU tensors, got {device}",
                               "unset TRITON_INTERPRET to run compiled kernels on the GPU")
    if not interpreted() and device.type != "cuda":
        raise KernelInputError(f"compiled kernels need CUDA tensors, got {device}",
                               "move the tensors to a CUDA device (or set TRITON_INTERPRET=1 before import)")
    return device


def _check_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise KernelInputError(f"{name} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()})",
                               f"pass {name}.contiguous()")


def _check_dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        raise KernelInputError(f"{name} has dtype {t.dtype}; the kernel takes {', '.join(map(str, allowed))}",
                               f"convert {name} with .to(...)")


def _check_bits(bits: int) -> None:
    if bits not in (4, 8):
        raise KernelInputError(f"the kernels quantize to 4 or 8 bits, not {bits}",
                               "use --a-bits/--kv-bits 4 or 8, or the fake-quant model")


FUSED_K_ROWS = 64  # the fused kernel does the H_K^T step as one float64 dot of at most this many rows


@cache
def _hk_t(k: int, copies: int, pad: int, device: str) -> torch.Tensor:
    """``blockdiag(H_K^T, ...)`` (``copies`` blocks, each zero padded to ``pad``) in float32 (+-1 and 0: exact)."""
    return torch.block_diag(*[_hk_t_padded(k, pad, pad, "cpu")] * copies).to(device)


@cache
def _hk_t_padded(k: int, rows: int, cols: int, device: str) -> torch.Tensor:
    """``H_K^T`` as float32 ``[rows, cols]`` (rows, cols >= k), zero padded; the K-step kernels widen it to float64
    (+-1 and 0 are exact in float32: half the bytes of a float64 operand)."""
    out = torch.zeros(rows, cols, dtype=torch.float32)
    out[:k, :k] = torch.tensor(hadamard_block(k), dtype=torch.float32).T
    return out.to(device)


@dataclass(frozen=True)
class RowTile:
    """How a row of ``num_blocks * n_block`` values maps onto the kernel's [NBP, KP, P] tile."""

    nb: int
    n_block: int
    k: int
    p: int
    rotate: bool

    @property
    def kp(self) -> int:
        return max(16, _pow2(self.k)) if self.k > 1 else 1

    @property
    def elements(self) -> int:
        return _pow2(self.nb) * self.kp * self.p

    @property
    def fused(self) -> bool:
        """Whether the kernel applies the whole rotation (else the K step runs in ``hadamard_k_step_kernel``)."""
        return not self.rotate or self.k == 1 or _pow2(self.nb) * self.kp <= FUSED_K_ROWS

    def constexprs(self) -> dict[str, int | bool]:
        return {"NB": self.nb, "NBP": _pow2(self.nb), "N_BLOCK": self.n_block, "K": self.k, "KP": self.kp,
                "P": self.p, "LOG2P": int(math.log2(self.p)), "ROTATE": self.rotate}


def row_tile(n: int, num_blocks: int, rotate: bool, bits: int = 4) -> RowTile:
    """The tile for rows of length ``n`` split into ``num_blocks`` blocks (Hadamard blocks or quantization groups)."""
    if num_blocks < 1 or n % num_blocks:
        raise KernelInputError(f"a row of {n} values does not split into {num_blocks} equal blocks",
                               "use a block count that divides the row length")
    n_block = n // num_blocks
    if rotate:
        k, p = hadamard_factors(n_block)  # raises HadamardSizeError (a UserError) for sizes without a construction
        if k > 1 and p < 16:
            raise KernelInputError(f"Hadamard block {n_block} = {k} x {p}: the kernel needs a power-of-2 factor >= 16",
                                   "use the fake-quant model for this size")
    else:
        if n_block % 2 and bits == 4:
            raise KernelInputError(f"4-bit codes pack in pairs; a block of {n_block} values is odd",
                                   "use an even row / head size")
        k, p = 1, _pow2(max(n_block, 2))
    tile = RowTile(num_blocks, n_block, k, p, rotate)
    if tile.elements > MAX_ROW_TILE and tile.fused:
        raise KernelInputError(f"a row of {n} values needs a {tile.elements}-value tile (limit {MAX_ROW_TILE})",
                               "split the rotation into more blocks or use the fake-quant model")
    return tile


def row_warps(elements: int) -> int:
    """Warps per row program. Measured on an H200 (docs/bench/variants-h200.json, 4096 rows): 4 warps beat 8/16 at
    4096 elements (with and without the Hadamard) and at 16384 with the Hadamard (43 blocks of 256: 0.20 vs
    0.32 ms); every warp count computes the same bits."""
    return 4 if elements <= 16384 else 8


@dataclass
class PackedRows:
    """Per-row quantized values: codes ``[M, n/2]`` uint8 (4-bit, packed) or ``[M, n]`` (8-bit),
    scale ``[M]`` float32, zero point ``[M]`` uint8.

    ``planes=True`` (4-bit only, from ``quantize_rows_variant(..., planes=True)``): codes are int8 ``[M, n]``, each
    row the even elements (the low nibbles) then the odd elements (the high nibbles), unpacked -- the prefill GEMM
    operand that goes to the tensor cores without a register unpack."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int = 4
    planes: bool = False

    @property
    def k2(self) -> int:
        """Packed bytes per row (n/2) of 4-bit codes, in either layout."""
        return self.codes.shape[1] // 2 if self.planes else self.codes.shape[1]


def _f32(value: float) -> float:
    """``value`` rounded to float32 (as the Python float the kernel receives as an fp32 argument)."""
    return struct.unpack("f", struct.pack("f", value))[0]


@cache
def _inv_sqrt(n: int) -> float:
    """The float32 constant ``1/sqrt(n)`` of numerics.md section 1 (as a Python float holding that value)."""
    return _f32(1.0 / math.sqrt(n))


PRE_NONE, PRE_RMSNORM, PRE_SWIGLU, PRE_ROPE, PRE_SCALE = 0, 1, 2, 3, 4  # quantize.py's PRE_* prologue numbers


@dataclass(frozen=True)
class Prologue:
    """What the row kernels compute from the loaded row before rotating / quantizing it (quantize.py
    ``_prologue``): ``kind`` PRE_*, its operands, and whether the result is rounded to the input dtype."""

    kind: int = PRE_NONE
    aux: torch.Tensor | None = None   # RMSNorm weight (float32 [n]) / RoPE cos (float32 [seq, head_dim])
    aux2: torch.Tensor | None = None  # RMSNorm eps (float64 [1]) / RoPE sin (float32 [seq, head_dim])
    up_offset: int = 0                # SwiGLU: elements from g to u within a row
    round: bool = False
    row_scale: float = 1.0            # PRE_SCALE: the float32 multiplier

    def operands(self, dummy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (dummy if self.aux is None else self.aux), (dummy if self.aux2 is None else self.aux2)


def rmsnorm_prologue(weight: torch.Tensor, eps: float) -> Prologue:
    """The RMSNorm ``x * (1 / sqrt(mean(x^2) + eps)) * weight`` in float64, rounded once to x's dtype
    (``models.model.rms_norm``), as the prologue of ``quantize_rows``. Build it once per norm: it holds the weight
    in float32 and eps as a float64 tensor on the weight's device (nothing is copied per call, so CUDA graphs can
    capture the calls)."""
    if weight.dim() != 1:
        raise KernelInputError(f"the RMSNorm weight has shape {tuple(weight.shape)}", "pass a 1-D norm weight")
    w = weight.detach().to(torch.float32).contiguous()
    return Prologue(PRE_RMSNORM, w, torch.tensor([eps], dtype=torch.float64, device=w.device), round=True)


@cache
def _sigmoid_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """sigmoid64 (rounded to float32) of every bit pattern of the 16-bit ``dtype``, indexed by the bits: the SwiGLU
    prologue's sigmoid of a float16 / bfloat16 gate without a float64 exp per element (same values)."""
    values = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).double()
    table = (1.0 / (1.0 + torch.exp(-values))).float()
    return table.roll(-32768).to(device)  # index = the unsigned bit pattern


SWIGLU = Prologue(PRE_SWIGLU, round=True)
"""``quantize_rows`` prologue: rows ``[g | u]`` of a fused gate/up output -> ``(g * sigmoid64(g)) * u`` (float32,
numerics.md section 5), rounded to the input dtype."""


@cache
def _no_pos(device: torch.device) -> torch.Tensor:
    """The int32 placeholder passed as the row kernel's ``pos_ptr`` when the position is an argument."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def _launch_rows(x2: torch.Tensor, tile: RowTile, *, quant: bool, per_block: bool, bits: int, clip: float,
                 clip_min: float, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, y: torch.Tensor,
                 seq_len: int, pos0: int, code_strides: tuple[int, int, int],
                 scale_strides: tuple[int, int, int], inv_sqrt: float | None = None,
                 num_warps: int | None = None, planes: bool = False, pre: Prologue | None = None,
                 stride_xr: int | None = None, pos: torch.Tensor | None = None, t_cap: int = 2**31 - 1) -> None:
    """``hadamard_quantize_kernel`` over the rows ``x2``; ``pos``: the first token position as an int32 ``[1]``
    device tensor instead of ``pos0`` (read by the kernel: CUDA graphs replay it at any position); tokens at
    positions outside ``[0, t_cap)`` are not written."""
    mod = kernel_module("quantize")
    pre = pre or Prologue()
    aux, aux2 = pre.operands(scale)
    k_step = tile.rotate and tile.k > 1
    hk = _hk_t(tile.k, _pow2(tile.nb), tile.kp, str(x2.device)) if k_step else scale
    rows = x2.shape[0]
    # the fused K step's float32 scratch (a padded row tile per program) is bounded: launches of at most
    # ``per_launch`` rows reuse it (16384-value tiles: 1024 rows, 64 MiB)
    per_launch = max(1, min(rows, SCRATCH_BYTES // (4 * tile.elements))) if k_step else rows
    scratch = torch.empty(per_launch * tile.elements if k_step else 1, dtype=torch.float32, device=x2.device)
    inv_sqrt = _inv_sqrt(tile.n_block) if inv_sqrt is None else inv_sqrt
    for row0 in range(0, rows, per_launch):
        mod.hadamard_quantize_kernel[(min(per_launch, rows - row0),)](
            x2, x2.stride(0) if stride_xr is None else stride_xr, hk, scratch, inv_sqrt, codes, scale, zero, y,
            y.stride(0) if y.dim() > 1 else 0, seq_len, pos0, _no_pos(x2.device) if pos is None else pos, t_cap,
            *code_strides,
            *scale_strides, _f32(clip), _f32(clip_min), aux, aux2, pre.up_offset, row0,
            **tile.constexprs(), QUANT=quant, PER_BLOCK=per_block, BITS=bits, PLANES=planes, PRE=pre.kind,
            ROUND=pre.round, ROW_SCALE=pre.row_scale, POS_PTR=pos is not None, K_DOT=k_dot(device_cc(x2.device)),
            SLICED=per_launch < rows, num_warps=num_warps or row_warps(tile.elements),
            enable_fp_fusion=False)


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    _check_dtype(name, x, FLOAT_DTYPES)
    _check_contiguous(name, x)
    if x.dim() < 1 or x.numel() == 0:
        raise KernelInputError(f"{name} is empty (shape {tuple(x.shape)})", f"pass at least one row in {name}")
    return x.reshape(-1, x.shape[-1])


K_STEP_TILE = (64, 16, 64, 4)
"""(BA, BK, BC, warps) of ``hadamard_k_step_kernel``: 64 x 64 float64 accumulators, K steps of 16 (sm_90's DMMA is
m16n8k16). Compiled on the CPU (``kernel-resources.json``): 160-167 registers on sm_80 / sm_90 (DMMA), 142 on
sm_86-89 (an FMA loop: no float64 tensor cores), no spills, 12 resident warps per SM everywhere. Not timed on a GPU
(``--sections variants`` times three more tiles)."""
MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y
SCRATCH_BYTES = 64 << 20  # the row kernel's K-step scratch per launch (rows beyond it go in further launches)


FLOAT64_TENSOR_CORES = (80, 90, 100)  # A100, H100 / H200, B200: DMMA at full rate


def k_dot(cc: int | None) -> bool:
    """Whether the row kernel's fused K step is a float64 ``tl.dot`` on compute capability ``cc``: where float64
    tensor cores exist and in the interpreter (None). Elsewhere (sm_86-89, sm_120, Jetson) the broadcast-and-sum,
    whose registers fit (on sm_89 the FMA form of the dot needs 96-104 registers where it needs 62, and spills 2728
    bytes at 5632 = 44 x 128)."""
    return cc is None or cc in FLOAT64_TENSOR_CORES


def _k_step_unfused(x2: torch.Tensor, tile: RowTile, pre: Prologue | None = None, scale: bool = False
                    ) -> torch.Tensor:
    """The block Hadamard for large K as float32 ``[m, n]``, two kernels: ``quantize_rows_chunked_kernel`` with
    ``QUANT=False`` (the prologue ``pre`` and the unnormalised FWHT of each p-sized block, written as float32, no
    padding of the K axis), then ``hadamard_k_step_kernel`` (H_K^T in float64, rounded once to float32; ``scale``:
    also ``* 1/sqrt(n_block)``) -- numerics.md section 1 steps 1-2 (3). An RMSNorm or RoPE prologue (whole-row
    or per-head) is applied by a launch of its own first."""
    m, n = x2.shape[0], tile.nb * tile.n_block
    pre = pre or Prologue()
    if pre.kind not in (PRE_NONE, PRE_SWIGLU):
        x2, pre = _apply_prologue(x2, n, pre), Prologue()
    fwht = torch.empty(m, n, dtype=torch.float32, device=x2.device)
    chunk = max(CHUNK, tile.p)
    _launch_chunked(x2, fwht, fwht, fwht, n, pre, chunk, rot_p=tile.p, quant=False)
    out = torch.empty_like(fwht)
    k_step(fwht.view(m * tile.nb, tile.n_block), out.view(m * tile.nb, tile.n_block), tile.k, tile.p,
           _inv_sqrt(tile.n_block) if scale else None)
    return out


def _launch_chunked(x2: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, n: int,
                    pre: Prologue, chunk: int, *, rot_p: int = 0, rot_scale: float = 1.0, clip: float = 1.0,
                    clip_min: float = 1.0, planes: bool = False, quant: bool = True, num_warps: int = 4) -> None:
    """``quantize_rows_chunked_kernel`` over the rows ``x2`` (row length ``n`` after the prologue ``pre``): the
    4-bit codes to ``out`` with ``scale`` / ``zero``, or (``quant=False``) the rotated rows as float32 to ``out``."""
    kernel_module("quantize").quantize_rows_chunked_kernel[(x2.shape[0],)](
        x2, x2.stride(0), out, out.stride(0), scale, zero, n, _f32(clip), _f32(clip_min), pre.up_offset,
        pre.operands(scale)[0], CH=chunk, PLANES=planes, PRE=pre.kind, ROUND=pre.round, ROW_SCALE=pre.row_scale,
        ROT_P=rot_p, LOG2P=max(rot_p, 1).bit_length() - 1, ROT_SCALE=rot_scale, QUANT=quant, num_warps=num_warps,
        enable_fp_fusion=False)


def k_step(y: torch.Tensor, out: torch.Tensor, k: int, p: int, out_scale: float | None = None,
           tiles: tuple[int, int, int, int] | None = None) -> None:
    """``out[r] = H_K^T @ y[r]`` for float32 rows ``y [R, k * p]`` seen as ``k x p`` (float64 sum rounded once to
    float32, then ``* out_scale`` in float32 when given): ``hadamard_k_step_kernel``."""
    for name, t in (("y", y), ("out", out)):
        _check_dtype(name, t, (torch.float32,))
        _check_contiguous(name, t)
        if t.dim() != 2 or t.shape != y.shape or t.shape[1] != k * p:
            raise KernelInputError(f"the K step takes rows [R, {k} * {p}] in and out, got {name} {tuple(t.shape)}",
                                   "pass y and out of shape [rows, k * p]")
    _check_device(y, out)
    ba, bk, bc, warps = tiles or K_STEP_TILE
    ka, kb = triton_cdiv(k, ba) * ba, triton_cdiv(k, bk) * bk
    ht = _hk_t_padded(k, ka, kb, str(y.device))
    step = max(1, MAX_GRID_Y * bc // p)  # rows per launch: the column tiles are the grid's y axis
    for r0 in range(0, y.shape[0], step):
        rows = min(step, y.shape[0] - r0)
        kernel_module("quantize").hadamard_k_step_kernel[(ka // ba, triton_cdiv(rows * p, bc))](
            y[r0:], out[r0:], ht, rows * p, _f32(out_scale or 1.0), K=k, P=p, LOG2P=p.bit_length() - 1, KB=kb,
            BA=ba, BK=bk, BC=bc, SCALE=out_scale is not None, num_warps=warps, enable_fp_fusion=False)


def _rotate_unfused(x2: torch.Tensor, tile: RowTile) -> torch.Tensor:
    """The block Hadamard for large K in float32: ``_k_step_unfused`` with the final ``* 1/sqrt(n)``."""
    return _k_step_unfused(x2, tile, scale=True)


CHUNKED_ABOVE, CHUNK = 8192, 1024
"""Rows longer than CHUNKED_ABOVE quantized without a fused rotation use the two-pass chunked kernel with chunks of
CHUNK (H200, 4096 x 11008: 0.066 vs 0.146 ms, 44 % vs 20 % of copy bandwidth: no padding to 16384). Same bits
(tests/gpu/test_variants_gpu.py)."""
QUANT_CHUNK: int | None = None
"""Default chunk of the two-pass quantize-only kernel (``quantize_rows_chunked_kernel``) for rows without
rotation, or None for the one-pass row-tile kernel. Either computes the same bits."""
CHUNK_ROTATED = False
"""Whether ``quantize_rows`` also sends long rows with a block-diagonal power-of-two Hadamard (e.g. 11008 = 43
blocks of 256) through the chunked kernel (same bits, no padding of 43 blocks to 64). Off until timed on a GPU:
``quantize_rows_variant(chunk=...)`` selects it explicitly."""


def quantize_rows(x: torch.Tensor, bits: int = 4, clip: float = 1.0, clip_min: float | None = None,
                  hadamard_blocks: int | None = None, num_warps: int | None = None, *,
                  prologue: Prologue | None = None, planes: bool = False) -> PackedRows:
    """Per-row asymmetric quantization of ``x [..., n]``, optionally after the block Hadamard (fused, one pass).

    Bit-identical to ``apply_hadamard`` + ``activation_qparams`` / ``quantize_activation`` + ``pack_uint4``.
    ``prologue``: ``rmsnorm_prologue(...)`` (the row is normed first) or ``SWIGLU`` (``x [..., 2n]`` holds the
    gate and up halves; the rows quantized are ``(g * sigmoid64(g)) * u``), computed as the row is loaded.
    ``planes``: the codes as int8 planes (``PackedRows.planes``), the operand of the plane GEMMs.
    """
    width = x.shape[-1] // (2 if prologue is not None and prologue.kind == PRE_SWIGLU else 1) if x.dim() else 0
    chunk = CHUNK if width > CHUNKED_ABOVE and QUANT_CHUNK is None else None
    return quantize_rows_variant(x, bits, clip, clip_min, hadamard_blocks, num_warps=num_warps, chunk=chunk,
                                 prologue=prologue, chunk_rotated=CHUNK_ROTATED, planes=planes)


def _row_prologue(x2: torch.Tensor, prologue: Prologue | None) -> tuple[int, Prologue]:
    """The quantized row length of rows ``x2`` under ``prologue`` (checked), and the prologue with its offsets."""
    pre = prologue or Prologue()
    n = x2.shape[1]
    if pre.kind == PRE_SWIGLU:
        if n % 2:
            raise KernelInputError(f"a SwiGLU row [gate | up] has an even width, got {n}",
                                   "pass the fused gate/up output")
        n //= 2
        pre = replace(pre, up_offset=n, aux=_sigmoid_table(x2.dtype, x2.device) if x2.element_size() == 2 else None)
    elif pre.kind == PRE_RMSNORM:
        if x2.dtype == torch.bfloat16:  # float64 -> bfloat16 in one rounding has no kernel form here
            raise KernelInputError("the RMSNorm prologue takes float16 or float32 rows, got bfloat16",
                                   "norm bfloat16 rows with models.model.rms_norm, then quantize them")
        if pre.aux.shape[0] != n:
            raise KernelInputError(f"the RMSNorm weight has {pre.aux.shape[0]} values, the rows {n}",
                                   "pass the norm of this layer's hidden size")
        _check_device(x2, pre.aux, pre.aux2)
    elif pre.kind != PRE_NONE:
        raise KernelInputError("quantize_rows takes the RMSNorm or SwiGLU prologue",
                               "apply RoPE through rope_rows / quantize_kv(rope=...)")
    return n, pre


def _apply_prologue(x2: torch.Tensor, n: int, pre: Prologue, blocks: int = 1) -> torch.Tensor:
    """The prologue's rows ``[m, n]`` (``blocks`` heads for RoPE) written out, in x2's dtype when the prologue
    rounds, else float32 (for the unfused-rotation path)."""
    y = torch.empty(x2.shape[0], n, dtype=x2.dtype if pre.round else torch.float32, device=x2.device)
    _launch_rows(x2, row_tile(n, blocks, False, 8), quant=False, per_block=False, bits=4, clip=1.0, clip_min=1.0,
                 codes=y, scale=y, zero=y, y=y, seq_len=x2.shape[0], pos0=0, code_strides=(0, 0, 0),
                 scale_strides=(0, 0, 0), pre=pre)
    return y


def quantize_rows_variant(x: torch.Tensor, bits: int = 4, clip: float = 1.0, clip_min: float | None = None,
                          hadamard_blocks: int | None = None, *, num_warps: int | None = None,
                          planes: bool = False, chunk: int | None = None,
                          prologue: Prologue | None = None, chunk_rotated: bool = True) -> PackedRows:
    """``quantize_rows`` with the kernel variants (same codes, scales and zero points):

    ``planes``: 4-bit codes written unpacked as int8 planes (``PackedRows.planes``; the prefill GEMM operand);
    ``chunk``: rows without rotation go through the two-pass chunked kernel with chunks of ``chunk`` values
    (a power of two >= 64; default ``QUANT_CHUNK``), ``num_warps`` then applies to it (default 4); so do rows
    with a Hadamard of power-of-two blocks no larger than ``chunk`` when ``chunk_rotated``. An RMSNorm prologue
    needs the whole row: those rows always go through the row-tile kernel.
    """
    _check_bits(bits)
    if planes and bits != 4:
        raise KernelInputError("planes=True holds 4-bit codes", "use bits=4 or planes=False")
    chunk = QUANT_CHUNK if chunk is None else chunk
    if chunk is not None and (chunk < 64 or chunk & (chunk - 1)):
        raise KernelInputError(f"chunk={chunk} is not a power of two >= 64", "pass a valid chunk or None")
    x2 = _rows(x, "x")
    _check_device(x2)
    n, pre = _row_prologue(x2, prologue)
    if hadamard_blocks is not None and hadamard_blocks < 1:
        raise KernelInputError(f"hadamard_blocks={hadamard_blocks}", "pass None (no rotation) or a block count >= 1")
    tile = row_tile(n, hadamard_blocks or 1, hadamard_blocks is not None, bits)
    if not tile.fused:  # FWHT (+ prologue) kernel, float64 H_K^T kernel; the quantize kernel scales its rows
        x2, pre = _k_step_unfused(x2, tile, pre), Prologue(PRE_SCALE, row_scale=_inv_sqrt(tile.n_block))
        tile = row_tile(n, 1, False, bits)
    m = x2.shape[0]
    if planes:
        codes = torch.empty(m, n, dtype=torch.int8, device=x2.device)
    else:
        codes = torch.empty(m, n // 2 if bits == 4 else n, dtype=torch.uint8, device=x2.device)
    scale = torch.empty(m, dtype=torch.float32, device=x2.device)
    zero = torch.empty(m, dtype=torch.uint8, device=x2.device)
    clip_min = clip if clip_min is None else clip_min
    rot_p = tile.p if tile.rotate else 0
    chunkable = not tile.rotate or (chunk_rotated and chunk is not None and tile.k == 1 and chunk % tile.p == 0)
    if chunk is not None and chunkable and bits == 4 and pre.kind in (PRE_NONE, PRE_SWIGLU, PRE_SCALE):
        _launch_chunked(x2, codes, scale, zero, n, pre, chunk, rot_p=rot_p,
                        rot_scale=_inv_sqrt(rot_p) if rot_p else 1.0, clip=clip, clip_min=clip_min, planes=planes,
                        num_warps=num_warps or 4)
        return PackedRows(codes, scale, zero, bits, planes)
    block_bytes = tile.n_block // 2 if bits == 4 else tile.n_block
    _launch_rows(x2, tile, quant=True, per_block=False, bits=bits, clip=clip,
                 clip_min=clip_min, codes=codes, scale=scale, zero=zero,
                 y=scale, seq_len=m, pos0=0, code_strides=(0, codes.stride(0), block_bytes),
                 scale_strides=(0, 1, 0), num_warps=num_warps, planes=planes, pre=pre)
    return PackedRows(codes, scale, zero, bits, planes)


def hadamard(x: torch.Tensor, num_blocks: int = 1) -> torch.Tensor:
    """``apply_hadamard(x, num_blocks)`` (same float32 result; float16/bfloat16 inputs are rotated in float32)."""
    x2 = _rows(x, "x")
    _check_device(x2)
    tile = row_tile(x2.shape[1], num_blocks, True)
    if not tile.fused:
        return _rotate_unfused(x2, tile).to(x.dtype).reshape(x.shape)
    y = torch.empty_like(x2)
    _launch_rows(x2, tile, quant=False, per_block=False, bits=4, clip=1.0, clip_min=1.0, codes=y, scale=y,
                 zero=y, y=y, seq_len=x2.shape[0], pos0=0, code_strides=(0, 0, 0), scale_strides=(0, 0, 0))
    return y.reshape(x.shape)


@dataclass
class KVCache4:
    """One layer's K or V cache: codes ``[B, H, T, D/2]`` uint8, scale and zero point ``[B, H, T]``."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor

    @classmethod
    def empty(cls, batch: int, heads: int, capacity: int, head_dim: int, device: torch.device | str) -> KVCache4:
        return cls(torch.zeros(batch, heads, capacity, head_dim // 2, dtype=torch.uint8, device=device),
                   torch.ones(batch, heads, capacity, dtype=torch.float32, device=device),
                   torch.zeros(batch, heads, capacity, dtype=torch.uint8, device=device))

    @property
    def capacity(self) -> int:
        return self.codes.shape[2]

    @property
    def head_dim(self) -> int:
        return self.codes.shape[3] * 2


def _check_cache(cache: KVCache4) -> None:
    _check_dtype("cache codes", cache.codes, (torch.uint8,))
    _check_dtype("cache scale", cache.scale, (torch.float32,))
    _check_dtype("cache zero points", cache.zero, (torch.uint8,))
    for name, t in (("cache codes", cache.codes), ("cache scale", cache.scale), ("cache zero points", cache.zero)):
        _check_contiguous(name, t)
    if cache.scale.shape != cache.zero.shape or cache.scale.shape != cache.codes.shape[:3]:
        raise KernelInputError(f"cache scale {tuple(cache.scale.shape)} / zero {tuple(cache.zero.shape)} do not match "
                               f"codes {tuple(cache.codes.shape)}", "allocate the cache with KVCache4.empty")


def _head_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """``x [B, S, H, D]`` as rows ``[B*S, H*D]`` without a copy: each token's heads contiguous, tokens evenly
    strided (a contiguous tensor, or the q / k / v columns of a fused QKV output)."""
    _check_dtype(name, x, FLOAT_DTYPES)
    if x.dim() != 4:
        raise KernelInputError(f"{name} must be [batch, seq, heads, head_dim], got shape {tuple(x.shape)}",
                               "reshape to 4 dims")
    b, s, h, d = x.shape
    if x.numel() == 0:
        raise KernelInputError(f"{name} is empty (shape {tuple(x.shape)})", f"pass at least one token in {name}")
    # the stride between consecutive rows b * S + t (a size-1 dim's stride is arbitrary in torch)
    row = x.stride(1) if s > 1 else (x.stride(0) if b > 1 else h * d)
    if (x.stride(3) != 1 or (h > 1 and x.stride(2) != d) or row < h * d
            or (b > 1 and s > 1 and x.stride(0) != s * row)):
        raise KernelInputError(f"{name} (shape {tuple(x.shape)}, strides {x.stride()}) does not have contiguous "
                               "heads in evenly strided tokens", f"pass {name}.contiguous()")
    return x.as_strided((b * s, h * d), (row, 1))


def _rope_prologue(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, round_x: bool) -> Prologue:
    s, d = x.shape[1], x.shape[3]
    for name, t in (("cos", cos), ("sin", sin)):
        _check_dtype(name, t, (torch.float32,))
        _check_contiguous(name, t)
        if tuple(t.shape) != (s, d):
            raise KernelInputError(f"RoPE {name} has shape {tuple(t.shape)}, expected [seq={s}, head_dim={d}]",
                                   "pass the tables of these positions ([seq, head_dim], float32)")
    if d % 2:
        raise KernelInputError(f"RoPE rotates halves of the head; head_dim {d} is odd", "use an even head_dim")
    return Prologue(PRE_ROPE, cos, sin, round=round_x)


def rope_rows(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotate: bool) -> torch.Tensor:
    """RoPE ``x * cos + rotate_half(x) * sin`` (float32) on ``x [B, S, H, D]``, rounded to x's dtype, then the
    per-head Hadamard when ``rotate`` (``apply_hadamard(., 1)`` per head): the decoder's q, in one launch.
    ``cos`` / ``sin``: float32 ``[S, D]`` of the tokens' positions. Returns a contiguous ``[B, S, H, D]``."""
    x2 = _head_rows(x, "q")
    b, s, h, d = x.shape
    pre = _rope_prologue(x, cos, sin, round_x=True)
    _check_device(x2, cos, sin)
    tile = row_tile(h * d, h, rotate, 8)
    if not tile.fused:
        y = _apply_prologue(x2, h * d, pre, blocks=h).reshape(b, s, h, d)
        return hadamard(y, 1) if rotate else y
    y = torch.empty(b * s, h * d, dtype=x.dtype, device=x.device)
    _launch_rows(x2, tile, quant=False, per_block=False, bits=4, clip=1.0, clip_min=1.0, codes=y, scale=y,
                 zero=y, y=y, seq_len=s, pos0=0, code_strides=(0, 0, 0), scale_strides=(0, 0, 0), pre=pre)
    return y.reshape(b, s, h, d)


def quantize_kv(x: torch.Tensor, cache: KVCache4, pos0: int | torch.Tensor, clip: float, rotate: bool,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Quantize K or V ``x [B, S, H, D]`` per token and head (after the per-head Hadamard when ``rotate``) into
    ``cache`` at token positions ``pos0 .. pos0 + S - 1`` (numerics.md section 3; KVQuantize).

    ``x`` may be the K or V columns of a fused QKV output (heads contiguous, tokens evenly strided). ``rope``:
    float32 ``(cos, sin)`` ``[S, D]``: K's RoPE, applied in float32 (not rounded) as the row is loaded.
    ``pos0`` may be an int32 ``[1]`` tensor on x's device, read by the kernel (so a CUDA graph can replay the call
    at any position); it cannot be checked without a host sync, so tokens it puts outside the cache are not
    written (never out of bounds)."""
    x2 = _head_rows(x, "k/v")
    b, s, h, d = x.shape
    if (cache.codes.shape[0], cache.codes.shape[1], cache.head_dim) != (b, h, d):
        raise KernelInputError(f"k/v [B={b}, H={h}, D={d}] does not fit the cache {tuple(cache.codes.shape)}",
                               "allocate the cache for this batch, head count and head_dim")
    pos = pos0 if isinstance(pos0, torch.Tensor) else None
    if pos is not None:
        _check_dtype("pos0", pos, (torch.int32,))
        if pos.shape != (1,):
            raise KernelInputError(f"a tensor pos0 must have shape [1], got {tuple(pos.shape)}",
                                   "pass the first position as an int32 tensor of one element")
        _check_device(x, pos)
        pos0 = 0
    elif pos0 < 0 or pos0 + s > cache.capacity:
        raise KernelInputError(f"tokens {pos0}..{pos0 + s - 1} do not fit a cache of {cache.capacity} positions",
                               "allocate a larger cache (max context)")
    _check_cache(cache)
    _check_device(x, cache.codes, cache.scale, cache.zero)
    pre = Prologue() if rope is None else _rope_prologue(x, *rope, round_x=False)
    if rope is not None:
        _check_device(x, *rope)
    tile = row_tile(h * d, h, rotate)
    if not tile.fused:
        if rope is not None:
            x2, pre = _apply_prologue(x2, h * d, pre, blocks=h), Prologue()
        x2 = _rotate_unfused(x2, tile)
        tile = row_tile(h * d, h, False)
    c, sc = cache.codes, cache.scale
    _launch_rows(x2, tile, quant=True, per_block=True, bits=4, clip=clip, clip_min=clip, codes=c, scale=sc,
                 zero=cache.zero, y=sc, seq_len=s, pos0=pos0, code_strides=(c.stride(0), c.stride(2), c.stride(1)),
                 scale_strides=(sc.stride(0), sc.stride(2), sc.stride(1)), pre=pre, pos=pos, t_cap=cache.capacity)


def dequantize_kv(cache: KVCache4, n_tokens: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The first ``n_tokens`` of a cache as ``[B, H, n_tokens, D]`` floats: ``(codes - z) * s`` (KVDequantize)."""
    _check_cache(cache)
    _check_dtype("dtype", torch.empty(0, dtype=dtype), FLOAT_DTYPES)
    _check_device(cache.codes, cache.scale, cache.zero)
    if not 0 < n_tokens <= cache.capacity:
        raise KernelInputError(f"cannot read {n_tokens} tokens from a cache of {cache.capacity}",
                               "read between 1 and the cache capacity")
    b, h, _, half = cache.codes.shape
    d = half * 2
    y = torch.empty(b, h, n_tokens, d, dtype=dtype, device=cache.codes.device)
    bt = 32
    kernel_module("quantize").dequantize_kernel[(b * h, triton_cdiv(n_tokens, bt))](
        cache.codes, cache.scale, cache.zero, y, n_tokens, cache.codes.stride(1), cache.codes.stride(2),
        cache.scale.stride(1), y.stride(1), y.stride(2), D=d, DP=_pow2(d), BT=bt, BITS=4, num_warps=4,
        enable_fp_fusion=False)
    return y


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class PackedWeight:
    """A linear layer's 4-bit weight for the GEMM kernel: codes ``[N, K/2]`` uint8 (numerics.md section 4, the ONNX
    INT4 layout), per-channel scale ``[N]`` float32, code row sums ``[N]`` int32 (zero-point correction), bias."""

    codes: torch.Tensor
    scale: torch.Tensor
    rowsum: torch.Tensor
    bias: torch.Tensor | None = None
    planes: torch.Tensor | None = None
    """Optional unpacked copy for the prefill GEMM (``with_planes``): int8 ``[N, K]``, each row the even-k codes
    then the odd-k codes. Twice the bytes of ``codes``; used for M >= ``W_PLANES_MIN_M`` (memory for speed)."""

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1] * 2

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> PackedWeight:
        """From integer codes ``[N, K]`` in [-8, 7] (any dtype holding integers) and scales ``[N]`` / ``[N, 1]``."""
        ints = codes.round().to(torch.int8) if codes.is_floating_point() else codes.to(torch.int8)
        if ints.dim() != 2 or ints.shape[1] % 64:
            raise KernelInputError(f"weight codes {tuple(ints.shape)}: the GEMM needs [out, in] with in % 64 == 0",
                                   "pad the input dimension to a multiple of 64 or use the fake-quant model")
        return cls(pack_int4(ints).contiguous(), scale.reshape(-1).float().contiguous(),
                   ints.to(torch.int32).sum(dim=1).to(torch.int32).contiguous(),
                   None if bias is None else bias.float().contiguous())

    def unpacked(self) -> torch.Tensor:
        return unpack_int4(self.codes)

    def to(self, device: torch.device | str) -> PackedWeight:
        return PackedWeight(self.codes.to(device), self.scale.to(device), self.rowsum.to(device),
                            None if self.bias is None else self.bias.to(device),
                            None if self.planes is None else self.planes.to(device))

    def with_planes(self) -> PackedWeight:
        """This weight plus its int8 planes (``planes``), built from ``codes`` on their device."""
        lo = (self.codes << 4).view(torch.int8) >> 4
        hi = self.codes.view(torch.int8) >> 4
        return PackedWeight(self.codes, self.scale, self.rowsum, self.bias, torch.cat([lo, hi], dim=1).contiguous())


GEMM_TILES = {  # (BM, BN, BK2, GROUP_M, num_warps, num_stages); the first is the default, the rest autotune options
    # M <= 16: weight-bandwidth bound (measured on H100: 16x32x128 was the fastest of 5, 1.2x FP16 cuBLAS)
    "small": [(16, 32, 128, 1, 4, 4), (16, 32, 256, 1, 4, 3), (16, 64, 128, 1, 4, 4), (16, 64, 256, 1, 4, 3),
              (16, 16, 256, 1, 2, 4)],
    "mid": [(128, 64, 64, 8, 4, 4), (128, 128, 64, 8, 8, 3), (64, 64, 128, 8, 4, 4), (64, 128, 64, 8, 4, 4)],
    # large M: tensor-core bound (H100: 256x128x128 / 8 warps was the fastest of 6 on all three 7B shapes)
    "large": [(256, 128, 128, 8, 8, 3), (256, 128, 64, 8, 8, 3), (128, 256, 128, 8, 8, 3), (128, 256, 64, 8, 8, 3)],
}
_TUNED: dict[tuple, dict[str, int]] = {}

# Operand-layout variants (w4a4_gemm_v2_kernel), used when an operand comes as int8 planes (PackedRows.planes from
# quantize_rows_variant(planes=True), PackedWeight.with_planes()). "SWAP" puts the weight on the left of the MMA
# (read from registers by wgmma); it is chosen when only the activation is planar (the weight is unpacked in
# registers). The first tile per bucket is the default, the rest autotune options.
GEMM_PLANE_TILES = {
    "small": [(16, 32, 128, 1, 4, 4), (16, 64, 128, 1, 4, 4)],
    # measured on an H200 (docs/bench/variants-h200.json): 64x128x128 fastest at M = 256 on 2 of 3 7B shapes
    "mid": [(64, 128, 128, 8, 4, 4), (128, 64, 64, 8, 4, 4), (128, 128, 64, 8, 8, 4)],
    # 128x256x64 fastest at M = 2048 on all three; 128x256x128/3 stages and 128x128x128/4 stages need 288 / 256 KB
    # of shared memory (> 227 KB on sm_90): removed
    "large": [(128, 256, 64, 8, 8, 4), (256, 128, 64, 8, 8, 4)],
}
# Tensor-descriptor (TMA) tiles of w4a4_gemm_tma_kernel, autotune options on sm_90 next to the pointer kernels
# (config "TMA": 1). Chosen statically (no GPU): no register spills and <= 227 KB of shared memory for every operand
# layout, from `python tools/compile_kernels.py --variants` (ptxas -v, sm_90a); the pointer kernels' large tiles
# spill 128-552 bytes per thread. Not yet timed on a GPU: the autotuner decides per shape.
GEMM_TMA_TILES = {
    "small": [(16, 32, 128, 1, 4, 4), (16, 64, 128, 1, 4, 4)],
    "mid": [(128, 64, 64, 8, 4, 4), (64, 128, 128, 8, 4, 4), (128, 128, 64, 8, 8, 5)],
    "large": [(128, 256, 64, 8, 8, 4), (256, 128, 64, 8, 8, 4), (128, 128, 64, 8, 8, 5)],
}
W_PLANES_MIN_M = 17  # below, a weight's packed codes are read even when it has planes (half the bytes)
GEMM_SPLITK = {"tiles": [(16, 32, 128, 1, 4, 4), (16, 64, 128, 1, 4, 4)], "splits": (2, 4, 8)}
"""Split-K autotune candidates for M <= 16 (packed operands): each tile with each split count
(``w4a4_gemm_splitk_kernel`` + ``w4a4_splitk_epilogue_kernel``; same bits). Not timed yet: only the autotuner
picks them, when faster."""
SPLITK_EPILOGUE_BN = 128
GEMM_INT_MM_EPILOGUE = {"BM": 32, "BN": SPLITK_EPILOGUE_BN}
"""Epilogue tile of the ``INT_MM`` config: ``torch._int_mm`` (cuBLASLt's int8 GEMM with int32 accumulation on a
GPU: exact, so the same accumulator) on the int8 planes of both operands -- each row ``[even | odd]`` elements, so
one int8 GEMM of depth K gives ``acc`` -- then ``w4a4_splitk_epilogue_kernel`` (one split) applies the epilogue.
The H200 measured Triton's plane GEMM at 1.10-1.30x FP16 at M = 2048; a library IMMA kernel may do better, at
the cost of an int32 [M, N] round trip through memory. An autotune candidate (same bits); not timed yet."""

# sm_80-89 (A100, RTX 30/40, Orin): mma.sync keeps both operand fragments and the accumulator in registers, and
# sm_86/89 give a block 99 KB of shared memory. Compiled for sm_80 and sm_89 (ptxas -v, no GPU), the sm_90 tables
# above spill there (256x128x128 packed: 3.3 KB per thread on sm_89, 18.7 KB on sm_80) or do not launch (the plane
# tiles' 128-192 KB); these tiles compile without spills within 99 KB on sm_80/86/87/89 (tests/kernels/test_aot.py).
# Not yet timed on such a GPU: the first of each bucket is a static choice, the autotuner picks among them.
GEMM_TILES_SM8X = {
    "small": [t for t in GEMM_TILES["small"] if t != (16, 64, 256, 1, 4, 3)],  # that one spills 8 B on sm_80
    "mid": [(64, 128, 64, 8, 4, 4), (128, 128, 64, 8, 8, 3), (64, 64, 128, 8, 4, 4)],  # 128x64x64: 32 B spill, sm_80
    "large": [(128, 256, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4), (128, 128, 64, 8, 8, 3)],
}
GEMM_PLANE_TILES_SM8X = {
    "small": GEMM_PLANE_TILES["small"],
    "mid": [(128, 64, 64, 8, 4, 4), (64, 64, 128, 8, 4, 4), (128, 128, 64, 8, 8, 3)],
    "large": [(128, 256, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4)],
}


def gemm_tables(cc: int | None) -> tuple[dict[str, list[tuple]], dict[str, list[tuple]]]:
    """(packed tiles, plane tiles) for compute capability ``cc`` (e.g. 89); None (the interpreter) and sm_90+
    get the sm_90 tables."""
    if cc is not None and cc < 90:
        return GEMM_TILES_SM8X, GEMM_PLANE_TILES_SM8X
    return GEMM_TILES, GEMM_PLANE_TILES


def device_cc(device: torch.device) -> int | None:
    """Compute capability of a CUDA device as an int (89 for 8.9); None for the CPU (interpreter)."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _bucket(m: int) -> str:
    return "small" if m <= 16 else "mid" if m <= 256 else "large"


def gemm_candidates(m: int, k2: int, tiles: dict[str, list[tuple]] | None = None) -> list[dict[str, int]]:
    """Tile configs for M rows and K/2 packed bytes whose BK2 divides K/2 (the default first)."""
    tiles = GEMM_TILES if tiles is None else tiles
    keys = ("BM", "BN", "BK2", "GROUP_M", "num_warps", "num_stages")
    fits = [dict(zip(keys, t, strict=True)) for t in tiles[_bucket(m)] if k2 % t[2] == 0]
    return fits or [dict(zip(keys, (*tiles[_bucket(m)][0][:2], 32, *tiles[_bucket(m)][0][3:]),
                             strict=True))]


def gemm_config(m: int, k2: int, cc: int | None = None) -> dict[str, int]:
    """The default tile config (no autotuning) on compute capability ``cc``."""
    return gemm_candidates(m, k2, gemm_tables(cc)[0])[0]


TUNE_ERRORS: dict[tuple, str] = {}
"""(autotune key, candidate) -> the error a non-default candidate raised while being timed (it was skipped)."""


def _autotune(key: tuple, run: Callable[[dict[str, int]], object], candidates: list[dict[str, int]],
              timer: Callable[[Callable[[], object]], float] | None = None) -> dict:
    """Time each candidate once per key (CUDA events; ``timer`` replaces ``triton.testing.do_bench``) and keep the
    fastest. Any config computes the same bits (integer accumulation), so tuning changes speed only. A candidate
    that cannot run (out of shared memory, or any other error of a non-default candidate, e.g. a tensor-descriptor
    tile on an untested driver) is skipped and its error kept in ``TUNE_ERRORS``; the default's errors propagate."""
    if key not in _TUNED:
        from triton.runtime.errors import OutOfResources

        if timer is None:
            from triton.testing import do_bench

            def timer(fn: Callable[[], object]) -> float:
                return do_bench(fn, warmup=3, rep=15)

        def timed(cfg: dict[str, int]) -> float:
            try:
                return timer(lambda: run(cfg))
            except OutOfResources:  # a tile this GPU's shared memory cannot hold
                return math.inf
            except Exception as exc:
                if cfg is candidates[0]:
                    raise
                TUNE_ERRORS[(key, tuple(sorted(cfg.items())))] = f"{type(exc).__name__}: {exc}"[:300]
                return math.inf

        _TUNED[key] = min(candidates, key=timed)
    return _TUNED[key]


def w4a4_linear(act: PackedRows, weight: PackedWeight, residual: torch.Tensor | None = None,
                out_dtype: torch.dtype = torch.float32, config: dict[str, int] | None = None) -> torch.Tensor:
    """``((acc - z_a * rowsum) * s_a) * s_w + bias (+ residual)`` with ``acc = q_a @ codes_w^T`` in int32.

    Returns ``[M, N]`` in ``out_dtype``; bit-identical to ``integer_linear`` (+ residual) in float32. On a GPU the
    tile config is autotuned once per (M bucket, N, K, dtypes, GPU) among the tiles of ``gemm_tables(cc)`` and, on
    sm_90, ``GEMM_TMA_TILES`` (``INFOQUANT_GEMM_AUTOTUNE=0`` keeps the default); ``config`` forces one. Planar
    operands (``act.planes``; ``weight.planes`` when M >= ``W_PLANES_MIN_M``) run ``w4a4_gemm_v2_kernel`` with the
    plane tiles (same bits); a ``config`` may also set ``"W_PLANES"`` (0/1: use the weight's planes), ``"SWAP"``
    (0/1), ``"TMA"`` (1: ``w4a4_gemm_tma_kernel``), ``"SPLITS"`` (2, 4, ...: split-K, ``GEMM_SPLITK``) and
    ``"INT_MM"`` (1: ``torch._int_mm`` on both operands' planes + the epilogue kernel, ``GEMM_INT_MM_EPILOGUE``).
    """
    if act.bits != 4:
        raise KernelInputError(f"the W4A4 GEMM takes 4-bit activations, got {act.bits}-bit",
                               "quantize the activations with bits=4")
    _check_dtype("activation codes", act.codes, (torch.int8,) if act.planes else (torch.uint8,))
    _check_dtype("weight codes", weight.codes, (torch.uint8,))
    _check_dtype("out_dtype", torch.empty(0, dtype=out_dtype), FLOAT_DTYPES)
    for name, t in (("activation codes", act.codes), ("weight codes", weight.codes)):
        _check_contiguous(name, t)
    m, k2 = act.codes.shape[0], act.k2
    n = weight.out_features
    if weight.planes is not None:
        _check_dtype("weight planes", weight.planes, (torch.int8,))
        _check_contiguous("weight planes", weight.planes)
        if weight.planes.shape != (n, 2 * weight.codes.shape[1]):
            raise KernelInputError(f"weight planes {tuple(weight.planes.shape)} do not match codes "
                                   f"{tuple(weight.codes.shape)}", "build them with PackedWeight.with_planes()")
    if weight.codes.shape[1] != k2:
        raise KernelInputError(f"activation has {2 * k2} features but the weight expects {weight.in_features}",
                               "quantize the matching input")
    if k2 % 32:
        raise KernelInputError(f"in_features {2 * k2} is not a multiple of 64", "pad the layer to a multiple of 64")
    tensors = [act.codes, act.scale, act.zero, weight.codes, weight.scale, weight.rowsum]
    if weight.planes is not None:
        tensors.append(weight.planes)
    if weight.bias is not None:
        tensors.append(weight.bias)
    if residual is not None:
        _check_contiguous("residual", residual)
        _check_dtype("residual", residual, FLOAT_DTYPES)
        if residual.shape != (m, n):
            raise KernelInputError(f"residual {tuple(residual.shape)} does not match the output ({m}, {n})",
                                   "pass the residual as [tokens, out_features]")
        tensors.append(residual)
    _check_device(*tensors)
    y = torch.empty(m, n, dtype=out_dtype, device=act.codes.device)

    w_planes_default = weight.planes is not None and m >= W_PLANES_MIN_M

    def run(cfg: dict[str, int]) -> None:
        cfg = dict(cfg)
        use_wp = bool(cfg.pop("W_PLANES", w_planes_default))
        swap = bool(cfg.pop("SWAP", act.planes and not use_wp))
        tma = bool(cfg.pop("TMA", 0))
        splits = int(cfg.pop("SPLITS", 1))
        int_mm = bool(cfg.pop("INT_MM", 0))
        if use_wp and weight.planes is None:
            raise KernelInputError("config W_PLANES=1 but the weight has no planes", "use weight.with_planes()")
        grid = (triton_cdiv(m, cfg["BM"]) * triton_cdiv(n, cfg["BN"]),)
        # WORDS: word-parallel nibble unpacking (inline PTX: compiled code on NVIDIA GPUs only; same bits as the
        # interpreter's byte form, which ROCm builds of torch / Triton also get)
        common = dict(HAS_BIAS=weight.bias is not None, HAS_RES=residual is not None, enable_fp_fusion=False,
                      WORDS=not interpreted() and torch.version.hip is None)
        bias = weight.bias if weight.bias is not None else weight.scale
        res = residual if residual is not None else y
        res_stride = residual.stride(0) if residual is not None else 0

        def epilogue(part: torch.Tensor, splits: int, bm: int) -> None:
            """``w4a4_splitk_epilogue_kernel``: the int32 accumulator ``part`` (summed over ``splits``) -> y."""
            bn = SPLITK_EPILOGUE_BN
            kernel_module("gemm").w4a4_splitk_epilogue_kernel[(triton_cdiv(m, bm) * triton_cdiv(n, bn),)](
                part, act.scale, act.zero, weight.scale, weight.rowsum, bias, res, y, m, n, res_stride, y.stride(0),
                SPLITS=splits, HAS_BIAS=common["HAS_BIAS"], HAS_RES=common["HAS_RES"], BM=bm, BN=bn, num_warps=4,
                enable_fp_fusion=False)

        if tma:
            if swap or not tma_eligible(act, weight, y, residual):
                raise KernelInputError("config TMA=1 needs SWAP=0, 16-byte aligned tensors and rows of a multiple "
                                       "of 16 bytes", "drop TMA from the config")
            from triton.tools.tensor_descriptor import TensorDescriptor

            w_codes = weight.planes if use_wp else weight.codes
            tiles = ([cfg["BM"], cfg["BK2"]], [cfg["BN"], cfg["BK2"]], [cfg["BM"], cfg["BN"]])
            kernel_module("gemm").w4a4_gemm_tma_kernel[grid](
                TensorDescriptor.from_tensor(act.codes, tiles[0]), act.scale, act.zero,
                TensorDescriptor.from_tensor(w_codes, tiles[1]), weight.scale, weight.rowsum, bias,
                TensorDescriptor.from_tensor(res, tiles[2]), TensorDescriptor.from_tensor(y, tiles[2]), m, n, k2,
                A_PLANES=act.planes, W_PLANES=use_wp, **common, **cfg)
            return
        if int_mm:  # the library's int8 GEMM (cuBLASLt IMMA on a GPU) on the planes, then the epilogue kernel
            if not (act.planes and weight.planes is not None) or (y.is_cuda and m <= 16):
                raise KernelInputError("config INT_MM=1 takes int8 planes of both operands and, on a GPU, M > 16",
                                       "quantize with planes=True, use weight.with_planes(), or drop INT_MM")
            acc = torch._int_mm(act.codes, weight.planes.t())  # [even | odd] . [even | odd] = acc, exact int32
            epilogue(acc, 1, cfg["BM"])
            return
        if splits > 1:
            if act.planes or use_wp or swap or splits & (splits - 1):
                raise KernelInputError(f"config SPLITS={splits} takes packed operands and a power-of-two split "
                                       "count", "drop SPLITS from the config")
            mod = kernel_module("gemm")
            chunk = triton_cdiv(triton_cdiv(k2, splits), cfg["BK2"]) * cfg["BK2"]
            part = torch.empty(splits, m, n, dtype=torch.int32, device=y.device)
            mod.w4a4_gemm_splitk_kernel[(grid[0], splits)](
                act.codes, weight.codes, part, m, n, k2, chunk, act.codes.stride(0), weight.codes.stride(0),
                WORDS=common["WORDS"], **cfg)
            epilogue(part, splits, cfg["BM"])
            return
        if not (act.planes or use_wp or swap):  # the packed operands of the default kernel
            kernel_module("gemm").w4a4_gemm_kernel[grid](
                act.codes, act.scale, act.zero, weight.codes, weight.scale, weight.rowsum, bias, res, y,
                m, n, k2, act.codes.stride(0), weight.codes.stride(0), res_stride, y.stride(0), **common, **cfg)
            return
        w_codes = weight.planes if use_wp else weight.codes
        kernel_module("gemm").w4a4_gemm_v2_kernel[grid](
            act.codes, act.scale, act.zero, w_codes, weight.scale, weight.rowsum, bias, res, y,
            m, n, k2, act.codes.stride(0), k2 if act.planes else 0, w_codes.stride(0), k2 if use_wp else 0,
            res_stride, y.stride(0), A_PLANES=act.planes, W_PLANES=use_wp, SWAP=swap, **common, **cfg)

    if config is None:
        planar = act.planes or w_planes_default
        cc = device_cc(y.device)
        int_mm_ok = act.planes and weight.planes is not None and n % 8 == 0  # K = 2 * k2: a multiple of 64
        candidates = linear_candidates(m, k2, planar, cc, tma_eligible(act, weight, y, residual), int_mm_ok)
        config = candidates[0]
        if len(candidates) > 1 and not interpreted() and os.environ.get("INFOQUANT_GEMM_AUTOTUNE", "1") != "0":
            key = (_bucket(m), n, k2, out_dtype, weight.bias is not None, residual is not None, act.planes,
                   w_planes_default, cc)
            config = _autotune(key, run, candidates)
    run(config)
    return y


def linear_candidates(m: int, k2: int, planar: bool, cc: int | None, tma_ok: bool,
                      int_mm_ok: bool = False) -> list[dict[str, int]]:
    """``w4a4_linear``'s autotune candidates, the default first: the tiles of ``gemm_tables(cc)`` (plane tiles
    for planar operands), on sm_90 the TMA tiles (``tma_ok``), for M <= 16 with packed operands the split-K
    configs of ``GEMM_SPLITK``, on a GPU for M > 16 with both operands as planes (``int_mm_ok``) the library's
    int8 GEMM plus the epilogue kernel (``INT_MM``)."""
    packed_tiles, plane_tiles = gemm_tables(cc)
    candidates = gemm_candidates(m, k2, plane_tiles if planar else packed_tiles)
    if cc is not None and 90 <= cc < 100 and tma_ok:
        candidates += [{**c, "TMA": 1, "SWAP": 0} for c in gemm_candidates(m, k2, GEMM_TMA_TILES)]
    if m <= 16 and not planar:
        candidates += [{**c, "SPLITS": sp} for sp in GEMM_SPLITK["splits"]
                       for c in gemm_candidates(m, k2, {"small": GEMM_SPLITK["tiles"]})]
    if int_mm_ok and cc is not None and m > 16:
        candidates.append({**GEMM_INT_MM_EPILOGUE, "INT_MM": 1})
    return candidates


def tma_eligible(act: PackedRows, weight: PackedWeight, y: torch.Tensor, residual: torch.Tensor | None) -> bool:
    """Whether ``w4a4_gemm_tma_kernel`` can take these tensors: TMA needs 16-byte aligned bases and row strides."""
    w_codes = weight.planes if weight.planes is not None else weight.codes
    tensors = [act.codes, weight.codes, w_codes, y] + ([residual] if residual is not None else [])
    return all(t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 for t in tensors)


_DOT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # tensor-core dot dtype of the decode kernel


def decode_tile(group: int) -> tuple[int, int]:
    """(query rows per program, tokens per step) of the decode kernel for a GQA group: rows padded to >= 16 for the
    tensor cores; 128 tokens per step (H100, D=128: faster than 32 / 64), 64 for groups above 16."""
    gp = max(16, _pow2(group))
    return gp, 128 if gp <= 16 else 64


# (tokens per step, warps) of the CUDA-core decode kernel. Static choice (no GPU yet): at D = 128 on sm_90 it needs
# 64 registers per thread (32 resident warps per SM; 32 x 4 warps: 128, 64 x 8: 128, 128 x 8: 190 registers), where
# the tensor-core kernel needs 221 (8 resident warps). tools/bench_kernels.py --sections variants times the others.
DECODE_CC_TILE = (32, 8)
FLOAT_2_23_BITS = 0x4B000000  # the CUDA-core decode kernel's magic_bits argument (the float 2^23)


def decode_splits(batch_heads: int, max_len: int, block_t: int, target_programs: int) -> int:
    """Power-of-2 number of context chunks so that ``batch_heads * splits`` fills the GPU."""
    splits = 1
    while batch_heads * splits < target_programs and splits * 2 * block_t <= max_len and splits < 256:
        splits *= 2
    return splits


def kv4_decode_attention(q: torch.Tensor, k: KVCache4, v: KVCache4, lengths: torch.Tensor, max_len: int,
                         splits: int | None = None, block_t: int | None = None, num_warps: int | None = None,
                         num_stages: int = 3, check_lengths: bool = True, kernel: str | None = None) -> torch.Tensor:
    """Attention of one new token per row, ``q [B, Hq, D]``, over the 4-bit caches' first ``lengths[b]`` tokens.

    ``max_len`` (>= every length) sizes the split and is checked against ``lengths`` when ``check_lengths`` (a host
    sync on the GPU; skipped during CUDA-graph capture). The kernel clamps lengths to ``max_len``, so it never reads
    past it. Returns ``[B, Hq, D]`` in q's dtype (float32 softmax; tensor-core
    dot products in float16 for a float16 q). ``splits`` / ``block_t`` / warps / stages override the heuristics.
    ``kernel``: ``"tc"`` the tensor-core kernel (a GQA group per program, 4 warps), ``"cc"`` the CUDA-core kernel
    (``kv4_decode_partial_cc_kernel``: one query head per program, float32 throughout, ``DECODE_CC_TILE``); default
    ``$INFOQUANT_DECODE_KERNEL`` or ``"tc"``.
    """
    kernel = kernel or os.environ.get("INFOQUANT_DECODE_KERNEL", "tc")
    _check_dtype("q", q, FLOAT_DTYPES)
    _check_contiguous("q", q)
    _check_dtype("lengths", lengths, (torch.int32,))
    if q.dim() != 3:
        raise KernelInputError(f"q must be [batch, heads, head_dim], got {tuple(q.shape)}", "pass one token per row")
    b, hq, d = q.shape
    hkv = k.codes.shape[1]
    if k.codes.shape != v.codes.shape or k.codes.shape[0] != b or k.head_dim != d:
        raise KernelInputError(f"caches {tuple(k.codes.shape)} / {tuple(v.codes.shape)} do not fit q {tuple(q.shape)}",
                               "use the caches written for this batch and head_dim")
    if hq % hkv:
        raise KernelInputError(f"{hq} query heads are not a multiple of {hkv} KV heads", "check num_kv_heads")
    if d < 16 or d & (d - 1):
        raise KernelInputError(f"head_dim {d} is not a power of two >= 16", "use the fake-quant model")
    if not 0 < max_len <= k.capacity or lengths.shape != (b,):
        raise KernelInputError(f"max_len {max_len} / lengths {tuple(lengths.shape)} invalid for a cache of "
                               f"{k.capacity} and batch {b}", "pass lengths [B] int32 with 0 < length <= max_len")
    _check_cache(k)
    _check_cache(v)
    _check_device(q, lengths, k.codes, v.codes)
    for name, value, least in (("splits", splits, 1), ("block_t", block_t, 16)):
        if value is not None and (value < least or value & (value - 1)):
            raise KernelInputError(f"{name}={value} is not a power of two >= {least}", f"pass a valid {name} or None")
    capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
    if check_lengths and not capturing and lengths.numel() and (int(lengths.max()) > max_len or
                                                                int(lengths.min()) < 1):
        raise KernelInputError(f"lengths {lengths.tolist()} outside 1..max_len={max_len}",
                               "pass max_len >= every length (and every length >= 1)")
    if kernel not in ("tc", "cc"):
        raise KernelInputError(f"kernel={kernel!r} is not 'tc' or 'cc'", "pass kernel='tc' (tensor cores) or 'cc'")
    if kernel == "cc" and (k.codes.data_ptr() % 4 or v.codes.data_ptr() % 4):
        raise KernelInputError("kernel='cc' reads the cache codes as 32-bit words; these start at an offset that "
                               "is not a multiple of 4 bytes", "allocate the caches with KVCache4.empty")
    g = hq // hkv
    gp, default_block_t = decode_tile(g)
    block_t = block_t or (DECODE_CC_TILE[0] if kernel == "cc" else default_block_t)
    num_warps = num_warps or (DECODE_CC_TILE[1] if kernel == "cc" else 4)
    programs = b * (hq if kernel == "cc" else hkv)
    target = 4 * (torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1)
    splits = splits or decode_splits(programs, max_len, block_t, target)
    chunk = triton_cdiv(triton_cdiv(max_len, splits), block_t) * block_t
    part_o = torch.empty(b, hq, splits, d, dtype=torch.float32, device=q.device)
    part_m = torch.empty(b, hq, splits, dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    mod = kernel_module("attention")
    args = (q, q.stride(0), q.stride(1), k.codes, k.scale, k.zero, v.codes, v.scale, v.zero,
            k.codes.stride(0), k.codes.stride(1), k.codes.stride(2), k.scale.stride(0), k.scale.stride(1),
            lengths, part_o, part_m, part_l, hkv, chunk, max_len, float(d ** -0.5 * math.log2(math.e)))
    if kernel == "cc":
        mod.kv4_decode_partial_cc_kernel[(programs, splits)](
            *args, FLOAT_2_23_BITS, G=g, D=d, BT=block_t, SPLITS=splits, num_warps=num_warps, num_stages=num_stages)
    else:
        mod.kv4_decode_partial_kernel[(programs, splits)](
            *args, G=g, GP=gp, D=d, BT=block_t, SPLITS=splits, DOT=_DOT[q.dtype], num_warps=num_warps,
            num_stages=num_stages)
    out = torch.empty_like(q)
    mod.kv4_decode_combine_kernel[(b * hq,)](part_o, part_m, part_l, out, SPLITS=splits, SP=splits, D=d,
                                             num_warps=4)
    return out
