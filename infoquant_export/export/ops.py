"""The ``infoquant`` custom ops: one ONNX local function per online operation, and its plugin contract.

Each op is emitted as one node in domain ``infoquant`` whose call carries ``plugin_namespace="infoquant"`` and
``plugin_version="1"``. ONNX Runtime (and ``onnx.reference``) run the function body, which is the reference
computation of ``docs/numerics.md`` written in standard opset-21 ops with explicit QuantizeLinear/DequantizeLinear.
TensorRT (>= 10.7, TensorRT-RTX) maps the node to the registered plugin of the same name and ignores the body.
Shape-specialized bodies (Hadamard stage count, packing widths) are function *overloads*; the plugin sees only the
op name and attributes.

Plugin contracts (all float tensors are float32 in the reference graph; a plugin may also accept float16):

``QLinear`` -- y = ((q(x) - z) @ W_codes^T) * s_x * weight_scale + bias   (an INT4 x INT4 GEMM, int32 accumulate)
    inputs   x [..., in] float; weight [out, in] int4 (int8 when weight_bits=8), constant;
             weight_scale [out] float, constant; bias [out] float, constant (only when the node has 4 inputs).
             weight_bits=16: weight [out, in] float and no weight_scale (then y = fq(x) @ W^T + bias)
    outputs  y [..., out] float
    attrs    act_bits (int: 4, 8 or 16 = no activation quantization), act_clip (float, multiplier of the row
             maximum), act_clip_min (float, multiplier of the row minimum; LAC learns both),
             weight_bits (int: 4 or 8)
    numerics per row of x: xmin = min(min(x), 0) * act_clip_min, xmax = max(max(x), 0) * act_clip,
             s = max((xmax - xmin) / (2^b - 1), 1e-8), z = clamp(round(-xmin / s), 0, 2^b - 1) (round half even),
             q = clamp(round(x / s) + z, 0, 2^b - 1); acc = (q - z) @ codes^T is exact (integers, in float32
             or int32); y = (acc * s) * weight_scale[out] (+ bias), in this order.

``Hadamard`` -- y = x @ blockdiag(H_n/sqrt(n), ...) over the last dim
    inputs   x [..., size] float;  outputs y [..., size] float
    attrs    size (int), num_blocks (int). H_n = kron(H_K, H_p) (``transforms/hadamard.py``): per block, FWHT over
             p (Sylvester natural order), then H_K^T over K, then * 1/sqrt(n_block).

``BlockRotation`` -- y = x @ blockdiag(R_0, ..., R_{nb-1}) over the last dim (learned/randomized rotations)
    inputs   x [..., size] float; matrix [num_blocks, n, n] float, constant;  outputs y [..., size] float
    attrs    num_blocks (int)

``KVQuantize`` -- per (batch, head, token) asymmetric quantization of K or V over head_dim
    inputs   x [batch, heads, seq, head_dim] float
    outputs  codes [batch, heads, seq, head_dim/2] uint8 (bits=4: element 2i in the low nibble) or
             [batch, heads, seq, head_dim] uint8 (bits=8); scale [batch, heads, seq, 1] float;
             zero [batch, heads, seq, 1] uint8
    attrs    bits (4 or 8), clip (float), head_dim (int); numerics as QLinear's activation side

``KVDequantize`` -- inverse of KVQuantize: x_hat = (codes - zero) * scale
    inputs   codes, scale, zero as KVQuantize's outputs (any seq length);  outputs x [batch, heads, seq, head_dim]
    attrs    bits, head_dim
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from infoquant_export.export.builder import DOMAIN, Builder, make_function
from infoquant_export.quant.primitives import SCALE_EPS, unsigned_max
from infoquant_export.transforms.hadamard import hadamard_block, hadamard_factors

PLUGIN_NAMESPACE = "infoquant"
PLUGIN_VERSION = "1"
PLUGIN_ATTRS = {"plugin_namespace": ir.AttributeType.STRING, "plugin_version": ir.AttributeType.STRING}
CODE_TYPES = {4: ir.DataType.UINT4, 8: ir.DataType.UINT8}
WEIGHT_TYPES = {4: ir.DataType.INT4, 8: ir.DataType.INT8}
EXPORTABLE_BITS = (4, 8, 16)

INT, FLOAT = ir.AttributeType.INT, ir.AttributeType.FLOAT


def act_qparams(b: Builder, x: ir.Value, bits: int, clip: ir.Value,
                clip_min: ir.Value | None = None) -> tuple[ir.Value, ir.Value]:
    """Per-row (last dim) asymmetric scale and zero point, float32 [..., 1] (numerics.md section 3)."""
    axes, zero = b.ints([-1]), b.const(0.0)
    xmin = b.Mul(b.Min(b.ReduceMin(x, axes, keepdims=1), zero), clip if clip_min is None else clip_min)
    xmax = b.Mul(b.Max(b.ReduceMax(x, axes, keepdims=1), zero), clip)
    qmax = b.const(float(unsigned_max(bits)))
    scale = b.Max(b.Div(b.Sub(xmax, xmin), qmax), b.const(SCALE_EPS))
    zero_point = b.Clip(b.Round(b.Div(b.Neg(xmin), scale)), zero, qmax)
    return scale, zero_point


def quantize_rows(b: Builder, x: ir.Value, scale: ir.Value, zero_point: ir.Value, bits: int,
                  width: int) -> tuple[ir.Value, ir.Value]:
    """QuantizeLinear with one (scale, zero point) per row of ``width`` elements: (codes, typed zero point)."""
    zp = b.Cast(zero_point, to=CODE_TYPES[bits])
    return b.QuantizeLinear(x, scale, zp, axis=-1, block_size=width), zp


def fake_quant_rows(b: Builder, x: ir.Value, bits: int, clip: ir.Value, width: int,
                    clip_min: ir.Value | None = None) -> ir.Value:
    scale, zero_point = act_qparams(b, x, bits, clip, clip_min)
    codes, zp = quantize_rows(b, x, scale, zero_point, bits, width)
    return b.DequantizeLinear(codes, scale, zp, axis=-1, block_size=width)


# ---------------------------------------------------------------------------------------------------------------
# op specs: each knows its overload key, builds its function and emits its call node
# ---------------------------------------------------------------------------------------------------------------
class CustomOp:
    name: str
    attributes: dict[str, ir.AttributeType]

    @property
    def overload(self) -> str:
        raise NotImplementedError

    def body(self, b: Builder, *inputs: ir.Value) -> Sequence[ir.Value]:
        raise NotImplementedError

    @property
    def input_names(self) -> Sequence[str]:
        raise NotImplementedError

    @property
    def num_outputs(self) -> int:
        return 1

    def function(self) -> ir.Function:
        return make_function(self.name, self.overload, self.input_names, {**self.attributes, **PLUGIN_ATTRS},
                             self.body, doc=(type(self).__doc__ or "").strip())

    def call(self, b: Builder, inputs: Sequence[ir.Value], names: Sequence[str] | None = None,
             **attrs: object) -> Sequence[ir.Value]:
        return b.multi(self.name, inputs, self.num_outputs, domain=DOMAIN, overload=self.overload, names=names,
                       plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION, **attrs)


@dataclass(frozen=True)
class QLinear(CustomOp):
    """Linear layer with INT weights and dynamic per-token asymmetric activation quantization."""

    in_features: int
    act_bits: int
    weight_bits: int
    has_bias: bool
    name = "QLinear"
    attributes = {"act_bits": INT, "act_clip": FLOAT, "act_clip_min": FLOAT, "weight_bits": INT}

    @property
    def overload(self) -> str:
        return f"a{self.act_bits}w{self.weight_bits}k{self.in_features}" + ("b" if self.has_bias else "")

    @property
    def input_names(self) -> Sequence[str]:
        scale = ("weight_scale",) if self.weight_bits < 16 else ()
        return ("x", "weight", *scale) + (("bias",) if self.has_bias else ())

    def body(self, b: Builder, x: ir.Value, weight: ir.Value, weight_scale: ir.Value | None = None,
             bias: ir.Value | None = None) -> Sequence[ir.Value]:
        if self.weight_bits >= 16:  # float weights: weight_scale is absent, the 2nd optional input is the bias
            bias = weight_scale
            a = fake_quant_rows(b, x, self.act_bits, b.ref_float("act_clip"), self.in_features,
                                b.ref_float("act_clip_min")) if self.act_bits < 16 else x
            y = b.MatMul(a, b.Transpose(weight, perm=[1, 0]))
        elif self.act_bits >= 16:
            y = b.MatMul(x, b.Transpose(b.DequantizeLinear(weight, weight_scale, axis=0), perm=[1, 0]))
        else:  # integer GEMM: (codes_a - z) @ codes_w^T is exact in float32, then the scales (numerics.md 5)
            scale, zero_point = act_qparams(b, x, self.act_bits, b.ref_float("act_clip"), b.ref_float("act_clip_min"))
            codes, zp = quantize_rows(b, x, scale, zero_point, self.act_bits, self.in_features)
            unit = b.Expand(b.const(1.0), b.Shape(scale))  # DQ with unit scales yields codes - z exactly
            a_int = b.DequantizeLinear(codes, unit, zp, axis=-1, block_size=self.in_features)
            w_int = b.DequantizeLinear(weight, b.const(1.0))
            acc = b.MatMul(a_int, b.Transpose(w_int, perm=[1, 0]))
            y = b.Mul(b.Mul(acc, scale), weight_scale)
        return [b.Add(y, bias) if bias is not None else y]


@dataclass(frozen=True)
class Hadamard(CustomOp):
    """Block Hadamard rotation of the last dim in Kronecker/butterfly form (no dense n x n matrix)."""

    size: int
    num_blocks: int
    name = "Hadamard"
    attributes = {"size": INT, "num_blocks": INT}

    @property
    def overload(self) -> str:
        return f"n{self.size}b{self.num_blocks}"

    input_names = ("x",)

    def body(self, b: Builder, x: ir.Value) -> Sequence[ir.Value]:
        n_block = self.size // self.num_blocks
        k, p = hadamard_factors(n_block)
        shape = b.Shape(x)
        y, h = x, 1
        while h < p:  # butterfly stage h: rows of (2, h), (a, b) -> (a + b, a - b)
            pairs = b.Reshape(y, b.ints([-1, 2, h]))
            lo, hi = b.multi("Split", [pairs], 2, axis=1)
            y = b.Concat(b.Add(lo, hi), b.Sub(lo, hi), axis=1)
            h *= 2
        y = b.Reshape(y, b.ints([-1, k, p]))
        if k > 1:
            hk_t = b.const(np.asarray(hadamard_block(k), np.float64).T, np.float64)
            y = b.Cast(b.MatMul(hk_t, b.Cast(y, to=ir.DataType.DOUBLE)), to=ir.DataType.FLOAT)  # float64, once
        y = b.Mul(y, b.const(np.float32(1.0 / math.sqrt(n_block))))
        return [b.Reshape(y, shape)]


@dataclass(frozen=True)
class BlockRotation(CustomOp):
    """Rotation of the last dim by a block-diagonal matrix given as [num_blocks, n, n] blocks."""

    size: int
    num_blocks: int
    name = "BlockRotation"
    attributes = {"num_blocks": INT}

    @property
    def overload(self) -> str:
        return f"n{self.size}b{self.num_blocks}"

    input_names = ("x", "matrix")

    def body(self, b: Builder, x: ir.Value, matrix: ir.Value) -> Sequence[ir.Value]:
        n = self.size // self.num_blocks
        blocks = b.Transpose(b.Reshape(x, b.ints([-1, self.num_blocks, n])), perm=[1, 0, 2])
        double = ir.DataType.DOUBLE
        y = b.MatMul(b.Cast(blocks, to=double), b.Cast(matrix, to=double))  # float64, rounded once
        y = b.Transpose(b.Cast(y, to=ir.DataType.FLOAT), perm=[1, 0, 2])
        return [b.Reshape(y, b.Shape(x))]


@dataclass(frozen=True)
class KVQuantize(CustomOp):
    """Per (batch, head, token) asymmetric K/V quantization over head_dim; 4-bit codes packed two per byte."""

    bits: int
    head_dim: int
    name = "KVQuantize"
    attributes = {"bits": INT, "clip": FLOAT, "head_dim": INT}
    input_names = ("x",)
    num_outputs = 3

    @property
    def overload(self) -> str:
        return f"kv{self.bits}d{self.head_dim}"

    def body(self, b: Builder, x: ir.Value) -> Sequence[ir.Value]:
        scale, zero_point = act_qparams(b, x, self.bits, b.ref_float("clip"))
        codes, _ = quantize_rows(b, x, scale, zero_point, self.bits, self.head_dim)
        codes = b.Cast(codes, to=ir.DataType.UINT8)
        if self.bits == 4:
            pairs = b.Reshape(codes, b.ints([0, 0, 0, self.head_dim // 2, 2]))
            lo, hi = b.multi("Split", [pairs], 2, axis=4)
            packed = b.BitwiseOr(lo, b.BitShift(hi, b.const(4, np.uint8), direction="LEFT"))
            codes = b.Squeeze(packed, b.ints([4]))
        return [codes, scale, b.Cast(zero_point, to=ir.DataType.UINT8)]


@dataclass(frozen=True)
class KVDequantize(CustomOp):
    """Dequantize a K/V cache written by KVQuantize."""

    bits: int
    head_dim: int
    name = "KVDequantize"
    attributes = {"bits": INT, "head_dim": INT}
    input_names = ("codes", "scale", "zero")

    @property
    def overload(self) -> str:
        return f"kv{self.bits}d{self.head_dim}"

    def body(self, b: Builder, codes: ir.Value, scale: ir.Value, zero: ir.Value) -> Sequence[ir.Value]:
        if self.bits == 4:
            lo = b.BitwiseAnd(codes, b.const(15, np.uint8))
            hi = b.BitShift(codes, b.const(4, np.uint8), direction="RIGHT")
            pairs = b.Concat(b.Unsqueeze(lo, b.ints([4])), b.Unsqueeze(hi, b.ints([4])), axis=4)
            codes = b.Reshape(pairs, b.ints([0, 0, 0, self.head_dim]))
        typed = CODE_TYPES[self.bits]
        return [b.DequantizeLinear(b.Cast(codes, to=typed), scale, b.Cast(zero, to=typed), axis=-1,
                                   block_size=self.head_dim)]


class FunctionRegistry:
    """Collects the distinct (op, overload) functions a graph uses."""

    def __init__(self) -> None:
        self._functions: dict[tuple[str, str], ir.Function] = {}

    def use(self, op: CustomOp) -> CustomOp:
        key = (op.name, op.overload)
        if key not in self._functions:
            self._functions[key] = op.function()
        return op

    @property
    def functions(self) -> list[ir.Function]:
        return list(self._functions.values())
