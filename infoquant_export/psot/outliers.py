"""Adaptive outlier-token selection (reference ``calibration/outlier_masks.py``, ``_compute_aug_weights``).

For a threshold multiplier k, a token of a sample is an outlier when any of its channels lies outside
``mean +- k * std`` of the whole sample tensor. Over the first ``eta_m`` samples, ``per_sample[k]`` is the mean
number of outlier tokens per sample and ``union[k]`` the number of token positions that are outliers in any sample.
``instability[k] = (union - per_sample) / union`` measures how much the outlier set changes from sample to sample.
The chosen k is the first ``k >= 1`` where the instability has settled (``|instability[k] - instability[k-1]| <
tol``) and the union is below ``max_fraction`` of the sequence; outlier tokens of every sample at that k then get
the weight ``aug_weight`` in the PSOT cost, the others 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class OutlierSelection:
    k: int
    per_sample: list[float]
    union: list[int]

    def to_dict(self) -> dict[str, object]:
        return {"k": self.k, "per_sample": self.per_sample, "union": self.union}


def outlier_mask(sample: torch.Tensor, k: float) -> torch.Tensor:
    """Tokens [S] of ``sample`` [S, n] with any channel outside mean +- k * std (scalar over the sample)."""
    s = sample.float()
    mean, std = s.mean(), s.std()
    return ((s - mean).abs() > k * std).any(dim=-1)


def select_k(samples: list[torch.Tensor], k_max: int = 50, tol: float = 0.02,
             max_fraction: float = 0.4) -> OutlierSelection:
    """Sweep k = 0 .. k_max - 1 over ``samples`` (each [S, n]) and pick the stable threshold."""
    seq = samples[0].shape[0]
    per_sample: list[float] = []
    union: list[int] = []
    for k in range(k_max):
        masks = torch.stack([outlier_mask(s, k) for s in samples])
        per_sample.append(float(masks.sum(dim=1).float().mean()))
        union.append(int(masks.any(dim=0).sum()))
    instability = [(u - p) / u if u else 0.0 for u, p in zip(union, per_sample, strict=True)]
    chosen = k_max
    for k in range(1, k_max):
        if abs(instability[k] - instability[k - 1]) < tol and union[k] < max_fraction * seq:
            chosen = k
            break
    return OutlierSelection(chosen, per_sample, union)


def token_weights(sample: torch.Tensor, k: int, aug_weight: float, all_outliers: bool = False) -> torch.Tensor:
    """Per-token weights [S]: ``aug_weight`` for outlier tokens at threshold k (every token when ``all_outliers``)."""
    if all_outliers:
        return torch.full((sample.shape[0],), float(aug_weight))
    mask = outlier_mask(sample, k)
    return torch.where(mask, float(aug_weight), 1.0)
