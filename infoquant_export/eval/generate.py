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


def timed_greedy(prefill: Callable[[], tuple[Any, Any]], decode: Callable[[int, Any], tuple[Any, Any]],
                 prompt_tokens: int, max_new_tokens: int, stop: set[int], timing: dict[str, Any] | None = None,
                 sync: Callable[[], None] | None = None) -> list[int]:
    """``prefill()``, then ``greedy_loop`` with ``decode``. ``timing`` (a dict) receives the prefill's and each
    decode step's milliseconds, measured after ``sync()`` (the device finishing its queued work) when given."""
    steps: list[float] = []

    def clocked(fn: Callable[..., tuple[Any, Any]], *args: Any) -> tuple[tuple[Any, Any], float]:
        start = time.perf_counter()
        out = fn(*args)
        if sync is not None:
            sync()
        return out, (time.perf_counter() - start) * 1e3

    def timed_decode(token: int, past: Any) -> tuple[Any, Any]:
        out, ms = clocked(decode, token, past)
        steps.append(ms)
        return out

    if timing is None:
        logits, cache = prefill()
        return greedy_loop(logits, cache, decode, max_new_tokens, stop)
    (logits, cache), prefill_ms = clocked(prefill)
    timing.update(prefill_tokens=prompt_tokens, prefill_ms=prefill_ms, step_ms=steps)
    return greedy_loop(logits, cache, timed_decode, max_new_tokens, stop)


@torch.no_grad()
def greedy_generate(model: CausalLM, input_ids: torch.Tensor, max_new_tokens: int, stop: set[int],
                    timing: dict[str, Any] | None = None) -> list[int]:
    """Prefill once, then decode one token at a time from the KV cache; returns the new token ids. ``timing``: see
    ``timed_greedy`` (synchronized with a CUDA device)."""
    device = model.device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    return timed_greedy(lambda: model(input_ids.to(device)),
                        lambda t, c: model(torch.tensor([[t]], device=device), c),
                        int(input_ids.shape[1]), max_new_tokens, stop, timing, sync)


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
