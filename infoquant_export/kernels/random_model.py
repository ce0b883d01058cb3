"""Random-weight W4A4KV4 models of real LLaMA shapes, built in memory (for kernel benchmarks and GPU tests)."""

from __future__ import annotations

import torch

from infoquant_export.config import QuantConfig
from infoquant_export.models.model import LINEAR_ROLES, CausalLM, ModelConfig
from infoquant_export.quant.calibrate import configure_activation_quant
from infoquant_export.transforms.rotate import attach_online_ops, hadamard_schema

SHAPES = {
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_heads=32, num_kv_heads=32,
                      head_dim=128),
    "tinyllama": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_heads=32, num_kv_heads=4,
                      head_dim=64),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3,
                         head_dim=64),
}


def random_w4a4kv4_model(shape: str | dict[str, int], num_layers: int, device: str, seed: int = 0) -> CausalLM:
    """A fake-quant CausalLM of ``shape`` (a ``SHAPES`` name or its dict) with uniform random 4-bit weight codes
    (scale 0.02 / sqrt(in)), Hadamard online ops on q/k and the down_proj input, 4-bit activations (clip 0.9) and
    KV (clip 0.95)."""
    dims = SHAPES[shape] if isinstance(shape, str) else shape
    cfg = ModelConfig(family="llama", rms_norm_eps=1e-5, num_layers=num_layers, **dims)
    gen = torch.Generator().manual_seed(seed)
    d = cfg.head_dim
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    model = CausalLM(cfg, inv_freq).to(device)
    with torch.no_grad():
        model.embed.weight.normal_(0, 1.0, generator=None)
        model.lm_head.weight.normal_(0, cfg.hidden_size ** -0.5)
        for layer in model.layers:
            for role in LINEAR_ROLES:
                linear = layer.linear(role)
                out, inp = linear.weight.shape
                codes = torch.randint(-8, 8, (out, inp), generator=gen, dtype=torch.int8)
                scale = torch.full((out, 1), 0.4 / inp ** 0.5)
                linear.weight.copy_((codes.float() * scale).to(device))
                layer.set_integer_weight(role, codes.to(device), scale.to(device))
    configure_activation_quant(model, QuantConfig(rotation="hadamard", weights="rtn"))
    attach_online_ops(model, hadamard_schema(cfg.hidden_size, d, cfg.intermediate_size))
    return model.eval()
