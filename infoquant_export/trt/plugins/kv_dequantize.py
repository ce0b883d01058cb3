"""``KVDequantize``: x = (codes - zero) * scale from a cache written by KVQuantize."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from infoquant_export.trt.plugins.base import DimsBuilder, Field, PluginSpec


class KVDequantizeSpec(PluginSpec):
    name = "KVDequantize"
    fields = (Field("bits", "int"), Field("head_dim", "int"))
    num_inputs = (3,)

    def check(self, attrs: dict[str, Any]) -> None:
        if attrs["bits"] not in (4, 8):
            raise ValueError(f"KVDequantize: bits={attrs['bits']} (supported: 4 or 8)")
        if attrs["head_dim"] < 2 or attrs["head_dim"] % 2:
            raise ValueError(f"KVDequantize: head_dim={attrs['head_dim']} must be even")

    def type_combinations(self, attrs: dict[str, Any], num_inputs: int) -> list[tuple[str, ...]]:
        return [("INT8", "FLOAT", "INT8", "FLOAT")]  # uint8 bytes typed int8 (trt_graph)

    def output_dims(self, attrs: dict[str, Any], inputs: Sequence[Sequence[Any]], b: DimsBuilder) -> list[list[Any]]:
        return [[*inputs[0][:3], b.const(attrs["head_dim"])]]

    def run(self, attrs: dict[str, Any], inputs: Sequence[Any], outputs: Sequence[Any]) -> None:
        import torch

        from infoquant_export.kernels import ops

        codes, scale, zero = (t.view(torch.uint8) if t.dtype == torch.int8 else t for t in inputs)
        b, h, t, _ = codes.shape
        if t == 0:
            return
        if attrs["bits"] == 4:
            cache = ops.KVCache4(codes, scale.reshape(b, h, t), zero.reshape(b, h, t))
            outputs[0].copy_(ops.dequantize_kv(cache, t, outputs[0].dtype))
        else:
            outputs[0].copy_(((codes.float() - zero.float()) * scale).to(outputs[0].dtype))
