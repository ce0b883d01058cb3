"""Per-row quantization and the block Hadamard (numerics.md sections 1, 3, 5): the row tile, the prologues
(RMSNorm, SwiGLU, RoPE), the fused row kernel and the chunked kernel's launches, ``quantize_rows`` /
``quantize_rows_variant`` / ``hadamard``. Large-K Hadamards use the float64 K step of ``k_step``."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cache

import torch

from infoquant_export.kernels import interpreted, kernel_module
from infoquant_export.kernels.checks import (
    FLOAT_DTYPES,
    KernelInputError,
    _check_bits,
    _check_contiguous,
    _check_device,
    _check_dtype,
    _f32,
    _pow2,
    device_cc,
    triton_cdiv,
)
from infoquant_export.kernels.k_step import K_STEP_TILE_FEW_ROWS, _hk_t_padded, k_step
from infoquant_export.transforms.hadamard import hadamard_factors

MAX_ROW_TILE = 32768  # one program holds a row tile of at most this many float32 values


FUSED_K_ROWS = 64  # the fused kernel does the H_K^T step as one float64 dot of at most this many rows


@cache
def _hk_t(k: int, copies: int, pad: int, device: str) -> torch.Tensor:
    """``blockdiag(H_K^T, ...)`` (``copies`` blocks, each zero padded to ``pad``) in float32 (+-1 and 0: exact)."""
    return torch.block_diag(*[_hk_t_padded(k, pad, pad, "cpu")] * copies).to(device)


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
            SLICED=per_launch < rows, FAST_DIV=_fast_div(), FWHT_SPLIT=fwht_split(quant),
            num_warps=num_warps or (FEW_ROWS_WARPS if rows < FEW_ROWS else row_warps(tile.elements)),
            enable_fp_fusion=False)


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    _check_dtype(name, x, FLOAT_DTYPES)
    _check_contiguous(name, x)
    if x.dim() < 1 or x.numel() == 0:
        raise KernelInputError(f"{name} is empty (shape {tuple(x.shape)})", f"pass at least one row in {name}")
    return x.reshape(-1, x.shape[-1])


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
    _launch_chunked(x2, fwht, fwht, fwht, n, pre, chunk, rot_p=tile.p, quant=False, chunk_grid=m < FEW_ROWS)
    out = torch.empty_like(fwht)
    k_step(fwht.view(m * tile.nb, tile.n_block), out.view(m * tile.nb, tile.n_block), tile.k, tile.p,
           _inv_sqrt(tile.n_block) if scale else None, tiles=K_STEP_TILE_FEW_ROWS if m < FEW_ROWS else None)
    return out


def _launch_chunked(x2: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, n: int,
                    pre: Prologue, chunk: int, *, rot_p: int = 0, rot_scale: float = 1.0, clip: float = 1.0,
                    clip_min: float = 1.0, planes: bool = False, quant: bool = True, num_warps: int = 4,
                    stages: int | None = None, chunk_grid: bool = False) -> None:
    """``quantize_rows_chunked_kernel`` over the rows ``x2`` (row length ``n`` after the prologue ``pre``): the
    4-bit codes to ``out`` with ``scale`` / ``zero``, or (``quant=False``) the rotated rows as float32 to ``out``.
    ``stages``: software-pipeline stages of its chunk loops (default ``CHUNK_STAGES``); ``chunk_grid`` (not
    ``quant``): a program per chunk instead of per row."""
    grid = (x2.shape[0], triton_cdiv(n, chunk)) if chunk_grid else (x2.shape[0],)
    kernel_module("quantize").quantize_rows_chunked_kernel[grid](
        x2, x2.stride(0), out, out.stride(0), scale, zero, n, _f32(clip), _f32(clip_min), pre.up_offset,
        pre.operands(scale)[0], CH=chunk, PLANES=planes, PRE=pre.kind, ROUND=pre.round, ROW_SCALE=pre.row_scale,
        ROT_P=rot_p, LOG2P=max(rot_p, 1).bit_length() - 1, ROT_SCALE=rot_scale, QUANT=quant,
        STAGES=stages or CHUNK_STAGES, FAST_DIV=_fast_div(), CHUNK_GRID=chunk_grid, num_warps=num_warps,
        enable_fp_fusion=False)


def _rotate_unfused(x2: torch.Tensor, tile: RowTile) -> torch.Tensor:
    """The block Hadamard for large K in float32: ``_k_step_unfused`` with the final ``* 1/sqrt(n)``."""
    return _k_step_unfused(x2, tile, scale=True)


CHUNKED_ABOVE, CHUNK = 8192, 1024
"""Rows longer than CHUNKED_ABOVE quantized without a fused rotation use the two-pass chunked kernel with chunks of
CHUNK (H200, 4096 x 11008: 0.066 vs 0.146 ms, 44 % vs 20 % of copy bandwidth: no padding to 16384). Same bits
(tests/gpu/test_variants_gpu.py)."""
FEW_ROWS, FEW_ROWS_WARPS = 128, 16
"""Below FEW_ROWS rows (a decode step: fewer rows than an H100 / H200 has SMs, so most SMs idle and each row's
latency is the time) the row kernels trade throughput for latency, computing the same values:

- the FWHT pass of an unfused Hadamard (``_k_step_unfused``: 11008 = 172 x 64) gives each chunk its own program
  instead of looping over a row's chunks in one program (11 programs on 11 SMs, each waiting for one load, rather
  than one program waiting for 11 in turn; the chunks are independent); its K step takes the smaller tile
  ``K_STEP_TILE_FEW_ROWS`` (11 programs per row instead of 3);
- rows longer than CHUNKED_ABOVE are quantized by the one-pass row-tile kernel (every load of the row in flight at
  once) instead of the chunked kernel's two passes of serial chunk loads (22 at 11008);
- the row-tile kernel runs FEW_ROWS_WARPS warps per row instead of ``row_warps`` (4): a program alone on its SM
  then has a 2-3.5x shorter chain of instructions per thread and fewer barriers (sm_90, 4 -> 16 warps:
  ``kv_rope_hadamard_quantize_32x128`` 2464 -> 976 instructions, 34 -> 16 barriers; ``rmsnorm_quantize_4096``
  1264 -> 704; ``hadamard_quantize_4096`` 1464 -> 656; 11008 float32 rows padded to 16384: 1648 -> 720, no
  loop). The fused-Hadamard tiles of other models also lose their spills (SwiGLU + 14336 = 28 x 512 on sm_86:
  1132 -> 0 bytes; SwiGLU + 43 x 256 blocks: 20-36 -> 0).

Not timed on a GPU yet: ``tools/bench_kernels.py`` times both at 1 and 16 rows (quantize variants ``few_rows_off``)
and in the served decode step (``w4a4kv4_served_few_rows_off_ms``)."""
QUANT_CHUNK: int | None = None
"""Default chunk of the two-pass quantize-only kernel (``quantize_rows_chunked_kernel``) for rows without
rotation, or None for the one-pass row-tile kernel. Either computes the same bits."""
CHUNK_ROTATED = True
"""Whether ``quantize_rows`` also sends long rows with a block-diagonal power-of-two Hadamard (e.g. 11008 = 43
blocks of 256) through the chunked kernel (same bits, no padding of 43 blocks to 64). H200, 4096 x 11008 with 43
blocks of 256 (``tools/bench_kernels.py --sections variants``, 2026-11-27): 23 % of copy bandwidth chunked (1024,
4 warps) vs 15 % for the one-pass row kernel."""
CHUNK_STAGES = 1
"""Software-pipeline stages of the chunked kernel's two chunk loops: 1 (not pipelined) is what the figures above
measured; 2-3 copy the next chunks to shared memory by cp.async while one is reduced / quantized (same bits; on
sm_90 and sm_86 the loop then holds LDGSTS instead of LDG, tests/kernels/test_aot.py). To be timed on a GPU
(``tools/bench_kernels.py --sections variants``: ``chunk1024_w4_s2`` / ``_s3``) before it changes."""


FAST_DIV = True
"""Compiled quantize kernels divide each value by its row's scale as ``q0 = x * RN(1/s)``, ``r = fma(-q0, s, x)``,
``fma(r, RN(1/s), q0)`` (``common.div_by``): the IEEE quotient by Markstein's theorem, so the same codes, in 3
instructions instead of ``div.rn.f32``'s reciprocal, FMAs and slow-path branch (sm_90, as the JIT compiles it:
``quantize_4096`` 1064 -> 784 SASS instructions; tests/kernels/test_div_by.py, docs/numerics.md section 8).
False: ``div.rn.f32``. The interpreter always divides (its ``tl.fma`` rounds twice)."""


def _fast_div() -> bool:
    return FAST_DIV and not interpreted()


FWHT_TWO_PASS = False
"""Whether the row kernel runs a single block's FWHT as two passes before quantizing (``_fwht``'s ``SPLIT``; same
bits). Off: compiled as the JIT specialises it, the one-pass form is the shorter code before the quantization
(sm_90 ``hadamard_quantize_4096``: 1464 against 1760 SASS instructions, 32 against 24 resident warps;
BENCHMARKS.md), and the H200 measured 0.35 of copy with one pass (4 warps, before commit 13295bc split it)
against 0.32 with two (stop 19). Rows that are not quantized keep two passes (704 against 760 instructions).
``tools/bench_kernels.py`` times both (``fwht_two_pass``)."""


def fwht_split(quant: bool) -> bool:
    """The row kernel's ``FWHT_SPLIT`` for a launch that quantizes (``quant``) or writes the rotated rows."""
    return FWHT_TWO_PASS or not quant


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
    few = x.dim() > 0 and x.numel() < FEW_ROWS * x.shape[-1]
    chunk = CHUNK if width > CHUNKED_ABOVE and QUANT_CHUNK is None and not few else None
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
                          prologue: Prologue | None = None, chunk_rotated: bool = True,
                          stages: int | None = None, gluon: bool = False) -> PackedRows:
    """``quantize_rows`` with the kernel variants (same codes, scales and zero points):

    ``planes``: 4-bit codes written unpacked as int8 planes (``PackedRows.planes``; the prefill GEMM operand);
    ``chunk``: rows without rotation go through the two-pass chunked kernel with chunks of ``chunk`` values
    (a power of two >= 64; default ``QUANT_CHUNK``), ``num_warps`` then applies to it (default 4); so do rows
    with a Hadamard of power-of-two blocks no larger than ``chunk`` when ``chunk_rotated``. An RMSNorm prologue
    needs the whole row: those rows always go through the row-tile kernel. ``stages``: the chunked kernel's
    software-pipeline stages (default ``CHUNK_STAGES``). ``gluon``: one Hadamard block over the whole row of a
    power of two from 1024 to 8192 values, no prologue, packed 4-bit codes, on a GPU: the Gluon kernel with the
    FWHT's stages laid out by hand (``quantize_gluon``).
    """
    _check_bits(bits)
    if gluon:
        return _quantize_gluon(x, bits, clip, clip_min, hadamard_blocks, planes, prologue)
    if planes and bits != 4:
        raise KernelInputError("planes=True holds 4-bit codes", "use bits=4 or planes=False")
    chunk = QUANT_CHUNK if chunk is None else chunk
    if chunk is not None and (chunk < 64 or chunk & (chunk - 1)):
        raise KernelInputError(f"chunk={chunk} is not a power of two >= 64", "pass a valid chunk or None")
    if stages is not None and stages < 1:
        raise KernelInputError(f"stages={stages} is below 1", "pass stages >= 1 (1: not pipelined) or None")
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
                        num_warps=num_warps or 4, stages=stages)
        return PackedRows(codes, scale, zero, bits, planes)
    block_bytes = tile.n_block // 2 if bits == 4 else tile.n_block
    _launch_rows(x2, tile, quant=True, per_block=False, bits=bits, clip=clip,
                 clip_min=clip_min, codes=codes, scale=scale, zero=zero,
                 y=scale, seq_len=m, pos0=0, code_strides=(0, codes.stride(0), block_bytes),
                 scale_strides=(0, 1, 0), num_warps=num_warps, planes=planes, pre=pre)
    return PackedRows(codes, scale, zero, bits, planes)


def _quantize_gluon(x: torch.Tensor, bits: int, clip: float, clip_min: float | None, hadamard_blocks: int | None,
                    planes: bool, prologue: Prologue | None) -> PackedRows:
    """``quantize_rows_variant(..., gluon=True)``: ``quantize_gluon.hadamard_quantize_gluon_kernel``, one program of
    n / 1024 warps per row."""
    x2 = _rows(x, "x")
    _check_device(x2)
    n = x2.shape[1]
    if bits != 4 or hadamard_blocks != 1 or planes or prologue is not None or n not in (1024, 2048, 4096, 8192):
        raise KernelInputError(f"gluon=True takes 4-bit packed codes of rows of 1024-8192 values (a power of two) "
                               f"rotated by one Hadamard block, without a prologue (got {bits} bits, {n} values, "
                               f"hadamard_blocks={hadamard_blocks}, planes={planes}, prologue={prologue})",
                               "drop gluon=True")
    if interpreted() or (device_cc(x2.device) or 0) < 80:
        raise KernelInputError("gluon=True is compiled GPU code (sm_80+; Triton's interpreter cannot run Gluon)",
                               "drop gluon=True")
    m, warps = x2.shape[0], n // 1024
    codes = torch.empty(m, n // 2, dtype=torch.uint8, device=x2.device)
    scale = torch.empty(m, dtype=torch.float32, device=x2.device)
    zero = torch.empty(m, dtype=torch.uint8, device=x2.device)
    mod = kernel_module("quantize_gluon")
    row, lanes, warps_l, bytes_l = mod.row_layouts(warps)
    clip_min = clip if clip_min is None else clip_min
    mod.hadamard_quantize_gluon_kernel[(m,)](
        x2, x2.stride(0), codes, codes.stride(0), scale, zero, _inv_sqrt(n), _f32(clip), _f32(clip_min),
        W=warps, LOG2W=warps.bit_length() - 1, FAST_DIV=_fast_div(), ROW=row, LANES=lanes, WARPS=warps_l,
        BYTES=bytes_l, num_warps=warps, enable_fp_fusion=False)
    return PackedRows(codes, scale, zero, bits, False)


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
