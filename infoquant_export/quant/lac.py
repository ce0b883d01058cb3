"""LAC: learned activation clipping (reference ``pipelines/lac.py:Lac``), one decoder layer at a time.

Every per-token activation quantizer of the layer (q/k/v input, o_proj input, gate/up input, down_proj input) gets
two logits ``c = (c_max, c_min)``; its clip factors are ``alpha = 0.5 * (1 + sigmoid(c))`` in (0.5, 1), multiplying
the row maximum and minimum. They start at the configured static clip and are trained with AdamW (linear warm-up,
then cosine decay to ``lr * min_lr_ratio``) so that the quantized layer (integer weights, straight-through rounding)
matches the full-precision layer's output on the same inputs; the loss is the MSE divided by its own detached
value. The learned factors are stored as float32 and used by every backend exactly like static clips.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from infoquant_export.config import LacConfig
from infoquant_export.errors import UserError
from infoquant_export.models.model import ActQuantizer, DecoderLayer, activation_sites
from infoquant_export.numerics import DEFAULT, PROFILES, NumericsProfile
from infoquant_export.transforms.infoquant_import import reference_clip_factor


def clip_to_logit(clip: float) -> float:
    """Inverse of ``alpha = 0.5 * (1 + sigmoid(c))`` (alpha clamped into the open interval (0.5, 1))."""
    a = min(max(2.0 * clip - 1.0, 1e-4), 1.0 - 1e-4)
    return math.log(a / (1.0 - a))


def _lr_factor(step: int, total: int, cfg: LacConfig) -> float:
    warm = 0.01 + 0.99 * min(step, cfg.warmup_steps) / cfg.warmup_steps if cfg.warmup_steps else 1.0
    cosine = cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    return warm * cosine


def _set_enabled(layer: DecoderLayer, enabled: bool) -> None:
    for m in layer.modules():
        if isinstance(m, ActQuantizer):
            m.enabled = enabled


def initial_logits(q: ActQuantizer, init: float | None) -> torch.Tensor:
    """LAC start: ``init`` (the profile's factor, e.g. the reference's 0.95) or the quantizer's static clips;
    [2] or [2, groups] for per-head clips."""
    if init is not None:
        return torch.full((2, q.groups) if q.groups > 1 else (2,), clip_to_logit(init))
    if q.groups == 1:
        return torch.tensor([clip_to_logit(float(c)) for c in q.clips()])
    return q.clip_tensor().double().apply_(clip_to_logit).float()


def _store_clips(q: ActQuantizer, logits: torch.Tensor, profile: NumericsProfile) -> None:
    """Learned logits -> clip factors: float32 ``0.5 * (1 + sigmoid(c))``, or under the reference profile the
    reference's float16 storage and rounding ``0.5 * fp16(1 + fp16(sigmoid(fp16(c))))``."""
    if profile.lac_init is not None:
        q.set_clips(reference_clip_factor(logits.detach()))
    else:
        q.set_clips(0.5 * (1.0 + torch.sigmoid(logits.detach().float())))


def train_layer_clips(layer: DecoderLayer, inputs: list[torch.Tensor], targets: list[torch.Tensor],
                      cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, cfg: LacConfig, index: int,
                      seed: int = 0, profile: NumericsProfile = PROFILES[DEFAULT]) -> dict[str, Any]:
    """Train the clip factors of ``layer`` on windows ``inputs`` [1, S, D] -> ``targets``; returns a summary."""
    quantizers = {s: getattr(layer, s) for s in activation_sites(profile) if getattr(layer, s).bits < 16}
    if not quantizers:
        return {}
    _set_enabled(layer, True)
    params = []
    for q in quantizers.values():
        q.lac_logits = torch.nn.Parameter(initial_logits(q, profile.lac_init))
        params.append(q.lac_logits)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    n = len(inputs)
    total = cfg.epochs * math.ceil(n / cfg.batch_size)
    step, curve = 0, []
    try:
        for epoch in range(cfg.epochs):
            order = torch.randperm(n, generator=generator).tolist()
            mses = []
            for b in range(0, n, cfg.batch_size):
                idx = order[b:b + cfg.batch_size]
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * _lr_factor(step, total, cfg)
                x = torch.cat([inputs[i] for i in idx]).requires_grad_(True)
                y = layer(x, cos, sin, mask)[0]
                mse = (y - torch.cat([targets[i] for i in idx])).pow(2).mean()
                if not torch.isfinite(mse):
                    raise UserError(f"LAC layer {index}: the loss became NaN/Inf at epoch {epoch}",
                                    "lower --lac-lr or check the calibration activations")
                opt.zero_grad()
                (mse / mse.detach().clamp_min(1e-30)).backward()
                if not all(torch.isfinite(p.grad).all() for p in params):
                    raise UserError(f"LAC layer {index}: NaN/Inf gradients at epoch {epoch}", "lower --lac-lr")
                opt.step()
                step += 1
                mses.append(float(mse.detach()))
            curve.append(sum(mses) / len(mses))
    finally:
        for q in quantizers.values():
            if q.lac_logits is not None:
                _store_clips(q, q.lac_logits, profile)
                q.lac_logits = None
    return {"mse_curve": curve, "clips": {s: q.clip_tensor().tolist() for s, q in quantizers.items()}}
