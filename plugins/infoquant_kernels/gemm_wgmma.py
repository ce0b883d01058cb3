"""W4A4 GEMM on sm_90 with the int8 warpgroup MMAs kept in flight (Gluon: explicit TMA ring, barriers and waits).

Same bits as ``gemm.w4a4_gemm_tma_kernel`` on int8 planes of both operands: ``acc`` is the same int32 (integer
addition is exact in any order) and the epilogue the same float32 steps in the same order (``gemm.gemm_scale``, then
the residual).

Why it exists: Triton 3.6 keeps a ``tl.dot`` asynchronous across loop iterations only when its accumulator is
float32 (the pipeliner's rule "don't make the dot async if the accumulator is not fp32"). Every int8 ``tl.dot``
loop therefore ends each K step with ``wgmma.wait_group 0``: the tensor cores drain before the next step's MMAs
issue. This kernel issues step i's MMAs, then waits until at most one group is in flight (``wait_group 1``: step
i - 1 has finished), refills the stage that step i - 1 read, and goes on, so the tensor cores always have the next
group queued behind the running one.

Operands: int8 planes ``[rows, K]`` (each row the even-k codes then the odd-k codes, ``PackedRows.planes`` /
``PackedWeight.planes``). Both operands use the same permutation of k, so one int8 GEMM of depth K over the rows as
stored is ``acc``: a K step is one ``[BM, BK]`` and one ``[BN, BK]`` TMA tile (BK = 2 * BK2 of the other kernels).
Gluon kernels do not run in Triton's interpreter: ``ops`` launches this one on sm_90 GPUs only.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from .gemm import gemm_scale


def mma_layout(BM: int, BN: int, num_warps: int) -> gl.NVMMADistributedLayout:
    """The accumulator layout (the kernel's ``ACC_LAYOUT``): warps tiled from [4, 1] along M while 16-row warp
    slices cover less than BM, then along N; instruction shape [16, n, 32] with n the largest int8 wgmma N (<= 224)
    dividing the columns of a warp."""
    warps = [4, 1]
    while warps[0] * warps[1] != num_warps:
        if BM > 16 * warps[0]:
            warps[0] *= 2
        else:
            warps[1] *= 2
    share = BN // warps[1]
    n = next(n for n in (224, 208, 192, 176, 160, 144, 128, 112, 96, 80, 64, 48, 32, 24, 16, 8)
             if n <= share and share % n == 0)
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=warps, instr_shape=[16, n, 32])


@gluon.jit
def _tile_offsets(tile, M, N, BM: gl.constexpr, BN: gl.constexpr, GROUP_M: gl.constexpr):
    """(row, column) offsets of output tile ``tile`` in ``gemm.tile_of``'s grouped order (GROUP_M row tiles share
    each weight tile in L2)."""
    grid_m = gl.cdiv(M, BM)
    grid_n = gl.cdiv(N, BN)
    first_m = (tile // (GROUP_M * grid_n)) * GROUP_M
    size_m = gl.minimum(grid_m - first_m, GROUP_M)
    return (first_m + (tile % (GROUP_M * grid_n)) % size_m) * BM, ((tile % (GROUP_M * grid_n)) // size_m) * BN


@gluon.jit
def _load_step(a_desc, w_desc, a_bufs, w_bufs, ready, stage, k, off_m, off_n):
    """Start the TMA copies of K step ``k`` of the tile at (``off_m``, ``off_n``) into ring stage ``stage``
    (completion counted on its barrier)."""
    BK: gl.constexpr = a_desc.block_type.shape[1]
    mbarrier.expect(ready.index(stage), a_desc.block_type.nbytes + w_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(a_desc, [off_m, k * BK], ready.index(stage), a_bufs.index(stage))
    tma.async_copy_global_to_shared(w_desc, [off_n, k * BK], ready.index(stage), w_bufs.index(stage))


@gluon.jit
def _scaled(acc, off_m, off_n, M, N, a_scale_ptr, a_zero_ptr, w_scale_ptr, w_rowsum_ptr, bias_ptr,
            HAS_BIAS: gl.constexpr, layout: gl.constexpr):
    """``gemm.gemm_scale`` on the accumulator's rows and columns (its layout's slices)."""
    offs_m = off_m + gl.arange(0, acc.shape[0], layout=gl.SliceLayout(1, layout))
    offs_n = off_n + gl.arange(0, acc.shape[1], layout=gl.SliceLayout(0, layout))
    return gemm_scale(acc, offs_m, offs_n, M, N, a_scale_ptr, a_zero_ptr, w_scale_ptr, w_rowsum_ptr, bias_ptr,
                      HAS_BIAS)


@gluon.jit
def w4a4_gemm_wgmma_kernel(
    a_desc, a_scale_ptr, a_zero_ptr,     # activation planes: descriptor of int8 [M, K], block [BM, BK]
    w_desc, w_scale_ptr, w_rowsum_ptr,   # weight planes: descriptor of int8 [N, K], block [BN, BK]
    bias_ptr, res_desc, y_desc,          # bias [N] f32; residual / output: descriptors of [M, N], block [BM, BN]
    M, N, K,
    HAS_BIAS: gl.constexpr, HAS_RES: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
    ACC_LAYOUT: gl.constexpr,            # mma_layout(BM, BN, num_warps)
):
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = w_desc.block_type.shape[0]
    off_m, off_n = _tile_offsets(gl.program_id(0), M, N, BM, BN, GROUP_M)

    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BM, BK], a_desc.layout)
    w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BN, BK], w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for b in gl.static_range(STAGES):
        mbarrier.init(ready.index(b), count=1)

    steps = gl.cdiv(K, BK)
    # prologue: steps 0 .. STAGES - 2 in flight (the wrapper asks for K >= (STAGES - 1) * BK; a guard here costs
    # the overlap: ptxas serializes the MMAs of 8-warp tiles when the zeroed accumulator has two paths, C7515)
    for p in gl.static_range(STAGES - 1):
        _load_step(a_desc, w_desc, a_bufs, w_bufs, ready, p, p, off_m, off_n)

    acc = gl.zeros((BM, BN), dtype=gl.int32, layout=ACC_LAYOUT)
    for i in range(steps):
        s = i % STAGES
        mbarrier.wait(ready.index(s), (i // STAGES) & 1)
        acc = warpgroup_mma(a_bufs.index(s), w_bufs.index(s).permute((1, 0)), acc, use_acc=i > 0, is_async=True)
        # at most this step's group in flight: step i - 1 has read its stage, which now takes step i + STAGES - 1
        acc, _, _ = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a_bufs.index(s), w_bufs.index(s)))
        if i + STAGES - 1 < steps:
            _load_step(a_desc, w_desc, a_bufs, w_bufs, ready, (i + STAGES - 1) % STAGES, i + STAGES - 1, off_m, off_n)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    for b in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(b))

    # epilogue: _scaled, then the residual; the residual and output tiles move through shared memory by TMA (rows /
    # columns past M / N read as zeros and are not written), so the kernel holds no per-element addresses (a pointer
    # epilogue takes 255 registers and spills at 128 x 256)
    if HAS_RES:
        res_smem = gl.allocate_shared_memory(res_desc.dtype, res_desc.block_type.shape, res_desc.layout)
        res_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(res_bar, count=1)
        mbarrier.expect(res_bar, res_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(res_desc, [off_m, off_n], res_bar, res_smem)
    y = _scaled(acc, off_m, off_n, M, N, a_scale_ptr, a_zero_ptr, w_scale_ptr, w_rowsum_ptr, bias_ptr, HAS_BIAS,
                ACC_LAYOUT)
    if HAS_RES:
        mbarrier.wait(res_bar, 0)
        mbarrier.invalidate(res_bar)
        y = res_smem.load(ACC_LAYOUT).to(gl.float32) + y
    y_smem = gl.allocate_shared_memory(y_desc.dtype, y_desc.block_type.shape, y_desc.layout)
    y_smem.store(y.to(y_desc.dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(y_desc, [off_m, off_n], y_smem)
    tma.store_wait(pendings=0)


@gluon.jit
def w4a4_gemm_wgmma_persistent_kernel(
    a_desc, a_scale_ptr, a_zero_ptr, w_desc, w_scale_ptr, w_rowsum_ptr, bias_ptr, res_desc, y_desc,
    M, N, K,
    HAS_BIAS: gl.constexpr, HAS_RES: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
    ACC_LAYOUT: gl.constexpr, NUM_PROGRAMS: gl.constexpr,
):
    """``w4a4_gemm_wgmma_kernel`` as ``NUM_PROGRAMS`` programs that each take the output tiles ``pid, pid +
    NUM_PROGRAMS, ...``. The TMA ring runs on into the next tile (the loads are counted over all of a program's
    tiles), so its first K steps load while this tile's epilogue runs; the next load's tile offsets are carried and
    recomputed once per tile. The residual of a tile is fetched into the output tile's buffer when its K loop
    starts, after the previous tile's output copy has left it (``store_wait``). Same bits per tile."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = w_desc.block_type.shape[0]
    pid = gl.program_id(0)
    steps = gl.cdiv(K, BK)
    tiles = (gl.cdiv(M, BM) * gl.cdiv(N, BN) - pid + NUM_PROGRAMS - 1) // NUM_PROGRAMS  # the wrapper: >= 1
    loads = tiles * steps

    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BM, BK], a_desc.layout)
    w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BN, BK], w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    c_smem = gl.allocate_shared_memory(y_desc.dtype, y_desc.block_type.shape, y_desc.layout)  # residual in, y out
    res_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for b in gl.static_range(STAGES):
        mbarrier.init(ready.index(b), count=1)
    mbarrier.init(res_bar, count=1)
    # the wrapper asks for K >= (STAGES - 1) * BK: the prologue's steps are all in the first tile
    l_m, l_n = _tile_offsets(pid, M, N, BM, BN, GROUP_M)
    for p in gl.static_range(STAGES - 1):
        _load_step(a_desc, w_desc, a_bufs, w_bufs, ready, p, p, l_m, l_n)
    l_k = STAGES - 1  # the next load: K step l_k of the tile at (l_m, l_n), the program's l_t-th
    l_t = 0

    acc = gl.zeros((BM, BN), dtype=gl.int32, layout=ACC_LAYOUT)
    for t in range(tiles):
        off_m, off_n = _tile_offsets(pid + t * NUM_PROGRAMS, M, N, BM, BN, GROUP_M)
        if HAS_RES:
            tma.store_wait(pendings=0)  # the previous tile's output has been read out of c_smem
            gl.thread_barrier()
            mbarrier.expect(res_bar, res_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(res_desc, [off_m, off_n], res_bar, c_smem)
        for i in range(steps):
            g = t * steps + i
            s = g % STAGES
            mbarrier.wait(ready.index(s), (g // STAGES) & 1)
            acc = warpgroup_mma(a_bufs.index(s), w_bufs.index(s).permute((1, 0)), acc, use_acc=i > 0,
                                is_async=True)
            acc, _, _ = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a_bufs.index(s), w_bufs.index(s)))
            if g + STAGES - 1 < loads:
                if l_k == steps:  # the ring runs on into the program's next tile
                    l_k = 0
                    l_t += 1
                    l_m, l_n = _tile_offsets(pid + l_t * NUM_PROGRAMS, M, N, BM, BN, GROUP_M)
                _load_step(a_desc, w_desc, a_bufs, w_bufs, ready, (g + STAGES - 1) % STAGES, l_k, l_m, l_n)
                l_k += 1
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        y = _scaled(acc, off_m, off_n, M, N, a_scale_ptr, a_zero_ptr, w_scale_ptr, w_rowsum_ptr, bias_ptr,
                    HAS_BIAS, ACC_LAYOUT)
        if HAS_RES:
            mbarrier.wait(res_bar, t & 1)
            y = c_smem.load(ACC_LAYOUT).to(gl.float32) + y
        else:
            tma.store_wait(pendings=0)  # the previous tile's output has been read out of c_smem
        gl.thread_barrier()
        c_smem.store(y.to(y_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(y_desc, [off_m, off_n], c_smem)
    tma.store_wait(pendings=0)
    for b in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(b))
    mbarrier.invalidate(res_bar)
