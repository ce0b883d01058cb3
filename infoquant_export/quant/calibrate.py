"""Quantize a (transformed) canonical model: activation/KV quantizers, then RTN or layer-by-layer GPTQ weights."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from infoquant_export.config import QuantConfig
from infoquant_export.models.model import LINEAR_ROLES, CausalLM, DecoderLayer, activation_quant_disabled
from infoquant_export.quant.weights import HessianAccumulator, QuantizedWeight, gptq, rtn

# Linears that share an input are calibrated together; later groups see the already-quantized earlier ones.
GPTQ_GROUPS = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))

QuantizedWeights = dict[str, QuantizedWeight]


def configure_activation_quant(model: CausalLM, cfg: QuantConfig) -> None:
    """Set bits and clip ratios of every activation (per token) and KV (per token, per head) quantizer."""
    for layer in model.layers:
        for q in (layer.qkv_in, layer.o_in, layer.gate_up_in, layer.down_in):
            q.bits, q.clip = cfg.a_bits, cfg.a_clip_ratio
        for q in (layer.k_cache, layer.v_cache):
            q.bits, q.clip, q.group_size = cfg.kv_bits, cfg.kv_clip_ratio, model.cfg.head_dim


def attach_integer_weights(model: CausalLM, weights: QuantizedWeights) -> None:
    """Let every quantized linear run as an integer GEMM on quantized activations (numerics.md section 5)."""
    for key, qw in weights.items():
        _, index, role = key.split(".")
        model.layers[int(index)].set_integer_weight(role, qw.codes.to(model.device), qw.scale.to(model.device))


def _set_weight(layer: DecoderLayer, role: str, qw: QuantizedWeight) -> None:
    layer.linear(role).weight.copy_(qw.dequantize().to(layer.linear(role).weight.device))


@torch.no_grad()
def quantize_weights_rtn(model: CausalLM, cfg: QuantConfig, progress: bool = True) -> QuantizedWeights:
    """Round-to-nearest every decoder linear (embedding and LM head stay in float)."""
    out: QuantizedWeights = {}
    for i, layer in enumerate(tqdm(model.layers, desc="RTN", disable=not progress)):
        for role in LINEAR_ROLES:
            qw = rtn(layer.linear(role).weight, cfg.w_bits, cfg.w_clip_search)
            _set_weight(layer, role, qw)
            out[f"layers.{i}.{role}"] = qw
    return out


@torch.no_grad()
def quantize_weights_gptq(model: CausalLM, cfg: QuantConfig, windows: torch.Tensor, batch_size: int = 8,
                          progress: bool = True) -> QuantizedWeights:
    """GPTQ layer by layer on calibration windows [N, S].

    Hessians come from the inputs each linear actually sees (after any online rotation), with activation
    quantization off, along the trajectory of the already weight-quantized earlier layers; within a layer the
    groups q/k/v -> o -> gate/up -> down are quantized in order, each seeing the quantized earlier ones. The
    layer's sub-steps are the model's own (one forward per layer); memory holds a few tensors of N * S rows.
    """
    out: QuantizedWeights = {}
    device = model.device
    with activation_quant_disabled(model):
        _, cos, sin, mask = model.layer_inputs(windows[:1].to(device))
        xs = [model.embed(windows[b:b + batch_size].to(device)) for b in range(0, len(windows), batch_size)]
        for i, layer in enumerate(tqdm(model.layers, desc="GPTQ", disable=not progress)):
            hs = [layer.norm_attn(x) for x in xs]
            out.update(_gptq_group(layer, i, ("q", "k", "v"), hs, cfg))
            pre_o = [layer.attention_core(h, cos, sin, mask, None)[0] for h in hs]
            out.update(_gptq_group(layer, i, ("o",), pre_o, cfg))
            xs = [layer.mid_residual(x, layer.attention_out(p)) for x, p in zip(xs, pre_o, strict=True)]
            del hs, pre_o
            out.update(_gptq_group(layer, i, ("gate", "up"), [layer.norm_mlp(x) for x in xs], cfg))
            ms = [layer.mlp_hidden(layer.norm_mlp(x)) for x in xs]
            out.update(_gptq_group(layer, i, ("down",), ms, cfg))
            xs = [layer.out_residual(x, layer.mlp_out(m)) for x, m in zip(xs, ms, strict=True)]
    return out


def _gptq_group(layer: DecoderLayer, index: int, roles: tuple[str, ...], inputs: list[torch.Tensor],
                cfg: QuantConfig) -> QuantizedWeights:
    """GPTQ the linears ``roles`` of one layer, which all consume ``inputs``; installs the quantized weights."""
    h = hessian(inputs)
    out: QuantizedWeights = {}
    for role in roles:
        qw = gptq(layer.linear(role).weight, h, cfg.w_bits, cfg.w_clip_search, cfg.gptq_damp, cfg.gptq_block_size)
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
                   progress: bool = True) -> QuantizedWeights:
    """Configure activation/KV quantizers and quantize the weights in place; returns the integer weights."""
    configure_activation_quant(model, cfg)
    if cfg.w_bits >= 16:
        return {}
    if cfg.weights == "rtn":
        weights = quantize_weights_rtn(model, cfg, progress)
    elif windows is None:
        raise ValueError("GPTQ needs calibration windows")
    else:
        weights = quantize_weights_gptq(model, cfg, windows, progress=progress)
    attach_integer_weights(model, weights)
    return weights
