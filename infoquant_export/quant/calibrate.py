"""Quantize a (transformed) canonical model: activation/KV quantizers, then RTN or layer-by-layer GPTQ weights."""

from __future__ import annotations

from collections.abc import Callable

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


def _run_layer(layer: DecoderLayer, inputs: list[torch.Tensor], rope: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    return [layer(x, *rope)[0] for x in inputs]


@torch.no_grad()
def quantize_weights_gptq(model: CausalLM, cfg: QuantConfig, windows: torch.Tensor, batch_size: int = 8,
                          progress: bool = True) -> QuantizedWeights:
    """GPTQ layer by layer on calibration windows [N, S].

    Hessians come from the inputs each linear actually sees (after any online rotation), with activation
    quantization off, along the trajectory of the already weight-quantized earlier layers. Memory holds one
    layer's input activations: N * S * hidden floats.
    """
    out: QuantizedWeights = {}
    device = model.device
    with activation_quant_disabled(model):
        x0, cos, sin, mask = model.layer_inputs(windows[:1].to(device))
        inputs = [model.embed(windows[b:b + batch_size].to(device)) for b in range(0, len(windows), batch_size)]
        rope = (cos, sin, mask)
        for i, layer in enumerate(tqdm(model.layers, desc="GPTQ", disable=not progress)):
            for group in GPTQ_GROUPS:
                hessians = _collect_hessians(layer, group, inputs, rope)
                for role in group:
                    weight = layer.linear(role).weight
                    qw = gptq(weight, hessians[role], cfg.w_bits, cfg.w_clip_search, cfg.gptq_damp, cfg.gptq_block_size)
                    _set_weight(layer, role, qw)
                    out[f"layers.{i}.{role}"] = qw
            inputs = _run_layer(layer, inputs, rope)
    return out


def _collect_hessians(layer: DecoderLayer, roles: tuple[str, ...], inputs: list[torch.Tensor],
                      rope: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    accumulators = {r: HessianAccumulator(layer.linear(r).in_features, layer.linear(r).weight.device) for r in roles}

    def hook_for(role: str) -> Callable:
        return lambda _module, args: accumulators[role].add(args[0])

    handles = [layer.linear(r).register_forward_pre_hook(hook_for(r)) for r in roles]
    try:
        _run_layer(layer, inputs, rope)
    finally:
        for handle in handles:
            handle.remove()
    return {r: acc.h for r, acc in accumulators.items()}


def quantize_model(model: CausalLM, cfg: QuantConfig, windows: torch.Tensor | None = None,
                   progress: bool = True) -> QuantizedWeights:
    """Configure activation/KV quantizers and quantize the weights in place; returns the integer weights."""
    configure_activation_quant(model, cfg)
    if cfg.w_bits >= 16:
        return {}
    if cfg.weights == "rtn":
        return quantize_weights_rtn(model, cfg, progress)
    if windows is None:
        raise ValueError("GPTQ needs calibration windows")
    return quantize_weights_gptq(model, cfg, windows, progress=progress)
