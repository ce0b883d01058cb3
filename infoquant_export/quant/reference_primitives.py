"""Primitives of the ``infoquant-reference`` numerics profile (docs/numerics.md section 7).

These reproduce the InfoQuant reference code's quantizers where they differ from ours; everything else reuses
:mod:`infoquant_export.quant.primitives`. Pure functions, round half to even (``torch.round``) everywhere.
"""

from __future__ import annotations

import torch

from infoquant_export.quant.primitives import round_ste, unsigned_max

O_SCALE_EPS = 1e-6  # the reference's scale floor of the per-head o_proj path (in float16: 17 * 2^-24)
WEIGHT_RANGE_EPS = 1e-5  # the reference's floor of a weight row's range before dividing by qmax


def reference_weight_range(bits: int) -> tuple[int, int]:
    """The reference's weight code range: symmetric formula with maxq = 2^b - 1, i.e. [-2^b, 2^b - 1]
    ([-16, 15] at 4 bits: a 5-bit signed grid)."""
    return -(1 << bits), (1 << bits) - 1


def reference_weight_qparams(w: torch.Tensor, bits: int,
                             shrink: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric per-row (scale, zero point) of the reference's ``WeightQuantizer.find_params``.

    xmin = min(row_min, 0), xmax = max(row_max, 0) (both 0: -1, +1). Initial (``shrink`` None): the scale is
    clamp(xmax - xmin, 1e-5) / qmax; search candidate ``shrink`` = p: (p * xmax - p * xmin) / qmax (no clamp);
    z = round(-p * xmin / s). float32, shapes [out, 1]. Only the scale is used by the codes
    (see :func:`reference_weight_codes`).
    """
    wf = w.float()
    qmax = unsigned_max(bits)
    zero = torch.zeros((), dtype=torch.float32, device=wf.device)
    xmin = torch.minimum(wf.amin(dim=-1, keepdim=True), zero)
    xmax = torch.maximum(wf.amax(dim=-1, keepdim=True), zero)
    dead = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(dead, -1.0, xmin), torch.where(dead, 1.0, xmax)
    if shrink is None:
        scale = torch.clamp_min(xmax - xmin, WEIGHT_RANGE_EPS) / qmax
        return scale, torch.round(-xmin / scale)
    xmin1, xmax1 = shrink * xmin, shrink * xmax
    scale = (xmax1 - xmin1) / qmax
    return scale, torch.round(-xmin1 / scale)


def reference_weight_search_error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                                  norm: float) -> torch.Tensor:
    """The reference search's per-row error ``sum |s * (clamp(round(w / s) + z, 0, qmax) - z) - w|^norm``
    (asymmetric, with the zero point, although the final codes ignore it)."""
    wf = w.float()
    q = torch.clamp(torch.round(wf / scale) + zero, 0, unsigned_max(bits))
    return (scale * (q - zero) - wf).abs().pow(norm).sum(dim=-1, keepdim=True)


def reference_weight_codes(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """``clamp(round(w / s), -2^b, 2^b - 1)`` as int8: the reference's ``fake_quantize`` ignores the zero point."""
    qmin, qmax = reference_weight_range(bits)
    return torch.clamp(torch.round(w.float() / scale), qmin, qmax).to(torch.int8)


def _group_clip(clip: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A clip factor (scalar or one per group) as float32 broadcastable to ``like`` [..., groups, 1]."""
    c = torch.as_tensor(clip, dtype=torch.float32, device=like.device)
    return c.reshape(-1, 1) if c.ndim else c


def fake_quantize_heads_fp16(x: torch.Tensor, bits: int, clip: float | torch.Tensor,
                             clip_min: float | torch.Tensor, group_size: int) -> torch.Tensor:
    """The reference's o_proj input quantizer: per token and per head (``group_size``), asymmetric, range **not**
    forced to include 0, every step in float16 (numerics.md section 7.3). Returns x's dtype.

    Each binary op is one correctly rounded float16 operation; the clip multiply is ``fp16(float32(x) * clip)``
    (clip: float, or float32 [groups], e.g. LAC factors 0.5 * fp16(1 + sigmoid(c)), which are float16 values).
    z = round(-xmin / s) may leave [0, qmax]; the codes are clamped to [0, qmax].
    """
    if bits >= 16:
        return x
    shape = x.shape
    xg = x.to(torch.float16).reshape(*shape[:-1], shape[-1] // group_size, group_size)
    qmax = unsigned_max(bits)
    xmax = (xg.amax(dim=-1, keepdim=True).float() * _group_clip(clip, xg)).half()
    xmin = (xg.amin(dim=-1, keepdim=True).float() * _group_clip(clip_min, xg)).half()
    dead = (xmin == 0) & (xmax == 0)
    one = torch.ones((), dtype=torch.float16, device=xg.device)
    xmin, xmax = torch.where(dead, -one, xmin), torch.where(dead, one, xmax)
    scale = torch.clamp_min((xmax - xmin) / qmax, O_SCALE_EPS)
    zero = torch.round(-xmin / scale)
    q = torch.clamp(torch.round(xg / scale) + zero, 0, qmax)
    return (scale * (q - zero)).reshape(shape).to(x.dtype)


def fake_quantize_heads_ste(x: torch.Tensor, bits: int, clip: float | torch.Tensor, clip_min: float | torch.Tensor,
                            group_size: int) -> torch.Tensor:
    """Differentiable float32 version of :func:`fake_quantize_heads_fp16` for LAC (the reference trains its clips
    with the layer in float32): straight-through rounding, gradients reach ``clip`` / ``clip_min`` [groups]."""
    shape = x.shape
    xg = x.float().reshape(*shape[:-1], shape[-1] // group_size, group_size)
    qmax = unsigned_max(bits)
    cmax = clip.reshape(-1, 1) if isinstance(clip, torch.Tensor) and clip.ndim else clip
    cmin = clip_min.reshape(-1, 1) if isinstance(clip_min, torch.Tensor) and clip_min.ndim else clip_min
    xmax = xg.amax(dim=-1, keepdim=True) * cmax
    xmin = xg.amin(dim=-1, keepdim=True) * cmin
    dead = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(dead, -1.0, xmin), torch.where(dead, 1.0, xmax)
    scale = torch.clamp_min((xmax - xmin) / qmax, O_SCALE_EPS)
    zero = round_ste(-xmin / scale)
    q = torch.clamp(round_ste(xg / scale) + zero, 0, qmax)
    return ((q - zero) * scale).reshape(shape).to(x.dtype)


def fp16_round(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest float16 value (overflow gives +-inf), returned in x's dtype."""
    return x.to(torch.float16).to(x.dtype)
