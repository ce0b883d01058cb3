"""Fused online Hadamard + per-token (or per-group) asymmetric quantization, and dequantization.

One program handles one row (a token). The row is viewed as a tile ``[NBP, KP, P]``: ``NB`` blocks (Hadamard
blocks, or quantization groups such as KV heads), each ``K x P`` (``K`` padded to the power of two ``KP``). Steps,
exactly as numerics.md sections 1 and 3:

1. FWHT over ``P`` in float32, butterfly stages h = 1, 2, ..., P/2 (same order as ``transforms.hadamard._fwht``,
   so the float32 result is bit-identical);
2. ``H_K^T`` over the K axis in float64 (each term is exact, the float64 sum rounds once) when
   ``NBP * KP <= 64``; larger K runs this step in ``hadamard_k_step_kernel`` (a float64 GEMM), after this
   kernel's FWHT and before its quantization;
3. multiply by the float32 constant ``1/sqrt(n_block)``;
4. xmin = min(min x, 0) * clip_min, xmax = max(max x, 0) * clip, s = max((xmax - xmin) / qmax, 1e-8),
   z = clamp(round(-xmin / s), 0, qmax), q = clamp(round(x / s) + z, 0, qmax) with IEEE division (div_rn);
5. pack two 4-bit codes per byte (element 2i low nibble) and store codes, scale (float32), zero point (uint8).

Where the codes, scales and zero points go is given by strides over (batch, token, block) so the same kernel
writes GEMM operands ``[M, K/2]`` and the KV cache ``[B, H, T, D/2]`` in place.

A prologue (``PRE``) computes the row from the layer's previous output as it is loaded, so the decoder needs no
separate launches for it (numerics.md section 8): RMSNorm (float64 like section 5, rounded once), the SwiGLU
product ``(g * sigmoid64(g)) * u`` of a fused gate/up output, or RoPE of one q/k head per block (float32, HF
``rotate_half``). ``ROUND`` then rounds the row to the input's dtype, as the decoder's activations are.
"""

import triton
import triton.language as tl

from .common import div_by, quantize_code, round_half_even


@triton.jit
def _fwht_stages(x, R: tl.constexpr, P: tl.constexpr, LOG2P: tl.constexpr):
    """Unnormalised Walsh-Hadamard transform of each row of ``x`` [R, P] (Sylvester natural order), butterfly
    stages h = 1, 2, ..., P/2 in that order."""
    for stage in tl.static_range(LOG2P):
        v = tl.reshape(x, (R, P // (2 << stage), 2, 1 << stage))
        a, b = tl.split(tl.permute(v, (0, 1, 3, 2)))
        v = tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2))
        x = tl.reshape(v, (R, P))
    return x


@triton.jit
def _fwht(x, R: tl.constexpr, P: tl.constexpr, LOG2P: tl.constexpr, SPLIT: tl.constexpr = True):
    """``_fwht_stages``; with ``SPLIT``, one block of P >= 64 as two passes (same stages in the same order, so the
    same float32 bits): the row as a [P1, P2] matrix (index = i1 * P2 + i2), the stages on the low bits (h = 1 ..
    P2/2) along the last axis, a transpose, the stages on the high bits (h = P2 .. P/2) along the last axis again,
    a transpose back. Alone (float32 out: the AOT plugin's kernel) the two passes compile better (sm_90, 4096, 4
    warps: 704 against 760 SASS instructions, 5 against 39 barriers). Followed by the quantization they compile
    worse, as the JIT specialises the launch (16-byte code stores): 1760 against 1464 instructions, 80 against 63
    registers, 16 against 4 KB of shared memory, 24 against 32 resident warps -- the store's layout reaches back
    into the second pass, which Triton then partly recomputes (614 against 454 FADD). With several blocks per tile
    (R > 1) the one-pass form is used either way (43 blocks of 256: 109 barriers / 164 registers against 133 /
    236)."""
    if LOG2P < 6 or R > 1 or not SPLIT:
        return _fwht_stages(x, R, P, LOG2P)
    L2: tl.constexpr = (LOG2P + 1) // 2
    L1: tl.constexpr = LOG2P - L2
    P1: tl.constexpr = 1 << L1
    P2: tl.constexpr = 1 << L2
    y = _fwht_stages(tl.reshape(x, (R * P1, P2)), R * P1, P2, L2)
    y = tl.permute(tl.reshape(y, (R, P1, P2)), (0, 2, 1))
    y = _fwht_stages(tl.reshape(y, (R * P2, P1)), R * P2, P1, L1)
    y = tl.permute(tl.reshape(y, (R, P2, P1)), (0, 2, 1))
    return tl.reshape(y, (R, P))


@triton.jit
def _rotate(x, hk_ptr, scratch_ptr, inv_sqrt, NBP: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
            P: tl.constexpr, LOG2P: tl.constexpr, K_DOT: tl.constexpr, FWHT_SPLIT: tl.constexpr):
    """numerics.md section 1 on a [NBP, KP, P] tile: FWHT over P, H_K^T over K in float64, * 1/sqrt(n).

    The K step multiplies by ``blockdiag(H_K^T, ...)`` ([R, R], R = NBP*KP, zero padded, float32 +-1 / 0, widened)
    through this program's float32 scratch row. ``K_DOT`` (sm_80 / sm_90: float64 tensor cores): a float64
    ``tl.dot`` (DMMA), 32 columns at a time -- the FWHT tile is stored first (a float64 ``tl.dot`` on the
    butterfly output itself does not lower in Triton 3.6), each column chunk is read, multiplied, rounded once to
    float32 and written back in place after a barrier. Otherwise (no float64 tensor cores, e.g. sm_86-89: an FMA
    loop that needs more registers): one output row at a time, a float64 broadcast-and-sum over the tile. Every
    product is exact, so both are the primitives' float64 sum rounded once; the tile is then reloaded.
    """
    R: tl.constexpr = NBP * KP
    x = _fwht(tl.reshape(x, (R, P)), R, P, LOG2P, FWHT_SPLIT)
    if K > 1:
        rows = tl.arange(0, R)
        cols = tl.arange(0, P)
        if K_DOT:
            PC: tl.constexpr = 32 if P > 32 else P
            tl.store(scratch_ptr + rows[:, None] * P + cols[None, :], x)
            tl.debug_barrier()
            h = tl.load(hk_ptr + rows[:, None] * R + rows[None, :]).to(tl.float64)
            chunk = rows[:, None] * P + tl.arange(0, PC)[None, :]
            for c0 in tl.static_range(0, P, PC):
                y = tl.load(scratch_ptr + c0 + chunk)
                tl.debug_barrier()
                tl.store(scratch_ptr + c0 + chunk, tl.dot(h, y.to(tl.float64), out_dtype=tl.float64).to(tl.float32))
        else:
            x64 = x.to(tl.float64)
            for a in tl.static_range(R):
                h_row = tl.load(hk_ptr + a * R + rows).to(tl.float64)
                tl.store(scratch_ptr + a * P + cols, tl.sum(h_row[:, None] * x64, axis=0).to(tl.float32))
        tl.debug_barrier()
        x = tl.load(scratch_ptr + rows[:, None] * P + cols[None, :])
    return tl.reshape(x, (NBP, KP, P)) * inv_sqrt


# the prologues (``PRE``; ``infoquant_export.kernels.rows`` passes the same numbers)
PRE_NONE = tl.constexpr(0)
PRE_RMSNORM = tl.constexpr(1)
PRE_SWIGLU = tl.constexpr(2)
PRE_ROPE = tl.constexpr(3)
PRE_SCALE = tl.constexpr(4)


@triton.jit
def _min_max(lo_a, hi_a, lo_b, hi_b):
    """``tl.reduce`` combine of (min, max) pairs: a row's range in one reduction (exact in any order)."""
    return tl.minimum(lo_a, lo_b), tl.maximum(hi_a, hi_b)


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    """float32 ``x`` rounded to ``dtype`` (nearest, ties to even) and returned as float32. bfloat16 is rounded with
    integer operations on the bits (Triton's interpreter truncates float32 -> bfloat16; compiled code rounds)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit
def _prologue(x_ptr, row, idx, mask, aux_ptr, aux2_ptr, up_offset, t_rel,
              PRE: tl.constexpr, N: tl.constexpr, N_BLOCK: tl.constexpr, ROUND: tl.constexpr,
              ROW_SCALE: tl.constexpr):
    """The float32 row values at element indices ``idx`` (masked to 0) of row pointer ``x_ptr + row``, after the
    prologue ``PRE`` (module docstring):

    - PRE_RMSNORM: ``x * (1 / sqrt(mean(x^2) + eps)) * w`` in float64 (``aux_ptr``: float32 weight [N],
      ``aux2_ptr``: float64 eps [1]), rounded once to the input dtype (so ``ROUND`` is implied);
    - PRE_SWIGLU: ``(g * sigmoid64(g)) * u``, ``g`` at ``idx``, ``u`` at ``idx + up_offset``; sigmoid64 in float64
      rounded to float32, the two products in float32. A 16-bit input has only 65536 values: ``aux_ptr`` then
      holds sigmoid64 of every bit pattern (float32 [65536], computed on the host) and is indexed by g's bits,
      instead of a float64 exp per element (1/64 rate on sm_86/87/89);
    - PRE_ROPE: ``x * cos + rotate_half(x) * sin`` per block of ``N_BLOCK`` (one head) in float32, cos / sin rows
      ``t_rel`` of ``aux_ptr`` / ``aux2_ptr`` (float32 [seq_len, N_BLOCK]);
    - PRE_SCALE: ``x * ROW_SCALE`` (a float32 constant): the last step of a Hadamard whose ``H_K^T`` step ran
      outside the kernel (the input is then its float64 result, rounded to float32 here, numerics.md section 1).
    """
    dtype = x_ptr.dtype.element_ty
    raw = tl.load(x_ptr + row + idx, mask=mask, other=0.0)
    x = raw.to(tl.float32)
    if PRE == PRE_RMSNORM:
        x64 = x.to(tl.float64)
        flat = tl.reshape(x64 * x64, (x64.numel,))
        inv_rms = 1.0 / tl.sqrt(tl.sum(flat, axis=0) / N + tl.load(aux2_ptr))  # div.rn.f64, sqrt.rn.f64
        w = tl.load(aux_ptr + idx, mask=mask, other=0.0).to(tl.float64)
        x = ((x64 * inv_rms) * w).to(dtype).to(tl.float32)
    elif PRE == PRE_SWIGLU:
        u = tl.load(x_ptr + row + up_offset + idx, mask=mask, other=0.0).to(tl.float32)
        if dtype.primitive_bitwidth == 16:
            sig = tl.load(aux_ptr + raw.to(tl.uint16, bitcast=True).to(tl.int32), mask=mask, other=0.0)
        else:
            sig = (1.0 / (1.0 + tl.exp(-x.to(tl.float64)))).to(tl.float32)
        x = (x * sig) * u
    elif PRE == PRE_ROPE:
        half: tl.constexpr = N_BLOCK // 2
        col = idx % N_BLOCK
        partner = idx - col + (col + half) % N_BLOCK
        rot = tl.load(x_ptr + row + partner, mask=mask, other=0.0).to(tl.float32)
        rot = tl.where(col < half, -rot, rot)
        cos = tl.load(aux_ptr + t_rel * N_BLOCK + col, mask=mask, other=0.0)
        sin = tl.load(aux2_ptr + t_rel * N_BLOCK + col, mask=mask, other=0.0)
        x = x * cos + rot * sin
    elif PRE == PRE_SCALE:
        x = x * ROW_SCALE
    if ROUND and PRE != PRE_RMSNORM:
        x = _round_to(x, dtype)
    return x


@triton.jit
def hadamard_quantize_kernel(
    x_ptr, stride_xr,                    # input rows; element (r, j, col) at r*stride_xr + j*N_BLOCK + col
    hk_ptr, scratch_ptr, inv_sqrt,       # K > 1: blockdiag(H_K^T) f32 [R, R], f32 scratch [programs, R*P]
                                         # (R = NBP*KP); float32 1/sqrt(n_block)
    codes_ptr, scale_ptr, zero_ptr,      # outputs (QUANT)
    y_ptr, stride_yr,                    # float output (not QUANT): the rotated row
    seq_len, pos0,                       # row r = b * seq_len + s is written at token position pos0 + s
    pos_ptr, t_cap,                      # POS_PTR: pos0 read from pos_ptr [1] int32; tokens >= t_cap not written
    stride_cb, stride_ct, stride_cj,     # codes byte strides over batch, token, block
    stride_sb, stride_st, stride_sj,     # scale / zero element strides over batch, token, block
    clip, clip_min,
    aux_ptr, aux2_ptr, up_offset,        # prologue operands (PRE, see _prologue); unused otherwise
    row0,                                # this launch's first row: program i handles row row0 + i
    NB: tl.constexpr, NBP: tl.constexpr, N_BLOCK: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
    P: tl.constexpr, LOG2P: tl.constexpr,
    ROTATE: tl.constexpr, QUANT: tl.constexpr, PER_BLOCK: tl.constexpr, BITS: tl.constexpr,
    PLANES: tl.constexpr = False,        # 4-bit: write the codes unpacked as int8 planes (see below)
    PRE: tl.constexpr = 0, ROUND: tl.constexpr = False, ROW_SCALE: tl.constexpr = 1.0,
    POS_PTR: tl.constexpr = False,       # the position from device memory (a CUDA-graph decode step)
    K_DOT: tl.constexpr = True,          # the K step (K > 1) as a float64 tl.dot (see _rotate)
    SLICED: tl.constexpr = False,        # one of several launches over the rows (row0 > 0 possible)
    FAST_DIV: tl.constexpr = False,      # x / scale as common.div_by's exact multiply-and-correct (compiled only)
    FWHT_SPLIT: tl.constexpr = False,    # a single block's FWHT as two passes (see _fwht)
):
    program = tl.program_id(0).to(tl.int64)
    r = row0 + program if SLICED else program  # row0 only when sliced: its 64-bit row math costs registers
    j = tl.arange(0, NBP)[:, None, None]
    a = tl.arange(0, KP)[None, :, None]
    c = tl.arange(0, P)[None, None, :]
    col = a * P + c
    mask = (j < NB) & (col < N_BLOCK)
    x = _prologue(x_ptr, r * stride_xr, j * N_BLOCK + col, mask, aux_ptr, aux2_ptr, up_offset, r % seq_len,
                  PRE, NB * N_BLOCK, N_BLOCK, ROUND, ROW_SCALE)
    if ROTATE:
        x = _rotate(x, hk_ptr, scratch_ptr + program * (NBP * KP * P), inv_sqrt, NBP, K, KP, P, LOG2P, K_DOT,
                    FWHT_SPLIT)
    if not QUANT:
        y_dtype = y_ptr.dtype.element_ty
        tl.store(y_ptr + r * stride_yr + j * N_BLOCK + col, _round_to(x, y_dtype).to(y_dtype), mask=mask)
    else:
        qmax: tl.constexpr = (1 << BITS) - 1
        # padded elements are 0, and the range includes 0 anyway, so they never change min/max
        if PER_BLOCK:
            lo, hi = tl.reduce((x, x), 2, _min_max)
            lo, hi = tl.reduce((lo, hi), 1, _min_max)
        else:
            flat = tl.reshape(x, (NBP * KP * P,))
            lo, hi = tl.reduce((flat, flat), 0, _min_max)
        lo = tl.minimum(lo, 0.0) * clip_min
        hi = tl.maximum(hi, 0.0) * clip
        scale = tl.maximum(tl.div_rn(hi - lo, tl.full(hi.shape, qmax, tl.float32)), 1e-8)
        zero = tl.minimum(tl.maximum(round_half_even(tl.div_rn(-lo, scale)), 0.0), qmax)
        zero_int = zero.to(tl.int32)
        inv_scale = tl.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
        if PER_BLOCK:
            s3 = scale[:, None, None]
            i3 = inv_scale[:, None, None]
            z3 = zero_int[:, None, None]
        else:
            s3 = scale
            i3 = inv_scale
            z3 = zero_int
        q = quantize_code(div_by(x, s3, i3, FAST_DIV), z3, qmax)

        b = r // seq_len
        if POS_PTR:
            t = tl.load(pos_ptr).to(tl.int64) + r % seq_len
        else:
            t = pos0 + r % seq_len
        in_cache = (t >= 0) & (t < t_cap)  # a position outside the cache writes nothing
        if BITS == 4:
            lo_c, hi_c = tl.split(tl.reshape(q, (NBP, KP, P // 2, 2)))
            jj = tl.arange(0, NBP)[:, None, None]
            byte = a * (P // 2) + tl.arange(0, P // 2)[None, None, :]
            bmask = (jj < NB) & (byte < N_BLOCK // 2) & in_cache
            c_ofs = codes_ptr + b * stride_cb + t * stride_ct + jj * stride_cj + byte
            if PLANES:  # int8 row [even elements (n/2) | odd elements (n/2)]: the GEMM's A_PLANES operand
                tl.store(c_ofs, lo_c.to(codes_ptr.dtype.element_ty), mask=bmask)
                tl.store(c_ofs + NB * (N_BLOCK // 2), hi_c.to(codes_ptr.dtype.element_ty), mask=bmask)
            else:
                tl.store(c_ofs, lo_c | (hi_c << 4), mask=bmask)
        else:
            tl.store(codes_ptr + b * stride_cb + t * stride_ct + j * stride_cj + col, q, mask=mask & in_cache)
        sofs = b * stride_sb + t * stride_st
        if PER_BLOCK:
            jb = tl.arange(0, NBP)
            tl.store(scale_ptr + sofs + jb * stride_sj, scale, mask=(jb < NB) & in_cache)
            tl.store(zero_ptr + sofs + jb * stride_sj, zero.to(tl.uint8), mask=(jb < NB) & in_cache)
        else:
            tl.store(scale_ptr + sofs, scale, mask=in_cache)
            tl.store(zero_ptr + sofs, zero.to(tl.uint8), mask=in_cache)


@triton.jit
def _rotated_chunk(x_row, out_row, c0, offs, n, aux_ptr, up_offset, CH: tl.constexpr, PRE: tl.constexpr,
                   ROUND: tl.constexpr, ROW_SCALE: tl.constexpr, ROT_P: tl.constexpr, LOG2P: tl.constexpr,
                   ROT_SCALE: tl.constexpr):
    """One chunk of ``quantize_rows_chunked_kernel(QUANT=False)``: prologue, FWHT of its ROT_P blocks, float32 out."""
    x = _prologue(x_row, c0, offs, c0 + offs < n, aux_ptr, aux_ptr, up_offset, 0, PRE, 0, CH, ROUND, ROW_SCALE)
    if ROT_P > 0:
        x = tl.reshape(_fwht(tl.reshape(x, (CH // ROT_P, ROT_P)), CH // ROT_P, ROT_P, LOG2P), (CH,)) * ROT_SCALE
    tl.store(out_row + c0 + offs, x, mask=c0 + offs < n)


@triton.jit
def quantize_rows_chunked_kernel(
    x_ptr, stride_xr,                    # rows [M, n] (float32 / float16 / bfloat16)
    codes_ptr, stride_cr,                # 4-bit codes: packed [M, n/2] uint8, or int8 planes [M, n] (PLANES)
    scale_ptr, zero_ptr,                 # [M] float32, [M] uint8
    n, clip, clip_min,
    up_offset, aux_ptr,                  # PRE == PRE_SWIGLU: u at x + up_offset, sigmoid table (see _prologue)
    CH: tl.constexpr, PLANES: tl.constexpr, PRE: tl.constexpr = 0, ROUND: tl.constexpr = False,
    ROW_SCALE: tl.constexpr = 1.0,
    ROT_P: tl.constexpr = 0, LOG2P: tl.constexpr = 0, ROT_SCALE: tl.constexpr = 1.0,
    QUANT: tl.constexpr = True, STAGES: tl.constexpr = 1, FAST_DIV: tl.constexpr = False,
    CHUNK_GRID: tl.constexpr = False,
):
    """Per-row 4-bit quantization in chunks of ``CH`` values (a variant of ``hadamard_quantize_kernel`` with
    PER_BLOCK=False, BITS=4; same bits). ``ROT_P`` > 0: a block-diagonal Hadamard of power-of-two blocks of ROT_P
    values (K = 1; CH a multiple of ROT_P), each chunk's blocks rotated as loaded (FWHT, ``* ROT_SCALE`` =
    1/sqrt(ROT_P)), again in pass 2 (the same float32 operations, so the same bits).

    Pass 1 keeps an element-wise running min / max over the chunks and reduces it once (min / max are exact in any
    order; masked elements are 0, which the range includes anyway); pass 2 re-reads the row (from L1 / L2) and
    quantizes it with the same float32 steps. No power-of-two padding of the row (11008 is not padded to 16384)
    and a small register tile, so few warps per row and many rows per SM. ``PRE`` may be PRE_SWIGLU (recomputed
    in pass 2, same bits) or PRE_SCALE; RMSNorm needs the whole row and goes through ``hadamard_quantize_kernel``.

    ``QUANT=False``: one pass that writes the (prologue and) rotated rows as float32 to ``codes_ptr`` instead: the
    FWHT step of a Hadamard whose K step follows in ``hadamard_k_step_kernel`` (ROT_SCALE 1.0). Its chunks are
    independent: with ``CHUNK_GRID`` each program takes one chunk (grid axis 1) instead of looping over the row, so
    a few rows (a decode step) spread over as many SMs as they have chunks.

    ``STAGES`` > 1 software-pipelines both passes' chunk loops (the next chunks copied to shared memory by
    cp.async while this one is reduced / quantized); same values. ``FAST_DIV``: as in ``hadamard_quantize_kernel``.
    """
    tl.static_assert(PRE == PRE_NONE or PRE == PRE_SWIGLU or PRE == PRE_SCALE)
    r = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, CH)
    x_row = x_ptr + r * stride_xr
    if not QUANT:
        out_row = codes_ptr + r * stride_cr
        if CHUNK_GRID:
            _rotated_chunk(x_row, out_row, tl.program_id(1) * CH, offs, n, aux_ptr, up_offset, CH, PRE, ROUND,
                           ROW_SCALE, ROT_P, LOG2P, ROT_SCALE)
        else:
            for c0 in range(0, n, CH):
                _rotated_chunk(x_row, out_row, c0, offs, n, aux_ptr, up_offset, CH, PRE, ROUND, ROW_SCALE, ROT_P,
                               LOG2P, ROT_SCALE)
        return
    mn = tl.zeros((CH,), tl.float32)
    mx = tl.zeros((CH,), tl.float32)
    for c0 in tl.range(0, n, CH, num_stages=STAGES):
        x = _prologue(x_row, c0, offs, c0 + offs < n, aux_ptr, aux_ptr, up_offset, 0, PRE, 0, CH, ROUND, ROW_SCALE)
        if ROT_P > 0:  # masked blocks are all 0 (n is a multiple of ROT_P) and rotate to 0
            x = tl.reshape(_fwht(tl.reshape(x, (CH // ROT_P, ROT_P)), CH // ROT_P, ROT_P, LOG2P), (CH,)) * ROT_SCALE
        mn = tl.minimum(mn, x)
        mx = tl.maximum(mx, x)
    qmax: tl.constexpr = 15
    lo, hi = tl.reduce((mn, mx), 0, _min_max)
    lo = tl.minimum(lo, 0.0) * clip_min
    hi = tl.maximum(hi, 0.0) * clip
    scale = tl.maximum(tl.div_rn(hi - lo, tl.full(hi.shape, qmax, tl.float32)), 1e-8)
    zero = tl.minimum(tl.maximum(round_half_even(tl.div_rn(-lo, scale)), 0.0), qmax)
    zero_int = zero.to(tl.int32)
    inv_scale = tl.div_rn(1.0, scale)
    half = tl.arange(0, CH // 2)
    c_row = codes_ptr + r * stride_cr
    for c0 in tl.range(0, n, CH, num_stages=STAGES):
        x = _prologue(x_row, c0, offs, c0 + offs < n, aux_ptr, aux_ptr, up_offset, 0, PRE, 0, CH, ROUND, ROW_SCALE)
        if ROT_P > 0:  # masked blocks are all 0 (n is a multiple of ROT_P) and rotate to 0
            x = tl.reshape(_fwht(tl.reshape(x, (CH // ROT_P, ROT_P)), CH // ROT_P, ROT_P, LOG2P), (CH,)) * ROT_SCALE
        q = quantize_code(div_by(x, scale, inv_scale, FAST_DIV), zero_int, qmax)
        lo_c, hi_c = tl.split(tl.reshape(q, (CH // 2, 2)))
        byte = c0 // 2 + half
        bmask = byte < n // 2
        if PLANES:
            tl.store(c_row + byte, lo_c.to(codes_ptr.dtype.element_ty), mask=bmask)
            tl.store(c_row + n // 2 + byte, hi_c.to(codes_ptr.dtype.element_ty), mask=bmask)
        else:
            tl.store(c_row + byte, lo_c | (hi_c << 4), mask=bmask)
    tl.store(scale_ptr + r, scale)
    tl.store(zero_ptr + r, zero.to(tl.uint8))


@triton.jit
def hadamard_k_step_kernel(
    y_ptr, out_ptr,                      # float32 rows [R, K * P]: the FWHT output in, the K step out
    ht_ptr,                              # H_K^T as float32 [KA, KB], zero padded (KA, KB: multiples of BA, BK)
    n_cols, out_scale,                   # R * P; the float32 1/sqrt(n) (SCALE)
    K: tl.constexpr, P: tl.constexpr, LOG2P: tl.constexpr, KB: tl.constexpr,
    BA: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr, SCALE: tl.constexpr,
):
    """Step 2 of numerics.md section 1 for a K too large for the row kernel's tile (e.g. 11008 = 172 x 64):
    ``out[r, a, j] = sum_b H_K^T[a, b] * y[r, b, j]`` in float64, rounded once to float32 (then ``* out_scale``
    in float32 when SCALE: step 3).

    A float64 GEMM ``H_K^T [K, K] @ Y [K, R * P]`` with Y's column ``c = r * P + j`` (row r of the FWHT output
    seen as K x P): grid (cdiv(K, BA), cdiv(R * P, BC)), the output-row tiles of one column tile adjacent in
    launch order so they share Y in L2. Every product is exact (+-1 x float32) and the sum is float64, as in the
    primitives' float64 matmul. ``tl.dot`` on float64 operands is DMMA on sm_80 / sm_90 (``mma.sync ... f64``)
    and an FMA loop on sm_86 / 87 / 89. Both operands are loaded as float32 and widened in registers (H_K^T's +-1
    exactly; a float64 ``tl.dot`` on the butterfly output itself does not lower in Triton 3.6, so the FWHT is the
    previous kernel's).
    """
    a0 = tl.program_id(0) * BA
    c = tl.program_id(1).to(tl.int64) * BC + tl.arange(0, BC)
    cmask = c < n_cols
    col_ofs = (c >> LOG2P) * (K * P) + (c & (P - 1))  # element (b, c) of Y at col_ofs + b * P
    rows_a = a0 + tl.arange(0, BA)
    acc = tl.zeros((BA, BC), tl.float64)
    for b0 in range(0, KB, BK):
        rows_b = b0 + tl.arange(0, BK)
        h = tl.load(ht_ptr + rows_a[:, None] * KB + rows_b[None, :]).to(tl.float64)
        y = tl.load(y_ptr + col_ofs[None, :] + rows_b[:, None] * P, mask=(rows_b[:, None] < K) & cmask[None, :],
                    other=0.0)
        acc = tl.dot(h, y.to(tl.float64), acc, out_dtype=tl.float64)
    out = acc.to(tl.float32)
    if SCALE:
        out = out * out_scale
    tl.store(out_ptr + col_ofs[None, :] + rows_a[:, None] * P, out, mask=(rows_a[:, None] < K) & cmask[None, :])


@triton.jit
def dequantize_kernel(
    codes_ptr, scale_ptr, zero_ptr, y_ptr, n_tokens,
    stride_cg, stride_ct,                # codes: byte strides over (batch*head) group and token
    stride_sg,                           # scale / zero: element stride over the group (tokens contiguous)
    stride_yg, stride_yt,                # output strides over group and token
    D: tl.constexpr, DP: tl.constexpr, BT: tl.constexpr, BITS: tl.constexpr,
):
    """x_hat = (codes - z) * s per token (numerics.md section 3); 4-bit codes unpacked from two per byte.

    Grid: (groups, cdiv(n_tokens, BT)); reads only the first ``n_tokens`` of a cache with room for more. ``DP`` is
    ``D`` rounded up to a power of two (masked).
    """
    g = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BT + tl.arange(0, BT)
    tmask = t < n_tokens
    s = tl.load(scale_ptr + g * stride_sg + t, mask=tmask, other=1.0)[:, None]
    z = tl.load(zero_ptr + g * stride_sg + t, mask=tmask, other=0).to(tl.float32)[:, None]
    if BITS == 4:
        half = tl.arange(0, DP // 2)[None, :]
        hmask = tmask[:, None] & (half < D // 2)
        packed = tl.load(codes_ptr + g * stride_cg + t[:, None] * stride_ct + half, mask=hmask, other=0)
        lo = ((packed & 15).to(tl.float32) - z) * s
        hi = ((packed >> 4).to(tl.float32) - z) * s
        out = tl.reshape(tl.join(lo, hi), (BT, DP))
    else:
        cols = tl.arange(0, DP)[None, :]
        codes = tl.load(codes_ptr + g * stride_cg + t[:, None] * stride_ct + cols,
                        mask=tmask[:, None] & (cols < D), other=0)
        out = (codes.to(tl.float32) - z) * s
    cols = tl.arange(0, DP)[None, :]
    tl.store(y_ptr + g * stride_yg + t[:, None] * stride_yt + cols, out.to(y_ptr.dtype.element_ty),
             mask=tmask[:, None] & (cols < D))
