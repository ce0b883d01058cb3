"""``QLinear``: dynamic per-token activation quantization + INT4 x INT4 GEMM (contract: export/ops.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from infoquant_export.trt.plugins.base import FLOATS, DimsBuilder, Field, PluginSpec

WEIGHT_TYPE = {4: "INT4", 8: "INT8"}


class QLinearSpec(PluginSpec):
    name = "QLinear"
    fields = (Field("act_bits", "int"), Field("act_clip", "float", 1.0), Field("act_clip_min", "float", 1.0),
              Field("weight_bits", "int"))
    num_inputs = (2, 3, 4)

    def check(self, attrs: dict[str, Any]) -> None:
        if attrs["act_bits"] not in (4, 8, 16) or attrs["weight_bits"] not in (4, 8, 16):
            raise ValueError(f"QLinear: act_bits={attrs['act_bits']} weight_bits={attrs['weight_bits']} "
                             "(supported: 4, 8 or 16 each)")

    def type_combinations(self, attrs: dict[str, Any], num_inputs: int) -> list[tuple[str, ...]]:
        combos = []
        for x in FLOATS:
            if attrs["weight_bits"] >= 16:  # x, weight (float, x's type), [bias]
                ins = (x, x) + ("FLOAT",) * (num_inputs - 2)
            else:  # x, weight codes, weight_scale, [bias]
                ins = (x, WEIGHT_TYPE[attrs["weight_bits"]]) + ("FLOAT",) * (num_inputs - 2)
            combos.append((*ins, x))
        return combos

    def output_dims(self, attrs: dict[str, Any], inputs: Sequence[Sequence[Any]], b: DimsBuilder) -> list[list[Any]]:
        x, weight = inputs[0], inputs[1]
        return [[*x[:-1], weight[0]]]

    def run(self, attrs: dict[str, Any], inputs: Sequence[Any], outputs: Sequence[Any]) -> None:
        import torch

        from infoquant_export.kernels import ops
        from infoquant_export.quant.primitives import integer_activation, unpack_int4

        x, weight, *rest = inputs
        y = outputs[0]
        a_bits, w_bits = attrs["act_bits"], attrs["weight_bits"]
        x2 = x.reshape(-1, x.shape[-1])
        if a_bits == 4 and w_bits == 4 and x2.shape[-1] % 64 == 0:  # the kernels (numerics.md section 8)
            scale, bias = rest[0], (rest[1] if len(rest) > 1 else None)
            act = ops.quantize_rows(x2, 4, attrs["act_clip"], attrs["act_clip_min"])
            packed = self._packed_weight(weight, scale, bias)
            y.reshape(-1, y.shape[-1]).copy_(ops.w4a4_linear(act, packed, out_dtype=y.dtype))
            return
        # other bit widths: the numerics primitives on the GPU (same arithmetic, not a fast path)
        if w_bits >= 16:
            w, w_scale, bias = weight.float(), None, (rest[0] if rest else None)
        else:
            w = unpack_int4(weight).float() if w_bits == 4 else weight.float()
            w_scale, bias = rest[0], (rest[1] if len(rest) > 1 else None)
        if a_bits >= 16:
            out = x2.float() @ (w * w_scale[:, None] if w_scale is not None else w).T
        elif w_scale is None:
            a_int, a_scale = integer_activation(x2, a_bits, attrs["act_clip"], attrs["act_clip_min"])
            out = (a_int * a_scale) @ w.T
        else:
            a_int, a_scale = integer_activation(x2, a_bits, attrs["act_clip"], attrs["act_clip_min"])
            out = (a_int @ w.T) * a_scale * w_scale
        if bias is not None:
            out = out + bias
        y.reshape(-1, y.shape[-1]).copy_(out.to(torch.float32).to(y.dtype))

    def _packed_weight(self, codes: Any, scale: Any, bias: Any) -> Any:
        """The kernel's PackedWeight over TensorRT's constant buffers; row sums computed once per buffer."""
        import torch

        from infoquant_export.kernels import ops
        from infoquant_export.quant.primitives import unpack_int4

        cache = self.__dict__.setdefault("_rowsums", {})
        key = (codes.data_ptr(), tuple(codes.shape))
        if key not in cache:
            cache[key] = unpack_int4(codes).to(torch.int32).sum(dim=1).to(torch.int32).contiguous()
        return ops.PackedWeight(codes, scale, cache[key], bias)
