"""Pure quantization primitives: the single numerics definition every backend reuses.

The exact arithmetic (dtypes, rounding, order of operations) is specified in ``docs/numerics.md``; every function
here implements one section of it and nothing else. All functions are pure: tensors in, tensors out.

Conventions
- Rounding is round-half-to-even everywhere (``torch.round``), as ONNX ``Round``/``QuantizeLinear`` do.
- Divisions are true IEEE float32 divisions (``x / s``), never a multiplication by a reciprocal.
- Quantization math runs in float32 whatever the input dtype; the dequantized result is cast back to it.
"""

from __future__ import annotations

import torch

SCALE_EPS = 1e-8  # smallest activation scale; an all-zero row quantizes to zeros with this scale


# ---------------------------------------------------------------------------------------------------------------
# integer grids
# ---------------------------------------------------------------------------------------------------------------
def signed_range(bits: int) -> tuple[int, int]:
    """The symmetric signed grid of ``bits`` bits: [-2^(b-1), 2^(b-1) - 1], e.g. [-8, 7] for 4 bits."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def unsigned_max(bits: int) -> int:
    """The largest code of the unsigned grid [0, 2^b - 1], e.g. 15 for 4 bits."""
    return (1 << bits) - 1


# ---------------------------------------------------------------------------------------------------------------
# weights: per-output-channel symmetric (numerics.md section 2)
# ---------------------------------------------------------------------------------------------------------------
def weight_scale(w: torch.Tensor, bits: int, clip: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Per-row symmetric scale ``s = (max|w_row| * clip) / qmax`` (fp32, shape [out, 1]), qmax = 2^(b-1) - 1.

    ``clip`` is a float or a float32 tensor of shape [out, 1] (the MSE clip search result). An all-zero row gets s = 1.
    """
    absmax = w.float().abs().amax(dim=-1, keepdim=True)
    s = (absmax * clip) / signed_range(bits)[1]
    return torch.where(s > 0, s, torch.ones_like(s))


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes ``clamp(round(w / s), qmin, qmax)`` as int8."""
    qmin, qmax = signed_range(bits)
    return torch.clamp(torch.round(w.float() / scale), qmin, qmax).to(torch.int8)


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``codes * s`` in float32."""
    return codes.float() * scale


def fake_quantize_weight(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize then dequantize (float32)."""
    return dequantize_weight(quantize_weight(w, scale, bits), scale)


# ---------------------------------------------------------------------------------------------------------------
# activations and KV: per-token asymmetric (numerics.md section 3)
# ---------------------------------------------------------------------------------------------------------------
def activation_qparams(
    x: torch.Tensor, bits: int, clip: float | torch.Tensor = 1.0, clip_min: float | torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row asymmetric (scale, zero point) over the last dim, both float32 with keepdim.

    xmin = min(min(x), 0) * clip_min, xmax = max(max(x), 0) * clip (clip_min defaults to clip; LAC learns both);
    s = max((xmax - xmin) / qmax, eps); z = clamp(round(-xmin / s), 0, qmax). The range always includes 0, so 0 is
    exactly representable.
    """
    xf = x.float()
    qmax = unsigned_max(bits)
    zero = torch.zeros((), dtype=torch.float32, device=xf.device)
    xmin = torch.minimum(xf.amin(dim=-1, keepdim=True), zero) * (clip if clip_min is None else clip_min)
    xmax = torch.maximum(xf.amax(dim=-1, keepdim=True), zero) * clip
    scale = torch.clamp_min((xmax - xmin) / qmax, SCALE_EPS)
    zero_point = torch.clamp(torch.round(-xmin / scale), 0, qmax)
    return scale, zero_point


def quantize_activation(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``clamp(round(x / s) + z, 0, qmax)`` as uint8."""
    q = torch.round(x.float() / scale) + zero_point
    return torch.clamp(q, 0, unsigned_max(bits)).to(torch.uint8)


def dequantize_activation(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """``(codes - z) * s`` in float32."""
    return (codes.float() - zero_point) * scale


def fake_quantize_activation(
    x: torch.Tensor, bits: int, clip: float | torch.Tensor = 1.0, group_size: int | None = None,
    clip_min: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token (or per-group along the last dim) asymmetric quantize-dequantize; returns x's dtype.

    ``bits >= 16`` is the identity. ``group_size`` splits the last dim into groups of that size (per head for KV).
    """
    if bits >= 16:
        return x
    shape = x.shape
    xg = x if group_size is None else x.reshape(*shape[:-1], shape[-1] // group_size, group_size)
    scale, zero_point = activation_qparams(xg, bits, clip, clip_min)
    out = dequantize_activation(quantize_activation(xg, scale, zero_point, bits), scale, zero_point)
    return out.reshape(shape).to(x.dtype)


def integer_activation(x: torch.Tensor, bits: int, clip: float | torch.Tensor = 1.0,
                       clip_min: float | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(codes - z)`` as float32 (integer-valued, |.| <= 2^b - 1) and the float32 scale [..., 1]."""
    scale, zero_point = activation_qparams(x, bits, clip, clip_min)
    return quantize_activation(x, scale, zero_point, bits).float() - zero_point, scale


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round`` in the forward pass, identity gradient (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def fake_quantize_activation_ste(x: torch.Tensor, bits: int, clip: torch.Tensor | float,
                                 clip_min: torch.Tensor | float, group_size: int | None = None) -> torch.Tensor:
    """Differentiable per-row fake quantization for learning clip factors (LAC): the same steps as
    :func:`activation_qparams` / :func:`fake_quantize_activation` with straight-through rounding; gradients reach
    ``x``, ``clip`` and ``clip_min`` through the scale and zero point. Training only (the deployed path is exact)."""
    if group_size is not None:
        shape = x.shape
        grouped = x.reshape(*shape[:-1], shape[-1] // group_size, group_size)
        return fake_quantize_activation_ste(grouped, bits, clip, clip_min).reshape(shape)
    xf = x.float()
    qmax = unsigned_max(bits)
    zero = torch.zeros((), dtype=torch.float32, device=xf.device)
    xmin = torch.minimum(xf.amin(dim=-1, keepdim=True), zero) * clip_min
    xmax = torch.maximum(xf.amax(dim=-1, keepdim=True), zero) * clip
    scale = torch.clamp_min((xmax - xmin) / qmax, SCALE_EPS)
    zero_point = torch.clamp(round_ste(-xmin / scale), 0, qmax)
    q = torch.clamp(round_ste(xf / scale) + zero_point, 0, qmax)
    return ((q - zero_point) * scale).to(x.dtype)


def integer_linear(a_int: torch.Tensor, a_scale: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """``((a_int @ w_codes^T) * a_scale) * w_scale + bias`` (numerics.md section 5).

    Both operands hold integers, so the float32 GEMM is exact in any summation order while every partial sum stays
    below 2^24 (|a| <= 15, |w| <= 8: in_features < 139810), like the int32 accumulator of an INT4 kernel.
    """
    y = (a_int @ w_codes.T) * a_scale * w_scale
    return y if bias is None else y + bias


# ---------------------------------------------------------------------------------------------------------------
# deterministic float ops (numerics.md section 5): reductions and transcendentals in float64, rounded once
# ---------------------------------------------------------------------------------------------------------------
def sigmoid64(x: torch.Tensor) -> torch.Tensor:
    """``1 / (1 + exp(-x))`` evaluated in float64, rounded to x's dtype."""
    return (1.0 / (1.0 + torch.exp(-x.double()))).to(x.dtype)


def softmax64(scores: torch.Tensor) -> torch.Tensor:
    """``exp(s - max(s)) / sum(exp(s - max(s)))`` over the last dim, in float64 (returns float64)."""
    s = scores.double()
    e = torch.exp(s - s.amax(dim=-1, keepdim=True))
    return e / e.sum(dim=-1, keepdim=True)


# ---------------------------------------------------------------------------------------------------------------
# packing (numerics.md section 4): two 4-bit codes per byte along the last dim, element 2i in the low nibble
# ---------------------------------------------------------------------------------------------------------------
def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack signed int4 codes in [-8, 7] (any int dtype, last dim even) into uint8, low nibble first."""
    return pack_uint4(codes.to(torch.int16) & 0xF)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 [..., n/2] -> int8 [..., n] in [-8, 7]."""
    u = unpack_uint4(packed).to(torch.int16)
    return torch.where(u >= 8, u - 16, u).to(torch.int8)


def pack_uint4(codes: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 4-bit codes in [0, 15] (last dim even) into uint8, low nibble first."""
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd last dimension ({codes.shape[-1]}) into 4-bit pairs")
    c = codes.to(torch.int16)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > 15):
        raise ValueError("4-bit codes out of range [0, 15]")
    lo, hi = c[..., 0::2], c[..., 1::2]
    return (lo | (hi << 4)).to(torch.uint8)


def unpack_uint4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_uint4`: uint8 [..., n/2] -> uint8 [..., n] in [0, 15]."""
    p = packed.to(torch.int16)
    out = torch.stack((p & 0xF, (p >> 4) & 0xF), dim=-1)
    return out.reshape(*packed.shape[:-1], packed.shape[-1] * 2).to(torch.uint8)
