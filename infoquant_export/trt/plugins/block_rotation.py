"""``BlockRotation``: x @ blockdiag(R_0, ..., R_{nb-1}) over the last dim, in float64 (learned rotations)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from infoquant_export.trt.plugins.base import FLOATS, DimsBuilder, Field, PluginSpec


class BlockRotationSpec(PluginSpec):
    name = "BlockRotation"
    fields = (Field("num_blocks", "int", 1),)
    num_inputs = (2,)

    def check(self, attrs: dict[str, Any]) -> None:
        if attrs["num_blocks"] < 1:
            raise ValueError(f"BlockRotation: num_blocks={attrs['num_blocks']} must be >= 1")

    def type_combinations(self, attrs: dict[str, Any], num_inputs: int) -> list[tuple[str, ...]]:
        return [(t, "FLOAT", t) for t in FLOATS]

    def output_dims(self, attrs: dict[str, Any], inputs: Sequence[Sequence[Any]], b: DimsBuilder) -> list[list[Any]]:
        return [list(inputs[0])]

    def run(self, attrs: dict[str, Any], inputs: Sequence[Any], outputs: Sequence[Any]) -> None:
        import torch

        x, matrix = inputs
        nb, n = attrs["num_blocks"], matrix.shape[-1]
        blocks = x.reshape(-1, nb, n).double().transpose(0, 1)  # [nb, rows, n], as the reference body
        y = torch.matmul(blocks, matrix.double()).float().transpose(0, 1)
        outputs[0].copy_(y.reshape(outputs[0].shape).to(outputs[0].dtype))
