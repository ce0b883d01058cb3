"""``Hadamard``: online block Hadamard over the last dim (FWHT over 2^m, H_K^T in float64)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from infoquant_export.trt.plugins.base import FLOATS, DimsBuilder, Field, PluginSpec


class HadamardSpec(PluginSpec):
    name = "Hadamard"
    fields = (Field("size", "int"), Field("num_blocks", "int", 1))

    def check(self, attrs: dict[str, Any]) -> None:
        from infoquant_export.transforms.hadamard import hadamard_factors

        size, blocks = attrs["size"], attrs["num_blocks"]
        if size < 1 or blocks < 1 or size % blocks:
            raise ValueError(f"Hadamard: size={size} is not a multiple of num_blocks={blocks}")
        hadamard_factors(size // blocks)  # raises for sizes without a construction

    def type_combinations(self, attrs: dict[str, Any], num_inputs: int) -> list[tuple[str, ...]]:
        return [(t, t) for t in FLOATS]

    def output_dims(self, attrs: dict[str, Any], inputs: Sequence[Sequence[Any]], b: DimsBuilder) -> list[list[Any]]:
        return [list(inputs[0])]

    def run(self, attrs: dict[str, Any], inputs: Sequence[Any], outputs: Sequence[Any]) -> None:
        from infoquant_export.kernels import ops

        x = inputs[0]
        outputs[0].copy_(ops.hadamard(x.float() if x.dtype != outputs[0].dtype else x, attrs["num_blocks"])
                         .to(outputs[0].dtype))
