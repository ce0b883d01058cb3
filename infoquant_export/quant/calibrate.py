"""Quantize a (transformed) canonical model: activation/KV quantizers, then RTN or layer-by-layer GPTQ weights."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from infoquant_export.config import QuantConfig
from infoquant_export.models.model import (
    LINEAR_ROLES,
    ActQuantizer,
    CausalLM,
    DecoderLayer,
    activation_quant_disabled,
    activation_sites,
)
from infoquant_export.quant.lac import train_layer_clips
from infoquant_export.quant.weights import HessianAccumulator, QuantizedWeight, gptq, rtn

# Linears that share an input are calibrated together; later groups see the already-quantized earlier ones.
GPTQ_GROUPS = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))

QuantizedWeights = dict[str, QuantizedWeight]


def configure_activation_quant(model: CausalLM, cfg: QuantConfig) -> None:
    """Set bits and clip ratios of every activation (per token) and KV (per token, per head) quantizer, under the
    config's numerics profile (infoquant-reference: separate q/k/v and gate/up quantizers, per-head float16 o_proj
    input, V unquantized)."""
    profile = cfg.profile
    model.set_numerics(profile)
    for layer in model.layers:
        for site in activation_sites(profile):
            q = getattr(layer, site)
            q.bits, q.clip = cfg.a_bits, cfg.a_clip_ratio
        if profile.o_proj_per_head_fp16:
            layer.o_in.heads_fp16, layer.o_in.group_size = True, model.cfg.head_dim
            layer.o_in.groups = model.cfg.num_heads
        for q in (layer.k_cache, layer.v_cache):
            q.bits, q.clip, q.group_size = cfg.kv_bits, cfg.kv_clip_ratio, model.cfg.head_dim
        if not profile.quantize_v:
            layer.v_cache.bits = 16


def attach_integer_weights(model: CausalLM, weights: QuantizedWeights) -> None:
    """Let every quantized linear run as an integer GEMM on quantized activations (numerics.md section 5)."""
    for key, qw in weights.items():
        _, index, role = key.split(".")
        model.layers[int(index)].set_integer_weight(role, qw.codes.to(model.device), qw.scale.to(model.device))


def _set_weight(layer: DecoderLayer, role: str, qw: QuantizedWeight) -> None:
    layer.linear(role).weight.copy_(qw.dequantize().to(layer.linear(role).weight.device))


class LacPass:
    """LAC inside a layer-by-layer weight pass: full-precision targets before a layer's weights are quantized,
    then the clip factors are trained on the same inputs (the first ``cfg.lac.num_windows`` windows)."""

    def __init__(self, cfg: QuantConfig, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> None:
        self.cfg, self.cos, self.sin, self.mask = cfg, cos, sin, mask
        self.report: dict[int, dict] = {}

    def windows(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        rows = [x[j:j + 1] for x in xs for j in range(len(x))]
        return rows[:self.cfg.lac.num_windows] if self.cfg.lac.num_windows else rows

    def targets(self, layer: DecoderLayer, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [layer(x, self.cos, self.sin, self.mask)[0] for x in self.windows(xs)]

    def train(self, layer: DecoderLayer, index: int, xs: list[torch.Tensor], targets: list[torch.Tensor]) -> None:
        with torch.enable_grad():
            self.report[index] = train_layer_clips(layer, self.windows(xs), targets, self.cos, self.sin, self.mask,
                                                   self.cfg.lac, index, self.cfg.calibration.seed, self.cfg.profile)
        for q in layer.modules():  # back to the pass's state (activation quantization off)
            if isinstance(q, ActQuantizer):
                q.enabled = False


@torch.no_grad()
def quantize_weights_rtn(model: CausalLM, cfg: QuantConfig, windows: torch.Tensor | None = None,
                         progress: bool = True, report: dict | None = None) -> QuantizedWeights:
    """Round-to-nearest every decoder linear (embedding and LM head stay in float); with LAC, layer by layer on
    calibration windows."""
    out: QuantizedWeights = {}
    if not cfg.lac.enabled:
        for i, layer in enumerate(tqdm(model.layers, desc="RTN", disable=not progress)):
            out.update(_rtn_layer(layer, i, cfg))
        return out
    if windows is None:
        raise ValueError("LAC needs calibration windows")
    device = model.device
    with activation_quant_disabled(model):
        _, cos, sin, mask = model.layer_inputs(windows[:1].to(device))
        lac = LacPass(cfg, cos, sin, mask)
        xs = [model.embed(windows[b:b + 8].to(device)) for b in range(0, len(windows), 8)]
        for i, layer in enumerate(tqdm(model.layers, desc="RTN+LAC", disable=not progress)):
            targets = lac.targets(layer, xs)
            out.update(_rtn_layer(layer, i, cfg))
            lac.train(layer, i, xs, targets)
            xs = [layer(x, cos, sin, mask)[0] for x in xs]
    if report is not None:
        report["lac"] = lac.report
    return out


def _rtn_layer(layer: DecoderLayer, index: int, cfg: QuantConfig) -> QuantizedWeights:
    out: QuantizedWeights = {}
    for role in LINEAR_ROLES:
        qw = rtn(layer.linear(role).weight, cfg.w_bits, cfg.w_clip_search, cfg.profile.weight_grid)
        _set_weight(layer, role, qw)
        out[f"layers.{index}.{role}"] = qw
    return out


@torch.no_grad()
def quantize_weights_gptq(model: CausalLM, cfg: QuantConfig, windows: torch.Tensor, batch_size: int = 8,
                          progress: bool = True, report: dict | None = None) -> QuantizedWeights:
    """GPTQ layer by layer on calibration windows [N, S] (then LAC per layer when enabled).

    Hessians come from the inputs each linear actually sees (after any online rotation), with activation
    quantization off, along the trajectory of the already weight-quantized earlier layers; within a layer the
    groups q/k/v -> o -> gate/up -> down are quantized in order, each seeing the quantized earlier ones. The
    layer's sub-steps are the model's own (one forward per layer); memory holds a few tensors of N * S rows.
    """
    out: QuantizedWeights = {}
    device = model.device
    with activation_quant_disabled(model):
        _, cos, sin, mask = model.layer_inputs(windows[:1].to(device))
        lac = LacPass(cfg, cos, sin, mask) if cfg.lac.enabled else None
        xs = [model.embed(windows[b:b + batch_size].to(device)) for b in range(0, len(windows), batch_size)]
        for i, layer in enumerate(tqdm(model.layers, desc="GPTQ+LAC" if lac else "GPTQ", disable=not progress)):
            targets = lac.targets(layer, xs) if lac else None
            hs = [layer.norm_attn(x) for x in xs]
            out.update(_gptq_group(layer, i, ("q", "k", "v"), hs, cfg))
            pre_o = [layer.attention_core(h, cos, sin, mask, None)[0] for h in hs]
            out.update(_gptq_group(layer, i, ("o",), pre_o, cfg))
            mids = [layer.mid_residual(x, layer.attention_out(p)) for x, p in zip(xs, pre_o, strict=True)]
            del hs, pre_o
            out.update(_gptq_group(layer, i, ("gate", "up"), [layer.norm_mlp(x) for x in mids], cfg))
            ms = [layer.mlp_hidden(layer.norm_mlp(x)) for x in mids]
            out.update(_gptq_group(layer, i, ("down",), ms, cfg))
            if lac:
                lac.train(layer, i, xs, targets)
            xs = [layer.out_residual(x, layer.mlp_out(m)) for x, m in zip(mids, ms, strict=True)]
    if report is not None and lac:
        report["lac"] = lac.report
    return out


def _gptq_group(layer: DecoderLayer, index: int, roles: tuple[str, ...], inputs: list[torch.Tensor],
                cfg: QuantConfig) -> QuantizedWeights:
    """GPTQ the linears ``roles`` of one layer, which all consume ``inputs``; installs the quantized weights."""
    h = hessian(inputs)
    out: QuantizedWeights = {}
    for role in roles:
        qw = gptq(layer.linear(role).weight, h, cfg.w_bits, cfg.w_clip_search, cfg.gptq_damp, cfg.gptq_block_size,
                  cfg.profile.weight_grid)
        _set_weight(layer, role, qw)
        out[f"layers.{index}.{role}"] = qw
    return out


def hessian(inputs: list[torch.Tensor]) -> torch.Tensor:
    """``2/N * sum x^T x`` over all rows of ``inputs`` (float32 products, float64 accumulation)."""
    acc = HessianAccumulator(inputs[0].shape[-1], inputs[0].device)
    for x in inputs:
        acc.add(x)
    return acc.h


def quantize_model(model: CausalLM, cfg: QuantConfig, windows: torch.Tensor | None = None,
                   progress: bool = True, report: dict | None = None) -> QuantizedWeights:
    """Configure activation/KV quantizers and quantize the weights in place (and learn clip factors with LAC);
    returns the integer weights. ``report`` (when given) receives the LAC summary per layer."""
    configure_activation_quant(model, cfg)
    if cfg.w_bits >= 16:
        return {}
    if cfg.weights == "rtn":
        weights = quantize_weights_rtn(model, cfg, windows, progress, report)
    elif windows is None:
        raise ValueError("GPTQ needs calibration windows")
    else:
        weights = quantize_weights_gptq(model, cfg, windows, progress=progress, report=report)
    attach_integer_weights(model, weights)
    return weights
