"""PSOT's peak-suppression cost (reference ``rotation/optimizer.py:Cost``).

For rotated activations ``Y`` [tokens, ..., n]: ``u = Y - mean(Y)`` per token and per centring group (a rotation
block for the residual-stream inputs, a head for V and the o_proj input), ``a = |u|`` and
``cost = || softmax(a / T) * a * w ||_F`` with the softmax over the last axis (the whole hidden size for the
residual-stream inputs, head_dim for V/o) and ``w`` a per-token weight (large for outlier tokens). The softmax
concentrates the cost on the largest magnitudes of each row, so minimising it flattens peaks: the quantization range
shrinks while the values spread over the grid.
"""

from __future__ import annotations

import torch


def peak_cost(y: torch.Tensor, token_weight: torch.Tensor, center_group: int | None, temperature: float = 2.0,
              softmax_group: int | None = None) -> torch.Tensor:
    """Cost of ``y`` [tokens, n] with weights [tokens]; groups split the last axis (None = the whole row)."""
    t, n = y.shape
    if center_group:
        blocks = y.reshape(t, n // center_group, center_group)
        y = (blocks - blocks.mean(dim=-1, keepdim=True)).reshape(t, n)
    a = y.abs()
    if softmax_group:
        a = a.reshape(t, n // softmax_group, softmax_group)
    weighted = torch.softmax(a / temperature, dim=-1) * a
    return torch.linalg.vector_norm(weighted.reshape(t, -1) * token_weight[:, None])
