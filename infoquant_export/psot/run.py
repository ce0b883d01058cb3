"""The PSOT stage: capture layer by layer, train Q1/Q2/Q4 per layer, return the schema's matrices and a report."""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm.auto import tqdm

from infoquant_export.config import QuantConfig
from infoquant_export.models.model import CausalLM
from infoquant_export.psot.capture import capture_layers
from infoquant_export.psot.report import build_layer_entry
from infoquant_export.psot.train import STAGES, LayerRotations, initial_blocks, rotate_blocks, rotate_heads, train_layer
from infoquant_export.transforms.rotate import psot_matrices

REPORT_WINDOWS = 4  # windows whose activations the report measures


def _report_entry(i: int, store: Any, rot: LayerRotations, model: CausalLM, cfg: QuantConfig) -> dict[str, Any]:
    c, nb, seed = model.cfg, cfg.rotation_blocks, cfg.rotation_seed
    take = {name: torch.cat(store.get(name)[:REPORT_WINDOWS]) for name in ("attn_input", "mlp_input", "v", "o_input")}
    d = c.hidden_size // nb
    h_res, h_head = initial_blocks(nb, d, seed), initial_blocks(c.num_kv_heads, c.head_dim, seed)

    def rotated(q_attn: torch.Tensor, q_mlp: torch.Tensor, q_head: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"attn_input": rotate_blocks(take["attn_input"], q_attn),
                "mlp_input": rotate_blocks(take["mlp_input"], q_mlp),
                "v": rotate_heads(take["v"], q_head, c.num_kv_heads),
                "o_input": rotate_heads(take["o_input"], q_head, c.num_heads)}

    extras = {"outliers": {k: v.to_dict() for k, v in rot.outliers.items()},
              "seconds": {k: round(v, 2) for k, v in rot.seconds.items()}}
    return build_layer_entry(i, rotated(h_res, h_res, h_head), rotated(rot.q1, rot.q4, rot.q2), rot.curves, extras,
                             bits=min(cfg.a_bits, 8), group_sizes={"v": c.head_dim})


@torch.no_grad()
def run_psot(model: CausalLM, windows: torch.Tensor, cfg: QuantConfig,
             progress: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """PSOT on a norm-fused, unrotated full-precision ``model`` over calibration ``windows`` [N, S].

    Returns the learned tensors of ``psot_schema`` (``psot_matrices``) and the per-layer report."""
    c, p = model.cfg, cfg.psot
    start = time.perf_counter()
    q1s, q2s, q4s, entries = [], [], [], []
    bar = tqdm(total=c.num_layers * len(STAGES), desc="PSOT", disable=not progress)
    for i, store in capture_layers(model, windows, memory_budget_mb=p.memory_budget_mb):
        def stage(name: str, layer: int = i) -> None:
            bar.set_description(f"PSOT layer {layer} {name}")
            if name != STAGES[0]:
                bar.update(1)

        with torch.enable_grad():
            rot = train_layer(store, i, cfg.rotation_blocks, c.num_heads, c.num_kv_heads, p, cfg.rotation_seed,
                              on_stage=stage)
        bar.update(1)
        q1s.append(rot.q1)
        q2s.append(rot.q2)
        q4s.append(rot.q4)
        entries.append(_report_entry(i, store, rot, model, cfg))
    bar.close()
    report = {"model": c.family, "bits": cfg.a_bits, "num_blocks": cfg.rotation_blocks,
              "basis_before": "randomized Hadamard (PSOT's initialisation; what --rotation hadamard uses)",
              "windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
              "seconds": round(time.perf_counter() - start, 1), "layers": entries}
    return psot_matrices(q1s, q2s, q4s), report
