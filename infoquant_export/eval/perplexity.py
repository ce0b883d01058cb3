"""Perplexity over non-overlapping token windows (QuaRot/GPTQ convention: tail dropped, shifted next-token NLL)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from infoquant_export.models.model import CausalLM


@torch.no_grad()
def perplexity(model: CausalLM, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> dict[str, Any]:
    """exp(total NLL / predicted tokens) over windows [N, S]; each window predicts its S - 1 next tokens."""
    total_nll, total_tokens = 0.0, 0
    device = model.device
    batches = range(0, len(windows), batch_size)
    for start in tqdm(batches, desc="eval", disable=not progress):
        ids = windows[start:start + batch_size].to(device)
        logits, _ = model(ids)
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                              reduction="sum")
        total_nll += float(nll)
        total_tokens += ids[:, 1:].numel()
    return {"ppl": math.exp(total_nll / total_tokens), "nll": total_nll / total_tokens, "tokens": total_tokens,
            "windows": int(len(windows)), "seq_len": int(windows.shape[1])}
