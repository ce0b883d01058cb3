"""Layer-by-layer capture of the activations PSOT rotates, with memory bounded to one layer.

From the norm-fused, unrotated full-precision model: the attention input after its norm (``attn_input``), the MLP
input after its norm (``mlp_input``), the v_proj output (``v``) and the o_proj input (``o_input``). Only the
residual stream of the calibration windows and one layer's four activations are alive at a time; above
``memory_budget_mb`` the activations are written to ``.npy`` files in a temporary directory and memory-mapped.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from infoquant_export.errors import UserError
from infoquant_export.models.model import CausalLM, activation_quant_disabled

ACTIVATIONS = ("attn_input", "mlp_input", "v", "o_input")


class ActivationStore:
    """Per-window activations [S, n] of one layer, in memory or spilled to memory-mapped files."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.used = 0
        self.data: dict[str, list[torch.Tensor]] = {name: [] for name in ACTIVATIONS}
        self._dir: Path | None = None
        self._count = 0

    @property
    def spilled(self) -> bool:
        return self._dir is not None

    def put(self, name: str, x: torch.Tensor) -> None:
        x = x.detach().float().cpu().contiguous()
        self.used += x.numel() * 4
        if self.used > self.budget:
            if self._dir is None:
                self._dir = Path(tempfile.mkdtemp(prefix="infoquant-psot-"))
            path = self._dir / f"{self._count}.npy"
            self._count += 1
            np.save(path, x.numpy())
            x = torch.from_numpy(np.load(path, mmap_mode="c"))
        self.data[name].append(x)

    def get(self, name: str) -> list[torch.Tensor]:
        return self.data[name]

    def close(self) -> None:
        self.data = {}
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


def _check_finite(x: torch.Tensor, layer: int, name: str) -> None:
    if not torch.isfinite(x).all():
        raise UserError(f"layer {layer}: the {name} activation has NaN/Inf values on the calibration windows",
                        "check the model weights (a float16 overflow?) or the calibration text")


@torch.no_grad()
def capture_layers(model: CausalLM, windows: torch.Tensor, batch_size: int = 4,
                   memory_budget_mb: float = 4096) -> Iterator[tuple[int, ActivationStore]]:
    """Yield ``(layer index, store)`` for every layer; the store is released when the next layer starts."""
    device = model.device
    budget = int(memory_budget_mb * 2**20)
    with activation_quant_disabled(model):
        _, cos, sin, mask = model.layer_inputs(windows[:1].to(device))
        xs = [model.embed(windows[b:b + batch_size].to(device)) for b in range(0, len(windows), batch_size)]
        for i, layer in enumerate(model.layers):
            store = ActivationStore(budget)
            try:
                nxt = []
                for x in xs:
                    h = layer.norm_attn(x)
                    v = layer.v(h)
                    pre_o, _ = layer.attention_core(h, cos, sin, mask, None)
                    mid = layer.mid_residual(x, layer.attention_out(pre_o))
                    p = layer.norm_mlp(mid)
                    for name, t in (("attn_input", h), ("mlp_input", p), ("v", v), ("o_input", pre_o)):
                        _check_finite(t, i, name)
                        for row in t:
                            store.put(name, row)
                    nxt.append(layer.out_residual(mid, layer.mlp_out(layer.mlp_hidden(p))))
                xs = nxt
                yield i, store
            finally:
                store.close()
