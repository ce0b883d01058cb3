"""PSOT per layer: three block-orthogonal matrices trained by Cayley SGD on the peak-suppression cost.

Stage 1 trains ``Q1`` (``num_blocks`` blocks) on the attention input, stage 2 one ``Q2`` per KV head on V and the
o_proj input (``cost(M Q2) + cost(V Q2) * cost(M)/cost(V)`` with the ratio detached; every query head of a GQA
group shares its KV head's matrix), stage 3 ``Q4`` on the MLP input. Every matrix starts from the same randomized
Hadamard block; each stage has its own step size decaying linearly over the epochs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from infoquant_export.config import PsotConfig
from infoquant_export.errors import UserError
from infoquant_export.psot.capture import ActivationStore
from infoquant_export.psot.cost import peak_cost
from infoquant_export.psot.outliers import OutlierSelection, select_k, token_weights
from infoquant_export.psot.stiefel import cayley_step
from infoquant_export.transforms.hadamard import randomized_hadamard_matrix

STAGES = ("Q1", "Q2", "Q4")


@dataclass
class LayerRotations:
    """The learned matrices of one layer and how they were found."""

    q1: torch.Tensor  # [num_blocks, d, d]
    q2: torch.Tensor  # [kv_heads, head_dim, head_dim]
    q4: torch.Tensor  # [num_blocks, d, d]
    curves: dict[str, list[float]] = field(default_factory=dict)
    outliers: dict[str, OutlierSelection] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def initial_blocks(count: int, size: int, seed: int) -> torch.Tensor:
    """``count`` copies of the randomized Hadamard block of ``size`` (the reference's initialisation)."""
    return randomized_hadamard_matrix(size, seed).float().expand(count, size, size).clone()


def rotate_blocks(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x`` [T, nb * d] times blockdiag(blocks) (row vectors)."""
    t = x.shape[0]
    nb, d, _ = blocks.shape
    return torch.einsum("tbi,bij->tbj", x.reshape(t, nb, d), blocks).reshape(t, nb * d)


def rotate_heads(x: torch.Tensor, per_kv: torch.Tensor, heads: int) -> torch.Tensor:
    """``x`` [T, heads * d]: head j times ``per_kv[j // (heads / kv)]`` (GQA groups share a matrix)."""
    t = x.shape[0]
    kv, d, _ = per_kv.shape
    y = torch.einsum("tkgi,kij->tkgj", x.reshape(t, kv, heads // kv, d), per_kv)
    return y.reshape(t, heads * d)


def _lr(cfg: PsotConfig, epoch: int) -> float:
    """LinearLR(start 1, end ``lr_end_factor``, total_iters=epochs), stepped per epoch."""
    return cfg.lr * (1.0 + (cfg.lr_end_factor - 1.0) * min(epoch, cfg.epochs) / cfg.epochs)


def optimize(init: torch.Tensor, num_samples: int, loss: Callable[[torch.Tensor, list[int]], torch.Tensor],
             cfg: PsotConfig, generator: torch.Generator, where: str) -> tuple[torch.Tensor, list[float]]:
    """Cayley SGD over shuffled batches of samples.

    Returns the matrices with the lowest cost over all samples among the initial ones and those after each epoch
    (the reference's steps are normalised to ``alpha * ||W||_1 <= 1``, so an epoch can overshoot; keeping the best
    iterate means PSOT never ends above its Hadamard initialisation), and the cost curve [initial, each epoch]."""

    def full_cost(blocks: torch.Tensor) -> float:
        with torch.no_grad():
            return float(sum(loss(blocks, list(range(b, min(b + cfg.batch_size, num_samples))))
                             for b in range(0, num_samples, cfg.batch_size))) / num_samples

    blocks = init.clone()
    best, curve = blocks, [full_cost(blocks)]
    for epoch in range(cfg.epochs):
        lr = _lr(cfg, epoch)
        order = torch.randperm(num_samples, generator=generator).tolist()
        for b in range(0, num_samples, cfg.batch_size):
            param = blocks.detach().requires_grad_(True)
            value = loss(param, order[b:b + cfg.batch_size])
            value.backward()
            if not torch.isfinite(value) or not torch.isfinite(param.grad).all():
                raise UserError(f"PSOT {where}: the cost or its gradient became NaN/Inf at epoch {epoch}",
                                "check the calibration activations, or lower --psot-lr")
            blocks = cayley_step(param.detach(), param.grad, lr, cfg.cayley)
        curve.append(full_cost(blocks))
        if curve[-1] < min(curve[:-1]):
            best = blocks
    return best, curve


def _weights(samples: list[torch.Tensor], cfg: PsotConfig, all_outliers: bool) -> tuple[list[torch.Tensor],
                                                                                           OutlierSelection]:
    selection = select_k(samples[:cfg.eta_m], cfg.k_max, cfg.k_tol, cfg.max_outlier_fraction)
    return [token_weights(s, selection.k, cfg.aug_weight, all_outliers) for s in samples], selection


def train_layer(store: ActivationStore, layer: int, num_blocks: int, num_heads: int, num_kv_heads: int,
                cfg: PsotConfig, seed: int = 0, on_stage: Callable[[str], None] | None = None) -> LayerRotations:
    """Run the three PSOT stages on one layer's captured activations (``on_stage(name)`` before each)."""
    notify = on_stage or (lambda name: None)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    all_outliers = layer < cfg.aug_start
    out = LayerRotations(torch.empty(0), torch.empty(0), torch.empty(0))
    t_opt = cfg.temperature

    def residual_stage(name: str, key: str) -> torch.Tensor:
        notify(name)
        xs = store.get(key)
        start = time.perf_counter()
        ws, out.outliers[key] = _weights(xs, cfg, all_outliers)
        d = xs[0].shape[-1] // num_blocks
        center = d if cfg.rotation_mean else None

        def loss(blocks: torch.Tensor, idx: list[int]) -> torch.Tensor:
            x = torch.cat([xs[i] for i in idx])
            return peak_cost(rotate_blocks(x, blocks), torch.cat([ws[i] for i in idx]), center, t_opt)

        blocks, out.curves[name] = optimize(initial_blocks(num_blocks, d, seed), len(xs), loss, cfg, generator,
                                            f"layer {layer} {name}")
        out.seconds[name] = time.perf_counter() - start
        return blocks

    out.q1 = residual_stage("Q1", "attn_input")
    notify("Q2")
    start = time.perf_counter()
    vs, ms = store.get("v"), store.get("o_input")
    wv, out.outliers["v"] = _weights(vs, cfg, all_outliers)
    wm, out.outliers["o_input"] = _weights(ms, cfg, all_outliers)
    head_dim = vs[0].shape[-1] // num_kv_heads
    center = head_dim if cfg.rotation_mean else None

    def head_loss(blocks: torch.Tensor, idx: list[int]) -> torch.Tensor:
        v = rotate_heads(torch.cat([vs[i] for i in idx]), blocks, num_kv_heads)
        m = rotate_heads(torch.cat([ms[i] for i in idx]), blocks, num_heads)
        cost_v = peak_cost(v, torch.cat([wv[i] for i in idx]), center, t_opt, head_dim)
        cost_m = peak_cost(m, torch.cat([wm[i] for i in idx]), center, t_opt, head_dim)
        return cost_m + cost_v * (cost_m / cost_v).detach()

    out.q2, out.curves["Q2"] = optimize(initial_blocks(num_kv_heads, head_dim, seed), len(vs), head_loss, cfg,
                                        generator, f"layer {layer} Q2")
    out.seconds["Q2"] = time.perf_counter() - start
    out.q4 = residual_stage("Q4", "mlp_input")
    return out
