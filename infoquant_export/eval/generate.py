"""Greedy generation with the chat template and the model's (quantized) KV cache."""

from __future__ import annotations

import statistics
import time
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
        if token in stop or len(new) == max_new_tokens:  # no decode step whose logits nobody reads
            break
        logits, cache = decode(token, cache)
    return new


def _synced_ms(device: torch.device, start: float) -> float:
    """Milliseconds since ``start`` (``time.perf_counter``) once the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


@torch.no_grad()
def greedy_generate(model: CausalLM, input_ids: torch.Tensor, max_new_tokens: int, stop: set[int],
                    timing: dict[str, Any] | None = None) -> list[int]:
    """Prefill once, then decode one token at a time from the KV cache; returns the new token ids. ``timing``
    (a dict) receives the prefill time and each decode step's time, synchronized with the device."""
    device = model.device
    start = time.perf_counter()
    logits, cache = model(input_ids.to(device))
    steps: list[float] = []
    if timing is not None:
        timing.update(prefill_tokens=int(input_ids.shape[1]), prefill_ms=_synced_ms(device, start), step_ms=steps)

    def decode(token: int, past: Any) -> tuple[Any, Any]:
        t0 = time.perf_counter()
        out = model(torch.tensor([[token]], device=device), past)
        if timing is not None:
            steps.append(_synced_ms(device, t0))
        return out

    return greedy_loop(logits, cache, decode, max_new_tokens, stop)


def timing_summary(timing: dict[str, Any]) -> dict[str, Any]:
    """Prefill ms and tokens/s; decode: the first step (on the kernel model's GPU path it captures the CUDA graph)
    and the median of the others, with tokens/s."""
    steps = timing["step_ms"]
    out = {"prefill_tokens": timing["prefill_tokens"], "prefill_ms": round(timing["prefill_ms"], 3),
           "prefill_tokens_per_s": round(timing["prefill_tokens"] / timing["prefill_ms"] * 1e3, 1),
           "decode_steps": len(steps)}
    if steps:
        out["first_decode_step_ms"] = round(steps[0], 3)
    if len(steps) > 1:
        median = statistics.median(steps[1:])
        out.update(decode_step_ms=round(median, 3), decode_tokens_per_s=round(1e3 / median, 1))
    return out


def chat(model: CausalLM, tokenizer: Any, prompt: str, max_new_tokens: int = 64) -> dict[str, Any]:
    """Greedy reply to ``prompt``: text, token ids and timings (``timing_summary``)."""
    ids = chat_prompt_ids(tokenizer, prompt)
    timing: dict[str, Any] = {}
    tokens = greedy_generate(model, ids, max_new_tokens, stop_ids(model.cfg.eos_token_id, tokenizer), timing)
    return {"prompt": prompt, "text": tokenizer.decode(tokens, skip_special_tokens=True), "tokens": tokens,
            "timing": timing_summary(timing)}
