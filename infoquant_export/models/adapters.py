"""Architecture adapters: where each supported family keeps its norms, projections, attention and RoPE.

This is the only module that knows Hugging Face module paths. It converts a HF model into the canonical
:class:`~infoquant_export.models.model.CausalLM`; every transform and quantizer works on that.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from infoquant_export.errors import UserError
from infoquant_export.models.model import CausalLM, ModelConfig


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Module paths of one model family, relative to the HF ``*ForCausalLM`` (or to a decoder layer)."""

    family: str
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    rotary: str = "model.rotary_emb"
    input_norm: str = "input_layernorm"
    post_attention_norm: str = "post_attention_layernorm"
    projections: dict[str, str] = field(default_factory=lambda: {
        "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
    })
    activation: str = "silu"

    def config(self, hf_config) -> ModelConfig:
        """Family-independent config from a HF config."""
        text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        act = getattr(text, "hidden_act", "silu")
        if act != self.activation:
            raise UserError(f"unsupported activation {act!r} in a {self.family} model",
                            "only SiLU-gated MLPs are supported")
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        window = getattr(text, "sliding_window", None) if getattr(text, "use_sliding_window", True) else None
        return ModelConfig(
            family=self.family, vocab_size=text.vocab_size, hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size, num_layers=text.num_hidden_layers, num_heads=heads,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or heads, head_dim=head_dim,
            rms_norm_eps=float(text.rms_norm_eps), sliding_window=window,
            tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
            bos_token_id=getattr(text, "bos_token_id", None), eos_token_id=getattr(text, "eos_token_id", None),
        )

    def to_canonical(self, hf_model: nn.Module) -> CausalLM:
        """Copy the HF model's weights (as float32) into a canonical :class:`CausalLM`."""
        cfg = self.config(hf_model.config)
        rotary = hf_model.get_submodule(self.rotary)
        cfg.attention_scaling = float(getattr(rotary, "attention_scaling", 1.0))
        layers = hf_model.get_submodule(self.layers)
        first = layers[0]
        biases = {role: first.get_submodule(path).bias is not None for role, path in self.projections.items()}
        qkv_bias = biases["q"] or biases["k"] or biases["v"]
        mlp_bias = biases["gate"] or biases["up"] or biases["down"]
        model = CausalLM(cfg, rotary.inv_freq.detach(), qkv_bias=qkv_bias, o_bias=biases["o"], mlp_bias=mlp_bias)
        with torch.no_grad():
            model.embed.weight.copy_(hf_model.get_submodule(self.embed).weight.float())
            model.lm_head.weight.copy_(hf_model.get_submodule(self.lm_head).weight.float())
            model.norm.copy_(hf_model.get_submodule(self.final_norm).weight.float())
            for src, dst in zip(layers, model.layers, strict=True):
                dst.input_norm.copy_(src.get_submodule(self.input_norm).weight.float())
                dst.post_norm.copy_(src.get_submodule(self.post_attention_norm).weight.float())
                for role, path in self.projections.items():
                    lin = src.get_submodule(path)
                    dst.linear(role).weight.copy_(lin.weight.float())
                    if dst.linear(role).bias is not None:
                        bias = lin.bias.float() if lin.bias is not None else 0.0
                        dst.linear(role).bias.copy_(torch.as_tensor(bias).expand_as(dst.linear(role).bias))
        return model


ADAPTERS: dict[str, ArchitectureAdapter] = {
    "llama": ArchitectureAdapter(family="llama"),
    "mistral": ArchitectureAdapter(family="mistral"),
    "qwen2": ArchitectureAdapter(family="qwen2"),
}


def adapter_for(hf_config) -> ArchitectureAdapter:
    """The adapter for a HF config's ``model_type``; a clear error for unsupported families."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UserError(f"unsupported architecture {model_type!r}",
                        f"supported model types are {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[model_type]


def to_canonical(hf_model: nn.Module) -> CausalLM:
    """Convert a supported HF causal LM into the canonical model."""
    return adapter_for(hf_model.config).to_canonical(hf_model)
