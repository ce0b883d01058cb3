"""The fake-quant model under the infoquant-reference profile: separate q/k/v and gate/up quantizers, V16, K clip,
per-head o_proj quantizer, float16 RMSNorm output and down_proj Hadamard (hand-computed expectations)."""

from __future__ import annotations

import math

import torch

from infoquant_export.config import QuantConfig
from infoquant_export.models.model import CausalLM, DecoderLayer, ModelConfig, rms_norm
from infoquant_export.numerics import PROFILES
from infoquant_export.quant.calibrate import configure_activation_quant
from infoquant_export.quant.primitives import fake_quantize_activation
from infoquant_export.transforms.hadamard import apply_hadamard, apply_hadamard_fp16

CFG = ModelConfig("llama", vocab_size=32, hidden_size=16, intermediate_size=48, num_layers=1, num_heads=2,
                  num_kv_heads=1, head_dim=8, rms_norm_eps=1e-5)
REF = QuantConfig(numerics="infoquant-reference", kv_clip_ratio=0.9)


def _model(cfg: QuantConfig) -> CausalLM:
    model = CausalLM(CFG, torch.ones(4))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    configure_activation_quant(model, cfg)
    return model


def test_quantizer_layout_v16_k_clip():
    layer = _model(REF).layers[0]
    assert layer.v_cache.bits == 16 and not layer.v_cache.active  # V stays float: KV4 = K4/V16
    assert layer.k_cache.bits == 4 and layer.k_cache.clip == 0.9
    assert all(getattr(layer, s).bits == 4 for s in ("qkv_in", "k_in", "v_in", "gate_up_in", "up_in", "down_in"))
    assert layer.o_in.heads_fp16 and layer.o_in.group_size == 8 and layer.o_in.groups == 2
    default = _model(QuantConfig()).layers[0]
    assert default.v_cache.bits == 4 and default.k_in.bits == 16 and not default.o_in.heads_fp16


def test_separate_input_quantizers_each_use_their_own_clip():
    layer: DecoderLayer = _model(REF).layers[0]
    layer.qkv_in.clip, layer.k_in.clip, layer.v_in.clip = 0.9, 0.6, 0.75
    h = torch.randn(1, 5, 16)
    q, k, v = layer.project(h, layer.qkv_in, ("q", "k", "v"))
    for out, role, clip in ((q, "q", 0.9), (k, "k", 0.6), (v, "v", 0.75)):
        want = layer.linear(role)(fake_quantize_activation(h, 4, clip))  # x -> its own A4 quantizer -> linear
        assert torch.equal(out, want), role
    layer.gate_up_in.clip, layer.up_in.clip = 0.9, 0.55
    gate, up = layer.project(h, layer.gate_up_in, ("gate", "up"))
    assert torch.equal(up, layer.up(fake_quantize_activation(h, 4, 0.55)))
    assert not torch.equal(gate, layer.gate(fake_quantize_activation(h, 4, 0.55)))


def test_v_is_not_quantized_in_the_cache():
    model = _model(REF)
    ids = torch.randint(0, 32, (1, 6))
    _, present = model(ids)
    k, v = present[0]
    x, cos, sin, mask = model.layer_inputs(ids)
    layer = model.layers[0]
    h = layer.norm_attn(x)
    v_float = layer.v(fake_quantize_activation(h, 4, layer.v_in.clip)).view(1, 6, 1, 8).transpose(1, 2)
    assert torch.equal(v, v_float)
    assert len(torch.unique(k[0, 0, 0])) <= 16  # K is 4-bit per token and head


def test_rmsnorm_output_rounded_to_float16():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    # rms = sqrt((1 + 4 + 9 + 16) / 4) = sqrt(7.5); outputs x / sqrt(7.5) rounded once to float16
    want = [float(torch.tensor(v / math.sqrt(7.5 + 1e-5), dtype=torch.float64).half()) for v in (1, 2, 3, 4)]
    assert rms_norm(x, torch.ones(4), 1e-5, fp16=True)[0].tolist() == want  # e.g. 0.36515 -> 0.365234375
    assert want[0] == 0.365234375
    assert rms_norm(x, torch.ones(4), 1e-5)[0, 0].item() != want[0]


def test_down_proj_hadamard_in_float16():
    # n = 4 (K = 1): FWHT [1, 2, 3, 4] = [10, -2, -4, 0], fp16, / sqrt(4) -> [5, -1, -2, 0]
    assert apply_hadamard_fp16(torch.tensor([1.0, 2.0, 3.0, 4.0])).tolist() == [5.0, -1.0, -2.0, 0.0]
    # the unnormalised FWHT output is rounded to float16 before the division: 8 x 10000 = 80000 > 65504 -> inf
    assert apply_hadamard_fp16(torch.full((8,), 10_000.0))[0].item() == math.inf
    assert apply_hadamard(torch.full((8,), 10_000.0))[0].item() == 28284.271484375  # float32 80000 / sqrt(8)
    x = torch.randn(3, 48)  # 48 = 12 * 4 (Paley block): the same matrix up to float16 rounding
    out = apply_hadamard_fp16(x)
    assert torch.equal(out, out.half().float()) and torch.allclose(out, apply_hadamard(x), atol=5e-3)


def test_model_under_the_profile_uses_the_float16_paths():
    model = _model(REF)
    assert model.numerics is PROFILES["infoquant-reference"] and model.layers[0].numerics.fp16_rounding
    h = model.layers[0].norm_attn(torch.randn(2, 3, 16))
    assert torch.equal(h, h.half().float())
