"""The decoder graph: the fake-quant forward pass of ``models/model.py`` in ONNX, built from an artifact.

Graph I/O (one graph for prefill and decode; ``T = past + seq``):

    inputs   input_ids [batch, seq] int64; attention_mask [batch, T] int64 (1 = attend);
             position_ids [batch, seq] int64;
             past.{i}.key_codes / value_codes [batch, kv_heads, past, head_dim/2] uint8 (4-bit codes, packed),
             past.{i}.key_scale / value_scale [batch, kv_heads, past, 1] float32,
             past.{i}.key_zero / value_zero [batch, kv_heads, past, 1] uint8
             (kv_bits=8: unpacked codes [.., head_dim]; kv_bits=16: past.{i}.key / value float32)
    outputs  logits [batch, seq, vocab] float32; present.{i}.* like past.{i}.* with T entries

The residual stream after layer i is the value ``layers.{i}.output`` (``verify --per-layer`` exposes it).
Initializers are lazy: each is read from the artifact's safetensors file when the model is written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
from safetensors import safe_open

from infoquant_export.artifact import Manifest, expected_tensor_keys
from infoquant_export.errors import UserError
from infoquant_export.export.builder import DOMAIN, DOMAIN_VERSION, OPSET, Builder
from infoquant_export.export.ops import (
    EXPORTABLE_BITS,
    WEIGHT_TYPES,
    BlockRotation,
    FunctionRegistry,
    Hadamard,
    KVDequantize,
    KVQuantize,
    QLinear,
)
from infoquant_export.transforms.rotate import rotation_blocks
from infoquant_export.transforms.schema import Rotation

IR_VERSION = 10
DOUBLE = ir.DataType.DOUBLE
MASK_MIN = float(np.finfo(np.float32).min)  # additive mask; exp(MASK_MIN - max) == 0 exactly, like -inf
FUSED = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up"), "o": ("o",), "down": ("down",)}
SITES = {"qkv": "qkv_in", "gate_up": "gate_up_in", "o": "o_in", "down": "down_in"}  # DecoderLayer quantizers


class TensorSource:
    """Reads artifact tensors one at a time (memory-mapped safetensors), as numpy arrays."""

    def __init__(self, manifest: Manifest) -> None:
        try:
            self._file = safe_open(str(manifest.weights_path), framework="numpy")
            keys = set(self._file.keys())
        except Exception as err:  # safetensors raises its own error types for truncated/corrupt headers
            raise UserError(f"cannot read {manifest.weights_path}: {err}", "re-run quantize") from err
        missing = [k for k in expected_tensor_keys(manifest) if k not in keys]
        if missing:
            raise UserError(f"artifact {manifest.directory} lacks tensor {missing[0]!r} ({len(missing)} missing)",
                            "re-run quantize; the weights file is incomplete")

    def get(self, key: str) -> np.ndarray:
        return self._file.get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(key).get_shape())


def kv_names(prefix: str, layer: int, bits: int) -> list[str]:
    """Graph I/O names of one layer's K/V cache (``prefix`` = past / present)."""
    parts = ["codes", "scale", "zero"] if bits < 16 else [""]
    return [f"{prefix}.{layer}.{kind}" + (f"_{p}" if p else "") for kind in ("key", "value") for p in parts]


@dataclass
class GraphPlan:
    """What the graph needs to know about the artifact, checked before anything is built."""

    manifest: Manifest

    def __post_init__(self) -> None:
        q = self.manifest.quant
        for what, bits in (("a_bits", q.a_bits), ("kv_bits", q.kv_bits), ("w_bits", q.w_bits)):
            if bits not in EXPORTABLE_BITS:
                raise UserError(f"{what}={bits} has no ONNX integer type", "export supports 4, 8 or 16 bits")

    def online(self, site: str, layer: int) -> Rotation | None:
        r = self.manifest.schema.find(site)
        if r is None or r.mode != "online" or (r.layers is not None and layer not in r.layers):
            return None
        return r


class DecoderGraph:
    """Builds the ``ir.Model``; one instance per export."""

    def __init__(self, manifest: Manifest, tensors: TensorSource) -> None:
        self.plan = GraphPlan(manifest)
        self.m, self.cfg, self.quant = manifest, manifest.model, manifest.quant
        self.tensors = tensors
        self.b = Builder()
        self.functions = FunctionRegistry()
        self.initializers: list[ir.Value] = []

    # -- initializers ---------------------------------------------------------------------------------------------
    def lazy(self, name: str, dtype: ir.DataType, shape: list[int], load: Callable[[], np.ndarray]) -> ir.Value:
        def materialize() -> ir.TensorProtocol:
            array = load()
            if dtype in (ir.DataType.INT4, ir.DataType.UINT4):
                return ir.PackedTensor(array, dtype, shape=shape, name=name)
            return ir.tensor(np.ascontiguousarray(array), dtype=dtype, name=name)

        value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype),
                         const_value=ir.LazyTensor(materialize, dtype, ir.Shape(shape), name=name))
        self.initializers.append(value)
        return value

    def float_tensor(self, name: str, key: str, transpose: bool = False) -> ir.Value:
        shape = list(self._shape(key))
        shape = shape[::-1] if transpose else shape

        def load() -> np.ndarray:
            a = self.tensors.get(key).astype(np.float32)
            return a.T if transpose else a

        return self.lazy(name, ir.DataType.FLOAT, shape, load)

    def _shape(self, key: str) -> tuple[int, ...]:
        return self.tensors.shape(key)

    # -- building blocks --------------------------------------------------------------------------------------------
    def clips(self, layer: int, site: str) -> tuple[float, float]:
        """(max, min) clip factors of an activation quantizer: learned by LAC, else the static ratio."""
        if self.quant.lac.enabled:
            clip, clip_min = self.tensors.get(f"layers.{layer}.{site}.clip").tolist()
            return float(clip), float(clip_min)
        return float(self.quant.a_clip_ratio), float(self.quant.a_clip_ratio)

    def qlinear(self, x: ir.Value, layer: int, fused: str, act_bits: int, name: str | None = None) -> ir.Value:
        roles = FUSED[fused]
        keys = [f"layers.{layer}.{r}" for r in roles]
        prefix = f"layers.{layer}.{fused}"
        bits = {self.m.weight_bits.get(k, 16) for k in keys}
        if len(bits) != 1:
            raise UserError(f"{prefix}: fused projections have different weight bits {sorted(bits)}",
                            "quantize q/k/v and gate/up with the same weight bits")
        w_bits = bits.pop()
        in_features = self.cfg.hidden_size if fused in ("qkv", "gate_up") else (
            self.cfg.num_heads * self.cfg.head_dim if fused == "o" else self.cfg.intermediate_size)
        out_features = sum(self._shape(f"{k}.scale" if w_bits < 16 else f"{k}.weight")[0] for k in keys)
        has_bias = self.m.biases[roles[0]]
        op = self.functions.use(QLinear(in_features, act_bits, w_bits, has_bias))
        inputs: list[ir.Value] = [x]
        if w_bits < 16:
            def load_codes() -> np.ndarray:
                return np.concatenate([self.tensors.get(f"{k}.qweight") for k in keys])

            def load_scale() -> np.ndarray:
                return np.concatenate([self.tensors.get(f"{k}.scale").reshape(-1) for k in keys]).astype(np.float32)

            inputs.append(self.lazy(f"{prefix}.weight", WEIGHT_TYPES[w_bits], [out_features, in_features],
                                    load_codes if w_bits == 4 else lambda: load_codes().view(np.int8)))
            inputs.append(self.lazy(f"{prefix}.weight_scale", ir.DataType.FLOAT, [out_features], load_scale))
        else:
            inputs.append(self.lazy(f"{prefix}.weight", ir.DataType.FLOAT, [out_features, in_features],
                                    lambda: np.concatenate([self.tensors.get(f"{k}.weight") for k in keys])))
        if has_bias:
            inputs.append(self.lazy(f"{prefix}.bias", ir.DataType.FLOAT, [out_features],
                                    lambda: np.concatenate([self.tensors.get(f"{k}.bias") for k in keys])))
        clip, clip_min = self.clips(layer, SITES[fused])
        attrs: dict[str, Any] = {"act_bits": act_bits, "act_clip": clip, "act_clip_min": clip_min,
                                 "weight_bits": w_bits}
        return op.call(self.b, inputs, names=[name] if name else None, **attrs)[0]

    def rotate(self, x: ir.Value, rotation: Rotation, layer: int, name: str) -> ir.Value:
        if rotation.kind == "hadamard":
            op = self.functions.use(Hadamard(rotation.size, rotation.num_blocks))
            return op.call(self.b, [x], size=rotation.size, num_blocks=rotation.num_blocks)[0]
        n, nb = rotation.block_size, rotation.num_blocks

        def load() -> np.ndarray:
            if rotation.kind == "learned":
                return self.tensors.get(f"{rotation.matrix}.{layer}").astype(np.float32)
            return rotation_blocks(rotation).float().numpy()

        matrix = self.lazy(f"layers.{layer}.{name}.matrix", ir.DataType.FLOAT, [nb, n, n], load)
        op = self.functions.use(BlockRotation(rotation.size, nb))
        return op.call(self.b, [x, matrix], num_blocks=nb)[0]

    def rms_norm(self, x: ir.Value, key: str) -> ir.Value:
        """``x * (1 / sqrt(mean(x^2) + eps)) * g`` in float64, rounded once (numerics.md section 5)."""
        b = self.b
        xd = b.Cast(x, to=DOUBLE)
        mean_sq = b.ReduceMean(b.Mul(xd, xd), b.ints([-1]), keepdims=1)
        inv = b.Div(b.const(1.0, np.float64), b.Sqrt(b.Add(mean_sq, b.const(self.cfg.rms_norm_eps, np.float64))))
        y = b.Mul(b.Mul(xd, inv), b.Cast(self.float_tensor(key, key), to=DOUBLE))
        return b.Cast(y, to=ir.DataType.FLOAT)

    def sigmoid64(self, x: ir.Value) -> ir.Value:
        """``1 / (1 + exp(-x))`` in float64, rounded once."""
        b = self.b
        e = b.Exp(b.Neg(b.Cast(x, to=DOUBLE)))
        return b.Cast(b.Div(b.const(1.0, np.float64), b.Add(b.const(1.0, np.float64), e)), to=ir.DataType.FLOAT)

    def softmax64(self, scores: ir.Value) -> ir.Value:
        """``exp(s - max(s)) / sum(exp(s - max(s)))`` over the last axis, float64 in and out."""
        b = self.b
        axes = b.ints([-1])
        e = b.Exp(b.Sub(scores, b.ReduceMax(scores, axes, keepdims=1)))
        return b.Div(e, b.ReduceSum(e, axes, keepdims=1))

    def rope(self, x: ir.Value, cos: ir.Value, sin: ir.Value) -> ir.Value:
        b = self.b
        x1, x2 = b.multi("Split", [x], 2, axis=-1)
        return b.Add(b.Mul(x, cos), b.Mul(b.Concat(b.Neg(x2), x1, axis=-1), sin))

    # -- graph ------------------------------------------------------------------------------------------------------
    def build(self) -> ir.Model:
        cfg, b = self.cfg, self.b
        kv_bits = self.quant.kv_bits
        batch, seq, total, past = "batch", "seq", "total", "past"
        input_ids = ir.Value(name="input_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([batch, seq]))
        attention_mask = ir.Value(name="attention_mask", type=ir.TensorType(ir.DataType.INT64),
                                  shape=ir.Shape([batch, total]))
        position_ids = ir.Value(name="position_ids", type=ir.TensorType(ir.DataType.INT64),
                                shape=ir.Shape([batch, seq]))
        inputs, outputs = [input_ids, attention_mask, position_ids], []
        cache_specs = self.cache_specs()

        x = b.Gather(self.float_tensor("embed.weight", "embed.weight"), input_ids, axis=0)
        cos, sin = self.rope_tables(position_ids)
        mask = self.mask(input_ids, attention_mask)
        for i in range(cfg.num_layers):
            past_values = []
            for name, (dtype, last) in zip(kv_names("past", i, kv_bits), cache_specs, strict=True):
                shape = ir.Shape([batch, cfg.num_kv_heads, past, last])
                v = ir.Value(name=name, type=ir.TensorType(dtype), shape=shape)
                inputs.append(v)
                past_values.append(v)
            x, present = self.layer(i, x, cos, sin, mask, past_values)
            outputs += present
        h = self.rms_norm(x, "norm")
        logits = b.MatMul(h, self.float_tensor("lm_head.weight_t", "lm_head.weight", transpose=True),
                          _name="logits")
        logits.shape = ir.Shape([batch, seq, cfg.vocab_size])
        logits.type = ir.TensorType(ir.DataType.FLOAT)
        for v, (dtype, last) in zip(outputs, cache_specs * cfg.num_layers, strict=True):
            v.type = ir.TensorType(dtype)
            v.shape = ir.Shape([batch, cfg.num_kv_heads, total, last])
        graph = ir.Graph(inputs, [logits, *outputs], nodes=b.tape.nodes, initializers=self.initializers,
                         opset_imports={"": OPSET, DOMAIN: DOMAIN_VERSION}, name="infoquant_decoder")
        return ir.Model(graph, ir_version=IR_VERSION, producer_name="infoquant-export",
                        functions=self.functions.functions)

    def cache_specs(self) -> list[tuple[ir.DataType, int]]:
        d, bits = self.cfg.head_dim, self.quant.kv_bits
        if bits >= 16:
            return [(ir.DataType.FLOAT, d)] * 2
        codes = (ir.DataType.UINT8, d // 2 if bits == 4 else d)
        return [codes, (ir.DataType.FLOAT, 1), (ir.DataType.UINT8, 1)] * 2

    def rope_tables(self, position_ids: ir.Value) -> tuple[ir.Value, ir.Value]:
        """cos/sin [batch, 1, seq, head_dim] in float32 (HF convention: concatenated halves)."""
        b = self.b
        inv_freq = self.float_tensor("inv_freq", "inv_freq")
        freqs = b.Mul(b.Unsqueeze(b.Cast(position_ids, to=ir.DataType.FLOAT), b.ints([-1])), inv_freq)
        emb = b.Cast(b.Concat(freqs, freqs, axis=-1), to=DOUBLE)  # float64 transcendentals, rounded once
        cos, sin = b.Cos(emb), b.Sin(emb)
        if self.cfg.attention_scaling != 1.0:
            scale = b.const(self.cfg.attention_scaling, np.float64)
            cos, sin = b.Mul(cos, scale), b.Mul(sin, scale)
        cos, sin = b.Cast(cos, to=ir.DataType.FLOAT), b.Cast(sin, to=ir.DataType.FLOAT)
        axis = b.ints([1])
        return b.Unsqueeze(cos, axis), b.Unsqueeze(sin, axis)

    def mask(self, input_ids: ir.Value, attention_mask: ir.Value) -> ir.Value:
        """Additive mask [batch, 1, 1, seq, T] (0 or MASK_MIN): causal, sliding window, and padding."""
        b = self.b
        zero_idx = b.const(1, np.int64)
        seq = b.Gather(b.Shape(input_ids), zero_idx, axis=0)
        total = b.Gather(b.Shape(attention_mask), zero_idx, axis=0)
        one = b.const(1, np.int64)
        q_pos = b.Unsqueeze(b.Range(b.Sub(total, seq), total, one), b.ints([1]))  # [S, 1]
        k_pos = b.Unsqueeze(b.Range(b.const(0, np.int64), total, one), b.ints([0]))  # [1, T]
        allowed = b.LessOrEqual(k_pos, q_pos)
        if self.cfg.sliding_window:
            allowed = b.And(allowed, b.Greater(k_pos, b.Sub(q_pos, b.const(self.cfg.sliding_window, np.int64))))
        keys = b.Unsqueeze(b.Equal(attention_mask, one), b.ints([1, 2, 3]))  # [B, 1, 1, 1, T]
        return b.Where(b.And(allowed, keys), b.const(0.0, np.float64), b.const(MASK_MIN, np.float64))

    def layer(self, i: int, x: ir.Value, cos: ir.Value, sin: ir.Value, mask: ir.Value,
              past: list[ir.Value]) -> tuple[ir.Value, list[ir.Value]]:
        cfg, q, b = self.cfg, self.quant, self.b
        heads, kv_heads, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        groups = heads // kv_heads
        h = self.rms_norm(x, f"layers.{i}.input_norm")
        qkv = self.qlinear(h, i, "qkv", q.a_bits)
        split = [heads * d, kv_heads * d, kv_heads * d]
        q_, k_, v_ = b.multi("Split", [qkv, b.ints(split)], 3, axis=-1)
        q_ = b.Transpose(b.Reshape(q_, b.ints([0, 0, heads, d])), perm=[0, 2, 1, 3])
        k_ = b.Transpose(b.Reshape(k_, b.ints([0, 0, kv_heads, d])), perm=[0, 2, 1, 3])
        v_ = b.Transpose(b.Reshape(v_, b.ints([0, 0, kv_heads, d])), perm=[0, 2, 1, 3])
        q_, k_ = self.rope(q_, cos, sin), self.rope(k_, cos, sin)
        qk_rotation = self.plan.online("qk_post_rope", i)
        if qk_rotation is not None:
            q_, k_ = self.rotate(q_, qk_rotation, i, "qk_rotation"), self.rotate(k_, qk_rotation, i, "qk_rotation")
        k_full, v_full, present = self.kv_cache(i, k_, v_, past)
        # attention in float64, rounded once (numerics.md section 5); GQA by grouping q, not repeating k/v
        q5 = b.Cast(b.Reshape(q_, b.ints([0, kv_heads, groups, -1, d])), to=DOUBLE)
        k5 = b.Cast(b.Unsqueeze(k_full, b.ints([2])), to=DOUBLE)
        v5 = b.Cast(b.Unsqueeze(v_full, b.ints([2])), to=DOUBLE)
        scores = b.MatMul(q5, b.Transpose(k5, perm=[0, 1, 2, 4, 3]))
        scores = b.Add(b.Mul(scores, b.const(d ** -0.5, np.float64)), mask)
        attn = b.Cast(b.MatMul(self.softmax64(scores), v5), to=ir.DataType.FLOAT)  # [B, kvH, g, S, D]
        attn = b.Transpose(b.Reshape(attn, b.ints([0, heads, -1, d])), perm=[0, 2, 1, 3])
        attn = b.Reshape(attn, b.ints([0, 0, heads * d]))
        o = self.qlinear(attn, i, "o", q.a_bits)
        to_mlp = self.plan.online("residual_attn_to_mlp", i)
        if to_mlp is not None:
            x = self.rotate(x, to_mlp, i, "residual_attn_to_mlp")
        x = b.Add(x, o)
        h = self.rms_norm(x, f"layers.{i}.post_norm")
        gate_up = self.qlinear(h, i, "gate_up", q.a_bits)
        gate, up = b.multi("Split", [gate_up], 2, axis=-1)
        m = b.Mul(b.Mul(gate, self.sigmoid64(gate)), up)
        down_rotation = self.plan.online("down_proj_input", i)
        if down_rotation is not None:
            m = self.rotate(m, down_rotation, i, "down_rotation")
        down = self.qlinear(m, i, "down", q.a_bits)
        to_attn = self.plan.online("residual_mlp_to_attn", i)
        if to_attn is not None:
            x = self.rotate(x, to_attn, i, "residual_mlp_to_attn")
        return b.Add(x, down, _name=f"layers.{i}.output"), present

    def kv_cache(self, i: int, k: ir.Value, v: ir.Value,
                 past: list[ir.Value]) -> tuple[ir.Value, ir.Value, list[ir.Value]]:
        """Quantize the new K/V, append to the past cache (in its 4-bit form) and dequantize the whole cache."""
        b, bits, d = self.b, self.quant.kv_bits, self.cfg.head_dim
        names = kv_names("present", i, bits)
        if bits >= 16:
            k_full = b.Concat(past[0], k, axis=2, _name=names[0])
            v_full = b.Concat(past[1], v, axis=2, _name=names[1])
            return k_full, v_full, [k_full, v_full]
        quant = self.functions.use(KVQuantize(bits, d))
        dequant = self.functions.use(KVDequantize(bits, d))
        clip = float(self.quant.kv_clip_ratio)
        full, present = [], []
        for t, past_t, out_names in ((k, past[:3], names[:3]), (v, past[3:], names[3:])):
            new = quant.call(b, [t], bits=bits, clip=clip, head_dim=d)
            cache = [b.Concat(p, n, axis=2, _name=name) for p, n, name in zip(past_t, new, out_names, strict=True)]
            full.append(dequant.call(b, cache, bits=bits, head_dim=d)[0])
            present += cache
        return full[0], full[1], present
