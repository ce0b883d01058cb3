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


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer(vocab: int = 512):
    """A byte-level BPE tokenizer trained in code on the shipped calibration text, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from infoquant_export.data.corpus import load_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([load_text("default", "calibration")[:100_000]], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_model_dir(path, family: str = "llama", **kwargs):
    """Write a tiny HF model directory (safetensors + tokenizer) that the CLI can load like a real one."""
    model = tiny_hf_model(family, vocab=512, **kwargs)
    model.config.eos_token_id = 2
    model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer().save_pretrained(path)
    return path
