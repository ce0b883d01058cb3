"""The canonical decoder-only transformer: full-precision and W/A/KV fake-quant reference in one module.

Architecture adapters convert a Hugging Face model into this form, so transforms, quantization and export work on
one structure whatever the family (LLaMA, Qwen2, Mistral). The forward pass runs the online ops exactly where a
deployment runs them (see docs/numerics.md, section 5):

    x -> RMSNorm -> A-quant -> q,k,v -> RoPE -> [online Hadamard q,k] -> KV-quant(k, v) -> attention
      -> A-quant -> o -> +residual -> [basis change] -> RMSNorm -> A-quant -> gate,up -> SiLU(gate)*up
      -> [online Hadamard] -> A-quant -> down -> +residual -> [basis change]

The KV cache holds the dequantized K/V values (bit-identical to what a 4-bit cache decodes to), so prefill and
incremental decode compute the same function. ``numerics`` (a :class:`NumericsProfile`, set by ``set_numerics``)
switches on the InfoQuant reference code's quirks (docs/numerics.md section 7); the default changes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from infoquant_export.numerics import DEFAULT, PROFILES, NumericsProfile
from infoquant_export.quant.primitives import (
    fake_quantize_activation,
    fake_quantize_activation_ste,
    integer_activation,
    integer_linear,
    sigmoid64,
    softmax64,
)
from infoquant_export.quant.reference_primitives import fake_quantize_heads_fp16, fake_quantize_heads_ste
from infoquant_export.transforms.hadamard import apply_hadamard, apply_hadamard_fp16

LINEAR_ROLES = ("q", "k", "v", "o", "gate", "up", "down")
ACTIVATION_SITES = ("qkv_in", "o_in", "gate_up_in", "down_in")  # per-token activation quantizers of a layer
# infoquant-reference: q/k/v and gate/up inputs each have their own quantizer (qkv_in serves q, gate_up_in gate)
SEPARATE_SITES = ("qkv_in", "k_in", "v_in", "o_in", "gate_up_in", "up_in", "down_in")
SEPARATE_QUANTIZER = {"q": "qkv_in", "k": "k_in", "v": "v_in", "gate": "gate_up_in", "up": "up_in"}


def activation_sites(profile: NumericsProfile) -> tuple[str, ...]:
    """The activation quantizers of a layer under ``profile`` (what LAC trains and the artifact stores)."""
    return SEPARATE_SITES if profile.separate_input_quantizers else ACTIVATION_SITES


@dataclass
class ModelConfig:
    """Shape and numerics of a decoder-only model (family-independent)."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    attention_scaling: float = 1.0  # RoPE cos/sin multiplier (1 except for some scaled-RoPE variants)
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls(**data)


class ActQuantizer(nn.Module):
    """Dynamic per-token asymmetric activation quantizer (identity when bits >= 16 or disabled).

    ``clip`` multiplies the row maximum and ``clip_min`` (default: ``clip``) the row minimum. While ``lac_logits``
    (a [2] parameter: max, min) is set, the quantizer is in LAC training mode: clips are ``0.5 * (1 + sigmoid(c))``
    and rounding is straight-through. ``heads_fp16`` (infoquant-reference o_proj input): per ``group_size`` head,
    range not forced to include 0, float16 arithmetic, clips per head (float32 tensors [heads], logits [2, heads]).
    """

    def __init__(self, bits: int = 16, clip: float = 1.0, group_size: int | None = None) -> None:
        super().__init__()
        self.bits, self.clip, self.group_size, self.enabled = bits, clip, group_size, True
        self.clip_min: float | torch.Tensor | None = None
        self.lac_logits: nn.Parameter | None = None
        self.heads_fp16 = False
        self.groups = 1  # clip factors per quantizer (heads when heads_fp16)

    @property
    def active(self) -> bool:
        return self.enabled and self.bits < 16

    @property
    def learning(self) -> bool:
        return self.lac_logits is not None

    def clips(self) -> tuple[float, float]:
        return self.clip, self.clip if self.clip_min is None else self.clip_min

    def clip_tensor(self) -> torch.Tensor:
        """The clips as float32 [2] (max, min), or [2, groups] for per-head clips."""
        clip, clip_min = self.clips()
        if self.groups == 1:
            return torch.tensor([float(clip), float(clip_min)], dtype=torch.float32)
        return torch.stack([torch.as_tensor(c, dtype=torch.float32).expand(self.groups) for c in (clip, clip_min)])

    def set_clips(self, clips: torch.Tensor) -> None:
        """Inverse of :meth:`clip_tensor`."""
        if self.groups == 1:
            self.clip, self.clip_min = (float(c) for c in clips.reshape(2))
        else:
            self.clip, self.clip_min = (c.float().clone() for c in clips.reshape(2, self.groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        if self.lac_logits is not None:
            alpha = 0.5 * (1.0 + torch.sigmoid(self.lac_logits.float()))
            if self.heads_fp16:
                return fake_quantize_heads_ste(x, self.bits, alpha[0], alpha[1], self.group_size)
            return fake_quantize_activation_ste(x, self.bits, alpha[0], alpha[1], self.group_size)
        clip, clip_min = self.clips()
        if self.heads_fp16:
            if torch.is_grad_enabled() and x.requires_grad:
                return fake_quantize_heads_ste(x, self.bits, clip, clip_min, self.group_size)
            return fake_quantize_heads_fp16(x, self.bits, clip, clip_min, self.group_size)
        if torch.is_grad_enabled() and x.requires_grad:  # let gradients pass (LAC trains the layer around it)
            return fake_quantize_activation_ste(x, self.bits, clip, clip_min, self.group_size)
        return fake_quantize_activation(x, self.bits, self.clip, self.group_size, self.clip_min)

    @property
    def has_integer_form(self) -> bool:
        """Per-token codes with one scale per row (what the integer GEMM needs); not the per-head fp16 path."""
        return not self.heads_fp16

    def integer(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token ``(codes - zero point)`` as float32 and the scale (for the integer GEMM)."""
        return integer_activation(x, self.bits, self.clip, self.clip_min)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, clip={self.clips()}, group_size={self.group_size}"


class OnlineRotation(nn.Module):
    """An online rotation on the last dim: block Hadamard (Kronecker form) or a learned block-diagonal matrix."""

    def __init__(self, num_blocks: int = 1, matrix: torch.Tensor | None = None) -> None:
        super().__init__()
        self.num_blocks = num_blocks
        self.register_buffer("matrix", matrix, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.matrix is None:
            return apply_hadamard(x, self.num_blocks)
        blocks = x.reshape(*x.shape[:-1], self.num_blocks, -1).double()  # float64, rounded once (numerics.md 5)
        return torch.einsum("...bi,bij->...bj", blocks, self.matrix.double()).reshape(x.shape).to(x.dtype)

    def fp16(self, x: torch.Tensor) -> torch.Tensor:
        """The reference's float16 online Hadamard (numerics.md section 7.5); learned matrices are not supported."""
        if self.matrix is not None:
            raise NotImplementedError("float16 application of a learned online rotation")
        return apply_hadamard_fp16(x, self.num_blocks)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, fp16: bool = False) -> torch.Tensor:
    """``x * (1 / sqrt(mean(x^2) + eps)) * weight`` evaluated in float64, rounded once to x's dtype (``fp16``: rounded
    once to float16 instead, then returned in x's dtype: the reference's RMSNorm output)."""
    xd = x.double()
    out = xd * (1.0 / torch.sqrt((xd * xd).mean(-1, keepdim=True) + eps)) * weight.double()
    return out.to(torch.float16).to(x.dtype) if fp16 else out.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DecoderLayer(nn.Module):
    """One pre-norm attention + gated-MLP block with its quantizers and online ops."""

    def __init__(self, cfg: ModelConfig, qkv_bias: bool = False, o_bias: bool = False, mlp_bias: bool = False) -> None:
        super().__init__()
        h, kv, d, i = cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
        self.cfg = cfg
        self.input_norm = nn.Parameter(torch.ones(h), requires_grad=False)
        self.post_norm = nn.Parameter(torch.ones(h), requires_grad=False)
        self.q = nn.Linear(h, cfg.num_heads * d, bias=qkv_bias)
        self.k = nn.Linear(h, kv * d, bias=qkv_bias)
        self.v = nn.Linear(h, kv * d, bias=qkv_bias)
        self.o = nn.Linear(cfg.num_heads * d, h, bias=o_bias)
        self.gate = nn.Linear(h, i, bias=mlp_bias)
        self.up = nn.Linear(h, i, bias=mlp_bias)
        self.down = nn.Linear(i, h, bias=mlp_bias)
        self.qkv_in, self.o_in = ActQuantizer(), ActQuantizer()
        self.gate_up_in, self.down_in = ActQuantizer(), ActQuantizer()  # names listed in ACTIVATION_SITES
        self.k_cache, self.v_cache = ActQuantizer(group_size=d), ActQuantizer(group_size=d)
        self.k_in, self.v_in, self.up_in = ActQuantizer(), ActQuantizer(), ActQuantizer()  # SEPARATE_SITES only
        self.numerics: NumericsProfile = PROFILES[DEFAULT]
        self.qk_rotation: OnlineRotation | None = None
        self.down_rotation: OnlineRotation | None = None
        self.residual_attn_to_mlp: OnlineRotation | None = None
        self.residual_mlp_to_attn: OnlineRotation | None = None
        self.requires_grad_(False)

    def linear(self, role: str) -> nn.Linear:
        return getattr(self, role)

    def set_integer_weight(self, role: str, codes: torch.Tensor, scale: torch.Tensor) -> None:
        """Run ``role`` as an integer GEMM (codes and per-channel scales) whenever its input is quantized."""
        self.register_buffer(f"codes_{role}", codes.float(), persistent=False)
        self.register_buffer(f"wscale_{role}", scale.reshape(-1).float(), persistent=False)

    def project(self, x: torch.Tensor, quantizer: ActQuantizer, roles: tuple[str, ...]) -> list[torch.Tensor]:
        """Quantize ``x`` once and apply the linears of ``roles`` (integer-exact GEMM when weights are integer).
        With separate input quantizers (infoquant-reference) each role quantizes ``x`` with its own quantizer."""
        if len(roles) > 1 and self.numerics.separate_input_quantizers:
            return [self.project(x, getattr(self, SEPARATE_QUANTIZER[r]), (r,))[0] for r in roles]
        if (quantizer.active and quantizer.has_integer_form and not quantizer.learning
                and all(hasattr(self, f"codes_{r}") for r in roles)):
            a, scale = quantizer.integer(x)
            return [integer_linear(a, scale, getattr(self, f"codes_{r}"), getattr(self, f"wscale_{r}"),
                                   self.linear(r).bias) for r in roles]
        a = quantizer(x)
        return [self.linear(r)(a) for r in roles]

    def attention_core(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Normed input -> attention output before o_proj [B, S, heads * head_dim], and the present K/V."""
        cfg = self.cfg
        b, s, _ = h.shape
        q, k, v = self.project(h, self.qkv_in, ("q", "k", "v"))
        q = q.view(b, s, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        k = k.view(b, s, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        v = v.view(b, s, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.qk_rotation is not None:
            q, k = self.qk_rotation(q), self.qk_rotation(k)
        k, v = self.k_cache(k), self.v_cache(v)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        groups = cfg.num_heads // cfg.num_kv_heads
        kr, vr = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = (q.double() @ kr.double().transpose(-1, -2)) * (cfg.head_dim ** -0.5) + mask
        out = (softmax64(scores) @ vr.double()).to(q.dtype)  # float64 attention, rounded once
        return out.transpose(1, 2).reshape(b, s, cfg.num_heads * cfg.head_dim), (k, v)

    def attention_out(self, pre_o: torch.Tensor) -> torch.Tensor:
        return self.project(pre_o, self.o_in, ("o",))[0]

    def mid_residual(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual after attention (with the online basis change into the MLP basis, when present)."""
        if self.residual_attn_to_mlp is not None:
            x = self.residual_attn_to_mlp(x)
        return x + attn

    def mlp_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """Normed input -> the down_proj input (after the online rotation, before quantization)."""
        gate, up = self.project(h, self.gate_up_in, ("gate", "up"))
        m = gate * sigmoid64(gate) * up
        if self.down_rotation is None:
            return m
        return self.down_rotation.fp16(m) if self.numerics.fp16_rounding else self.down_rotation(m)

    def mlp_out(self, m: torch.Tensor) -> torch.Tensor:
        return self.project(m, self.down_in, ("down",))[0]

    def out_residual(self, x: torch.Tensor, mlp: torch.Tensor) -> torch.Tensor:
        if self.residual_mlp_to_attn is not None:
            x = self.residual_mlp_to_attn(x)
        return x + mlp

    def norm_attn(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.input_norm, self.cfg.rms_norm_eps, self.numerics.fp16_rounding)

    def norm_mlp(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.post_norm, self.cfg.rms_norm_eps, self.numerics.fp16_rounding)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        pre_o, present = self.attention_core(self.norm_attn(x), cos, sin, mask, past)
        x = self.mid_residual(x, self.attention_out(pre_o))
        return self.out_residual(x, self.mlp_out(self.mlp_hidden(self.norm_mlp(x)))), present


KVCache = list[tuple[torch.Tensor, torch.Tensor]]


class CausalLM(nn.Module):
    """Embedding, decoder layers, final norm and LM head, with RoPE tables from the source model's inv_freq."""

    def __init__(self, cfg: ModelConfig, inv_freq: torch.Tensor, qkv_bias: bool = False, o_bias: bool = False,
                 mlp_bias: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, qkv_bias, o_bias, mlp_bias) for _ in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size), requires_grad=False)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", inv_freq.float().clone())
        self.numerics: NumericsProfile = PROFILES[DEFAULT]
        self.requires_grad_(False)

    def set_numerics(self, profile: NumericsProfile) -> None:
        """Run every layer (and the final norm) under ``profile``."""
        self.numerics = profile
        for layer in self.layers:
            layer.numerics = profile

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables [S, head_dim] computed in float32 (HF convention: concatenated halves)."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = self.cfg.attention_scaling
        emb = emb.double()  # float64 transcendentals, rounded once (numerics.md section 5)
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)

    def causal_mask(self, s: int, past_len: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask [S, past+S]: query i (absolute past+i) sees keys j <= past+i (within the sliding window)."""
        q_pos = torch.arange(past_len, past_len + s, device=self.device)[:, None]
        k_pos = torch.arange(past_len + s, device=self.device)[None, :]
        allowed = k_pos <= q_pos
        if self.cfg.sliding_window:
            allowed &= k_pos > q_pos - self.cfg.sliding_window
        return torch.zeros(allowed.shape, dtype=dtype, device=self.device).masked_fill(~allowed, float("-inf"))

    def layer_inputs(self, input_ids: torch.Tensor, past_len: int = 0) -> tuple[torch.Tensor, ...]:
        """(hidden, cos, sin, mask) for the first layer: what calibration feeds layer by layer."""
        x = self.embed(input_ids)
        s = input_ids.shape[1]
        cos, sin = self.rope(torch.arange(past_len, past_len + s, device=self.device), x.dtype)
        return x, cos, sin, self.causal_mask(s, past_len, x.dtype)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(rms_norm(x, self.norm, self.cfg.rms_norm_eps, self.numerics.fp16_rounding)).float()

    def forward(self, input_ids: torch.Tensor, past: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        """Logits [B, S, V] (float32) and the present KV cache."""
        past_len = past[0][0].shape[2] if past else 0
        x, cos, sin, mask = self.layer_inputs(input_ids, past_len)
        present: KVCache = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, cos, sin, mask, past[i] if past else None)
            present.append(kv)
        return self.head(x), present

    def quantizers(self) -> Iterator[ActQuantizer]:
        return (m for m in self.modules() if isinstance(m, ActQuantizer))


@contextlib.contextmanager
def activation_quant_disabled(model: nn.Module) -> Iterator[None]:
    """Run with every activation/KV quantizer as identity (weights stay as they are)."""
    quantizers = [m for m in model.modules() if isinstance(m, ActQuantizer)]
    states = [q.enabled for q in quantizers]
    for q in quantizers:
        q.enabled = False
    try:
        yield
    finally:
        for q, state in zip(quantizers, states, strict=True):
            q.enabled = state
