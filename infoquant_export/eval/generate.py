"""Greedy generation with the chat template and the model's (quantized) KV cache."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from infoquant_export.models.model import CausalLM


def chat_prompt_ids(tokenizer: Any, prompt: str, system: str | None = None) -> torch.Tensor:
    """Token ids [1, S] of a single-turn chat (the tokenizer's template), ready for the assistant's reply."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    return torch.tensor([ids], dtype=torch.long)


def stop_ids(eos: int | list[int] | None, tokenizer: Any) -> set[int]:
    """The model config's EOS id(s) and the tokenizer's EOS id."""
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def greedy_loop(logits: Any, cache: Any, decode: Callable[[int, Any], tuple[Any, Any]], max_new_tokens: int,
                stop: set[int]) -> list[int]:
    """Greedy decoding after a prefill (``logits`` [1, S, V], ``cache``): ``decode(token, cache)`` runs one step.

    Backend-neutral: ``logits`` may be a torch tensor or a numpy array.
    """
    new: list[int] = []
    for _ in range(max_new_tokens):
        token = int(logits[0, -1].argmax())
        new.append(token)
        if token in stop:
            break
        logits, cache = decode(token, cache)
    return new


@torch.no_grad()
def greedy_generate(model: CausalLM, input_ids: torch.Tensor, max_new_tokens: int, stop: set[int]) -> list[int]:
    """Prefill once, then decode one token at a time from the KV cache; returns the new token ids."""
    logits, cache = model(input_ids.to(model.device))
    return greedy_loop(logits, cache, lambda t, c: model(torch.tensor([[t]], device=model.device), c),
                       max_new_tokens, stop)


def chat(model: CausalLM, tokenizer: Any, prompt: str, max_new_tokens: int = 64) -> dict[str, Any]:
    """Greedy reply to ``prompt``: text and token ids."""
    ids = chat_prompt_ids(tokenizer, prompt)
    tokens = greedy_generate(model, ids, max_new_tokens, stop_ids(model.cfg.eos_token_id, tokenizer))
    return {"prompt": prompt, "text": tokenizer.decode(tokens, skip_special_tokens=True), "tokens": tokens}
