"""The 4-bit KV cache (numerics.md section 3): :class:`KVCache4`, ``quantize_kv`` (per token and head, after
RoPE and the per-head Hadamard), ``dequantize_kv`` and ``rope_rows`` (the decoder's q)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infoquant_export.kernels import kernel_module
from infoquant_export.kernels.checks import (
    FLOAT_DTYPES,
    KernelInputError,
    _check_contiguous,
    _check_device,
    _check_dtype,
    _pow2,
    triton_cdiv,
)
from infoquant_export.kernels.rows import (
    PRE_ROPE,
    Prologue,
    _apply_prologue,
    _launch_rows,
    _rotate_unfused,
    hadamard,
    row_tile,
)


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
