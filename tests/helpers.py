"""Test helpers: tiny HF models of each supported family, SQNR."""

from __future__ import annotations

import torch


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """10 log10(|ref|^2 / |ref - test|^2) in dB (inf when identical)."""
    ref, err = reference.double(), (reference.double() - test.double())
    noise = float(err.pow(2).sum())
    return float("inf") if noise == 0 else 10.0 * torch.log10(ref.pow(2).sum() / noise).item()


def tiny_hf_model(family: str, *, hidden: int = 64, heads: int = 4, kv_heads: int = 2, layers: int = 2,
                  intermediate: int = 192, vocab: int = 128, tie: bool = False, outliers: bool = True):
    """A random HF causal LM of ``family`` (llama | qwen2 | mistral) small enough for unit tests.

    intermediate 192 = 12 * 16 exercises a Paley Hadamard block; ``outliers`` scales a few residual channels
    (as trained LLMs have) so that rotations matter for quantization.
    """
    import transformers

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                  tie_word_embeddings=tie, rms_norm_eps=1e-5)
    if family == "llama":
        cfg = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    elif family == "mistral":
        cfg = transformers.MistralConfig(**common, sliding_window=16)
        cls = transformers.MistralForCausalLM
    else:
        raise ValueError(family)
    cfg._attn_implementation = "eager"
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
        if outliers:
            model.model.embed_tokens.weight[:, :3] *= 12.0
    return model
