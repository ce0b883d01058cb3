"""W4A4 GEMM: 4-bit activation codes x 4-bit weight codes, int32 accumulation, float epilogue.

``y[m, n] = ((acc[m, n] - z_a[m] * rowsum_w[n]) * s_a[m]) * s_w[n] (+ bias[n]) (+ residual[m, n])`` with
``acc = q_a @ codes_w^T`` (numerics.md section 5, "integer GEMM": the zero point is removed through the weight row
sums, which is the same integer as ``(q_a - z_a) @ codes_w^T``; the float steps run in this order, unfused).

Operand layout: both operands are packed two codes per byte along K, element 2i in the low nibble (numerics.md
section 4; activations unsigned [0, 15], weights two's complement [-8, 7]); weights row-major ``[N, K/2]``, i.e.
exactly the ONNX INT4 initializer. The kernel never interleaves nibbles: the low nibbles of both operands are the
even-k elements and the high nibbles the odd-k elements, so ``acc = lo_a @ lo_w^T + hi_a @ hi_w^T`` -- two int8
dot products of depth BK2 per K step.

Tensor cores: the codes are int8 operands of ``tl.dot(..., out_dtype=int32)`` -- on sm_90 Triton emits
``wgmma.mma_async ... .s32.s8.s8`` (Hopper has no INT4 MMA), on sm_80/86/87/89 ``mma.sync ... m16n8k32 .s8.s8``
(IMMA). INT4 MMA (``m16n8k64 .s4``) would double sm_80-89 peak but Triton does not expose it; int8 is exact too.
"""

import triton
import triton.language as tl

from .common import unpack_a, unpack_w


@triton.jit
def grouped_tile(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program: grouped ordering, GROUP_M row tiles share weight tiles in L2."""
    return tile_of(tl.program_id(0), M, N, BM, BN, GROUP_M)


@triton.jit
def tile_of(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of output tile number ``pid`` in ``grouped_tile``'s order."""
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    group = pid // (GROUP_M * grid_n)
    first_m = group * GROUP_M
    size_m = min(grid_m - first_m, GROUP_M)
    return first_m + (pid % (GROUP_M * grid_n)) % size_m, (pid % (GROUP_M * grid_n)) // size_m


@triton.jit
def gemm_scale(acc, offs_m, offs_n, M, N, a_scale_ptr, a_zero_ptr, w_scale_ptr, w_rowsum_ptr, bias_ptr,
               HAS_BIAS: tl.constexpr):
    """``((acc - z_a * rowsum_w) * s_a) * s_w (+ bias)`` in float32 (vectors loaded masked on the true indices)."""
    m_mask = offs_m < M
    n_mask = offs_n < N
    z = tl.load(a_zero_ptr + offs_m, mask=m_mask, other=0).to(tl.int32)
    rowsum = tl.load(w_rowsum_ptr + offs_n, mask=n_mask, other=0)
    acc = acc - z[:, None] * rowsum[None, :]
    y = acc.to(tl.float32) * tl.load(a_scale_ptr + offs_m, mask=m_mask, other=0.0)[:, None]
    y = y * tl.load(w_scale_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    return y


@triton.jit
def gemm_epilogue(acc, offs_m, offs_n, M, N, a_scale_ptr, a_zero_ptr, w_scale_ptr, w_rowsum_ptr, bias_ptr, res_ptr,
                  y_ptr, stride_rm, stride_ym, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr):
    """``gemm_scale`` (+ residual), stored in y's dtype through masked pointers."""
    y = gemm_scale(acc, offs_m, offs_n, M, N, a_scale_ptr, a_zero_ptr, w_scale_ptr, w_rowsum_ptr, bias_ptr, HAS_BIAS)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if HAS_RES:
        y = tl.load(res_ptr + offs_m[:, None].to(tl.int64) * stride_rm + offs_n[None, :], mask=mask).to(tl.float32) + y
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def tile_pointers(a_ptr, w_ptr, pid_m, pid_n, M, N, stride_am, stride_wn, BM: tl.constexpr, BN: tl.constexpr,
                  BK2: tl.constexpr):
    """(offs_m, offs_n, a_ptrs, w_ptrs): the output tile's rows / columns and the operands' first [., BK2] byte
    tiles; rows and columns past the matrix wrap (their loads stay in bounds, their outputs are masked)."""
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK2)
    rm = tl.max_contiguous(tl.multiple_of(offs_m % M, BM), BM)
    rn = tl.max_contiguous(tl.multiple_of(offs_n % N, BN), BN)
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    return offs_m, offs_n, a_ptrs, w_ptrs


@triton.jit
def packed_k_loop(a_ptrs, w_ptrs, acc, k_start, k_end, BK2: tl.constexpr, WORDS: tl.constexpr):
    """``acc += lo_a @ lo_w^T + hi_a @ hi_w^T`` over the packed bytes [k_start, k_end) (BK2 per step) of both
    operands' tiles (pointer tiles at byte 0 of the rows)."""
    a_ptrs += k_start
    w_ptrs += k_start
    for _ in range(k_start, k_end, BK2):
        a_lo, a_hi = unpack_a(tl.load(a_ptrs), WORDS)
        w_lo, w_hi = unpack_w(tl.load(w_ptrs), WORDS)
        acc = tl.dot(a_lo, tl.trans(w_lo), acc, out_dtype=tl.int32)
        acc = tl.dot(a_hi, tl.trans(w_hi), acc, out_dtype=tl.int32)
        a_ptrs += BK2
        w_ptrs += BK2
    return acc


@triton.jit
def w4a4_gemm_kernel(
    a_ptr, a_scale_ptr, a_zero_ptr,      # activation codes [M, K/2] uint8, scale [M] f32, zero point [M] uint8
    w_ptr, w_scale_ptr, w_rowsum_ptr,    # weight codes [N, K/2] uint8, scale [N] f32, row sums [N] int32
    bias_ptr, res_ptr, y_ptr,            # bias [N] f32, residual [M, N], output [M, N]
    M, N, K2,
    stride_am, stride_wn, stride_rm, stride_ym,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK2: tl.constexpr, GROUP_M: tl.constexpr,
    WORDS: tl.constexpr = False,         # word-parallel unpacking (inline PTX; compiled code only)
):
    pid_m, pid_n = grouped_tile(M, N, BM, BN, GROUP_M)

    offs_m, offs_n, a_ptrs, w_ptrs = tile_pointers(a_ptr, w_ptr, pid_m, pid_n, M, N, stride_am, stride_wn, BM, BN, BK2)

    acc = packed_k_loop(a_ptrs, w_ptrs, tl.zeros((BM, BN), dtype=tl.int32), 0, K2, BK2, WORDS)
    gemm_epilogue(acc, offs_m, offs_n, M, N, a_scale_ptr, a_zero_ptr, w_scale_ptr, w_rowsum_ptr, bias_ptr, res_ptr,
                  y_ptr, stride_rm, stride_ym, HAS_BIAS, HAS_RES)


@triton.jit
def w4a4_gemm_splitk_kernel(
    a_ptr, w_ptr, part_ptr,              # packed codes as in w4a4_gemm_kernel; int32 partial sums [SPLITS, M, N]
    M, N, K2, k_chunk,                   # k_chunk: packed bytes per split (a multiple of BK2)
    stride_am, stride_wn,
    BM: tl.constexpr, BN: tl.constexpr, BK2: tl.constexpr, GROUP_M: tl.constexpr,
    WORDS: tl.constexpr = False,
):
    """Split-K for few rows (decode): program (tile, split) accumulates the int32 product over its K range
    ``[split * k_chunk, (split + 1) * k_chunk)``; ``w4a4_splitk_epilogue_kernel`` adds the partial sums (integer
    addition: exact in any order, so the same ``acc`` as one pass) and applies the epilogue. With M <= 16 a 4096-wide
    weight has only 128 column tiles of 32, one per SM: splitting K puts several programs on each SM, so the
    weight stream has loads in flight (the one-pass kernel reached 0.44 TB/s on an H100)."""
    pid_m, pid_n = grouped_tile(M, N, BM, BN, GROUP_M)
    split = tl.program_id(1)
    offs_m, offs_n, a_ptrs, w_ptrs = tile_pointers(a_ptr, w_ptr, pid_m, pid_n, M, N, stride_am, stride_wn, BM, BN, BK2)
    k_start = split * k_chunk
    acc = packed_k_loop(a_ptrs, w_ptrs, tl.zeros((BM, BN), dtype=tl.int32), k_start,
                        tl.minimum(k_start + k_chunk, K2), BK2, WORDS)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(part_ptr + (split * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :], acc, mask=mask)


@triton.jit
def w4a4_splitk_epilogue_kernel(
    part_ptr, a_scale_ptr, a_zero_ptr, w_scale_ptr, w_rowsum_ptr, bias_ptr, res_ptr, y_ptr,
    M, N, stride_rm, stride_ym,
    SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):
    """``acc = sum over splits`` of ``w4a4_gemm_splitk_kernel``'s partial sums, then ``gemm_epilogue``."""
    pid_m, pid_n = grouped_tile(M, N, BM, BN, 1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    ptrs = part_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for split in tl.static_range(SPLITS):
        acc += tl.load(ptrs + split * M * N, mask=mask, other=0)
    gemm_epilogue(acc, offs_m, offs_n, M, N, a_scale_ptr, a_zero_ptr, w_scale_ptr, w_rowsum_ptr, bias_ptr, res_ptr,
                  y_ptr, stride_rm, stride_ym, HAS_BIAS, HAS_RES)


@triton.jit
def w4a4_gemm_v2_kernel(
    a_ptr, a_scale_ptr, a_zero_ptr,      # activation codes: packed [M, K/2] uint8, or int8 planes [2, M, K/2]
    w_ptr, w_scale_ptr, w_rowsum_ptr,    # weight codes: packed [N, K/2] uint8, or int8 planes [2, N, K/2]
    bias_ptr, res_ptr, y_ptr,
    M, N, K2,
    stride_am, stride_ap, stride_wn, stride_wp, stride_rm, stride_ym,   # *_p: plane strides (planes only)
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK2: tl.constexpr, GROUP_M: tl.constexpr,
    A_PLANES: tl.constexpr, W_PLANES: tl.constexpr, SWAP: tl.constexpr,
    WORDS: tl.constexpr = False,
):
    """``w4a4_gemm_kernel`` with operand-layout variants (same bits: only the int32 summation order changes, and
    integer addition is exact; the epilogue is the same float32 steps in the same order).

    ``A_PLANES`` / ``W_PLANES``: the operand is stored unpacked as two int8 planes, plane 0 = the even-k elements
    (low nibbles), plane 1 = the odd-k elements (high nibbles), each ``[rows, K/2]``: the tile goes from global to
    shared memory (cp.async, pipelined over ``num_stages``) straight into the tensor cores, with no register unpack.
    ``SWAP``: computes ``acc^T = codes_w @ q_a^T`` so that the weight (unpacked in registers when packed) is the
    left operand, which wgmma reads from registers (no register -> shared memory round trip); the right operand must
    come from shared memory, so this pairs with ``A_PLANES``. The accumulator is transposed before the epilogue.
    """
    pid_m, pid_n = grouped_tile(M, N, BM, BN, GROUP_M)

    offs_m, offs_n, a_ptrs, w_ptrs = tile_pointers(a_ptr, w_ptr, pid_m, pid_n, M, N, stride_am, stride_wn, BM, BN, BK2)

    if SWAP:
        acc = tl.zeros((BN, BM), dtype=tl.int32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.int32)
    for _ in range(0, K2, BK2):
        if A_PLANES:
            a_lo = tl.load(a_ptrs)
            a_hi = tl.load(a_ptrs + stride_ap)
        else:
            a_lo, a_hi = unpack_a(tl.load(a_ptrs), WORDS)
        if W_PLANES:
            w_lo = tl.load(w_ptrs)
            w_hi = tl.load(w_ptrs + stride_wp)
        else:
            w_lo, w_hi = unpack_w(tl.load(w_ptrs), WORDS)
        if SWAP:
            acc = tl.dot(w_lo, tl.trans(a_lo), acc, out_dtype=tl.int32)
            acc = tl.dot(w_hi, tl.trans(a_hi), acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(a_lo, tl.trans(w_lo), acc, out_dtype=tl.int32)
            acc = tl.dot(a_hi, tl.trans(w_hi), acc, out_dtype=tl.int32)
        a_ptrs += BK2
        w_ptrs += BK2
    if SWAP:
        acc = tl.trans(acc)

    gemm_epilogue(acc, offs_m, offs_n, M, N, a_scale_ptr, a_zero_ptr, w_scale_ptr, w_rowsum_ptr, bias_ptr, res_ptr,
                  y_ptr, stride_rm, stride_ym, HAS_BIAS, HAS_RES)


@triton.jit
def _tma_tile(a_desc, a_scale_ptr, a_zero_ptr, w_desc, w_scale_ptr, w_rowsum_ptr, bias_ptr, res_desc, y_desc,
              M, N, K2, pid_m, pid_n, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, BM: tl.constexpr,
              BN: tl.constexpr, BK2: tl.constexpr, A_PLANES: tl.constexpr, W_PLANES: tl.constexpr,
              WORDS: tl.constexpr):
    """One output tile of ``w4a4_gemm_tma_kernel``: the K loop, the epilogue, the store."""
    off_m = pid_m * BM
    off_n = pid_n * BN
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k in range(0, K2, BK2):
        if A_PLANES:
            a_lo = a_desc.load([off_m, k])
            a_hi = a_desc.load([off_m, K2 + k])
        else:
            a_lo, a_hi = unpack_a(a_desc.load([off_m, k]), WORDS)
        if W_PLANES:
            w_lo = w_desc.load([off_n, k])
            w_hi = w_desc.load([off_n, K2 + k])
        else:
            w_lo, w_hi = unpack_w(w_desc.load([off_n, k]), WORDS)
        acc = tl.dot(a_lo, tl.trans(w_lo), acc, out_dtype=tl.int32)
        acc = tl.dot(a_hi, tl.trans(w_hi), acc, out_dtype=tl.int32)
    y = gemm_scale(acc, off_m + tl.arange(0, BM), off_n + tl.arange(0, BN), M, N, a_scale_ptr, a_zero_ptr,
                   w_scale_ptr, w_rowsum_ptr, bias_ptr, HAS_BIAS)
    if HAS_RES:
        y = res_desc.load([off_m, off_n]).to(tl.float32) + y
    y_desc.store([off_m, off_n], y.to(y_desc.dtype))


@triton.jit
def w4a4_gemm_tma_kernel(
    a_desc, a_scale_ptr, a_zero_ptr,     # activation codes: descriptor of packed [M, K/2] uint8 or planes [M, K] int8
    w_desc, w_scale_ptr, w_rowsum_ptr,   # weight codes: descriptor of packed [N, K/2] uint8 or planes [N, K] int8
    bias_ptr, res_desc, y_desc,          # residual / output: descriptors of [M, N], block [BM, BN]
    M, N, K2,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK2: tl.constexpr, GROUP_M: tl.constexpr,
    A_PLANES: tl.constexpr, W_PLANES: tl.constexpr,
    WORDS: tl.constexpr = False, PERSISTENT: tl.constexpr = False, NUM_SMS: tl.constexpr = 1,
):
    """``w4a4_gemm_v2_kernel`` (same bits) with every tile moved through tensor descriptors: on sm_90 the Tensor
    Memory Accelerator copies each operand tile ``[rows, BK2]`` to shared memory (``cp.async.bulk.tensor``,
    pipelined over ``num_stages``) and the residual / output tiles in and out, so the kernel holds no per-element
    pointer tensors (the register pressure that makes the pointer kernels spill at M = 2048; see
    ``kernels.resources``). Rows past M / N read as zeros and are not written (the descriptors' bounds).
    A plane operand is one int8 row per token or channel, ``[even-k codes (K/2) | odd-k codes (K/2)]``: its low
    plane at column ``k``, its high plane at ``K/2 + k``. sm_80-89 have no TMA (Triton lowers descriptor loads to
    plain loads there): ``ops`` offers this kernel on sm_90.

    ``PERSISTENT``: a grid of at most ``NUM_SMS`` programs, each looping over output tiles ``pid, pid + NUM_SMS,
    ...`` in the grouped order; the loop is flattened (``tl.range(..., flatten=True)``) so that the next tile's
    operand loads are in flight during this tile's epilogue. Each tile computes the same bits.
    """
    if PERSISTENT:
        num_tiles = tl.cdiv(M, BM) * tl.cdiv(N, BN)
        for tile in tl.range(tl.program_id(0), num_tiles, NUM_SMS, flatten=True):
            pid_m, pid_n = tile_of(tile, M, N, BM, BN, GROUP_M)
            _tma_tile(a_desc, a_scale_ptr, a_zero_ptr, w_desc, w_scale_ptr, w_rowsum_ptr, bias_ptr, res_desc, y_desc,
                      M, N, K2, pid_m, pid_n, HAS_BIAS, HAS_RES, BM, BN, BK2, A_PLANES, W_PLANES, WORDS)
    else:
        pid_m, pid_n = grouped_tile(M, N, BM, BN, GROUP_M)
        _tma_tile(a_desc, a_scale_ptr, a_zero_ptr, w_desc, w_scale_ptr, w_rowsum_ptr, bias_ptr, res_desc, y_desc,
                  M, N, K2, pid_m, pid_n, HAS_BIAS, HAS_RES, BM, BN, BK2, A_PLANES, W_PLANES, WORDS)
