"""Hadamard + 4-bit quantization of a row with the FWHT's data movement laid out by hand (Gluon; compiled GPUs only).

Same codes, scale and zero point as ``quantize.hadamard_quantize_kernel`` for one Hadamard block over a whole row
of n = 1024 * W values (W warps, a power of two up to 8), no prologue, packed codes: the same float32 operations
in the same order (numerics.md section 1: butterfly stages h = 1, 2, ..., n/2, each ``(a + b, a - b)``; then
``* 1/sqrt(n)``; then the per-token asymmetric quantization of ``quantize.hadamard_quantize_kernel``).

The row is a [W, 32, 32] tensor (element ``1024 w + 32 r + c``). Each FWHT stage is a butterfly along one axis,
and the axis a stage works on always lies in each thread's registers:
- ``ROW`` layout: thread (warp w, lane r) holds the 32 values c of (w, r). Stages h = 1 .. 16 (along c), and the
  quantization and packing (an element pair 2i, 2i + 1 is in one thread), 16 contiguous code bytes per thread;
- ``LANES``: thread (w, c) holds the 32 values r of (w, c). Stages h = 32 .. 512 (along r);
- ``WARPS``: each thread holds the W values w of a (r, c). Stages h = 1024 .. n/2.
Between them, two layout conversions through shared memory. Triton's own layouts for ``tl`` code put the stage
axes across lanes and warps, where every stage needs shuffles, selects or a barrier.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from .common import div_by, quantize_code, round_half_even
from .quantize import _min_max


def row_layouts(warps: int) -> tuple[gl.BlockedLayout, gl.BlockedLayout, gl.BlockedLayout, gl.BlockedLayout]:
    """The kernel's ``ROW``, ``LANES``, ``WARPS`` layouts of the [W, 32, 32] row and ``BYTES`` of its [W, 32, 16]
    code bytes (module docstring)."""
    return (gl.BlockedLayout([1, 1, 32], [1, 32, 1], [warps, 1, 1], [2, 1, 0]),
            gl.BlockedLayout([1, 32, 1], [1, 1, 32], [warps, 1, 1], [1, 2, 0]),
            gl.BlockedLayout([warps, 1, 32 // warps], [1, 32, 1], [1, 1, warps], [2, 1, 0]),
            gl.BlockedLayout([1, 1, 16], [1, 32, 1], [warps, 1, 1], [2, 1, 0]))


@gluon.jit
def _stages(x, AXIS: gl.constexpr, LOG2S: gl.constexpr):
    """Butterfly stages h = 1 .. S/2 along axis AXIS of the [A, B, C] tensor ``x`` (its size S = 2^LOG2S)."""
    A: gl.constexpr = x.shape[0]
    B: gl.constexpr = x.shape[1]
    C: gl.constexpr = x.shape[2]
    for st in gl.static_range(LOG2S):
        if AXIS == 2:
            v = gl.permute(gl.reshape(x, [A, B, C // (2 << st), 2, 1 << st]), [0, 1, 2, 4, 3])
            a, b = gl.split(v)
            v = gl.permute(gl.join(a + b, a - b), [0, 1, 2, 4, 3])
        elif AXIS == 1:
            v = gl.permute(gl.reshape(x, [A, B // (2 << st), 2, 1 << st, C]), [0, 1, 3, 4, 2])
            a, b = gl.split(v)
            v = gl.permute(gl.join(a + b, a - b), [0, 1, 4, 2, 3])
        else:
            v = gl.permute(gl.reshape(x, [A // (2 << st), 2, 1 << st, B, C]), [0, 2, 3, 4, 1])
            a, b = gl.split(v)
            v = gl.permute(gl.join(a + b, a - b), [0, 4, 1, 2, 3])
        x = gl.reshape(v, [A, B, C])
    return x


@gluon.jit
def hadamard_quantize_gluon_kernel(
    x_ptr, stride_xr,                    # input rows [M, n] (float16 / bfloat16 / float32)
    codes_ptr, stride_cr,                # packed codes [M, n/2] uint8 (element 2i in the low nibble)
    scale_ptr, zero_ptr,                 # [M] float32, [M] uint8
    inv_sqrt, clip, clip_min,            # float32 1/sqrt(n); the activation clipping ratios
    W: gl.constexpr, LOG2W: gl.constexpr, FAST_DIV: gl.constexpr,
    ROW: gl.constexpr, LANES: gl.constexpr, WARPS: gl.constexpr, BYTES: gl.constexpr,   # row_layouts(W)
):
    row = gl.program_id(0).to(gl.int64)
    w = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, ROW)))[:, None, None]
    r = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, ROW)))[None, :, None]
    c = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, ROW)))[None, None, :]
    x = gl.load(x_ptr + row * stride_xr + (w * 1024 + r * 32 + c)).to(gl.float32)
    x = _stages(x, 2, 5)
    x = _stages(gl.convert_layout(x, LANES), 1, 5)
    x = _stages(gl.convert_layout(x, WARPS), 0, LOG2W)
    x = gl.convert_layout(x, ROW) * inv_sqrt

    lo, hi = gl.reduce((x, x), 2, _min_max)
    lo, hi = gl.reduce((lo, hi), 1, _min_max)
    lo, hi = gl.reduce((lo, hi), 0, _min_max)
    lo = gl.minimum(lo, 0.0) * clip_min
    hi = gl.maximum(hi, 0.0) * clip
    scale = gl.maximum(gl.div_rn(hi - lo, 15.0), 1e-8)
    zero = gl.minimum(gl.maximum(round_half_even(gl.div_rn(-lo, scale)), 0.0), 15.0)
    q = quantize_code(div_by(x, scale, gl.div_rn(1.0, scale), FAST_DIV), zero.to(gl.int32), 15)

    even, odd = gl.split(gl.reshape(q, [W, 32, 16, 2]))
    packed = gl.convert_layout(even | (odd << 4), BYTES)
    bw = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, BYTES)))[:, None, None]
    br = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, BYTES)))[None, :, None]
    bc = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, BYTES)))[None, None, :]
    gl.store(codes_ptr + row * stride_cr + (bw * 512 + br * 16 + bc), packed)
    gl.store(scale_ptr + row, scale)
    gl.store(zero_ptr + row, zero.to(gl.uint8))
