"""``KVQuantize``: per (batch, head, token) asymmetric K/V quantization; 4-bit codes packed two per byte."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from infoquant_export.trt.plugins.base import FLOATS, DimsBuilder, Field, PluginSpec


class KVQuantizeSpec(PluginSpec):
    name = "KVQuantize"
    fields = (Field("bits", "int"), Field("clip", "float", 1.0), Field("head_dim", "int"))
    num_outputs = 3

    def check(self, attrs: dict[str, Any]) -> None:
        if attrs["bits"] not in (4, 8):
            raise ValueError(f"KVQuantize: bits={attrs['bits']} (supported: 4 or 8)")
        if attrs["head_dim"] < 2 or attrs["head_dim"] % 2:
            raise ValueError(f"KVQuantize: head_dim={attrs['head_dim']} must be even")

    def type_combinations(self, attrs: dict[str, Any], num_inputs: int) -> list[tuple[str, ...]]:
        return [(t, "INT8", "FLOAT", "INT8") for t in FLOATS]  # uint8 bytes typed int8 (trt_graph)

    def output_dims(self, attrs: dict[str, Any], inputs: Sequence[Sequence[Any]], b: DimsBuilder) -> list[list[Any]]:
        x = inputs[0]
        width = attrs["head_dim"] // 2 if attrs["bits"] == 4 else attrs["head_dim"]
        return [[*x[:3], b.const(width)], [*x[:3], b.const(1)], [*x[:3], b.const(1)]]

    def run(self, attrs: dict[str, Any], inputs: Sequence[Any], outputs: Sequence[Any]) -> None:
        from infoquant_export.kernels import ops
        from infoquant_export.quant.primitives import activation_qparams, quantize_activation

        x = inputs[0]
        import torch

        codes, scale, zero = (t.view(torch.uint8) if t.dtype == torch.int8 else t for t in outputs)
        b, h, s, d = x.shape
        if attrs["bits"] == 4 and s > 0:  # the kernel writes [B, H, T, D/2] from rows of [B, S, H*D]
            cache = ops.KVCache4(codes, scale.view(b, h, s), zero.view(b, h, s))
            ops.quantize_kv(x.transpose(1, 2).contiguous(), cache, 0, attrs["clip"], rotate=False)
        elif s > 0:  # 8-bit codes: the primitives
            sc, zp = activation_qparams(x, 8, attrs["clip"])
            codes.copy_(quantize_activation(x, sc, zp, 8))
            scale.copy_(sc)
            zero.copy_(zp.to(zero.dtype))
