"""One custom node of an exported graph as its own ONNX model, run by ONNX Runtime: the reference that each
plugin's computation is checked against (same node, same attributes, same function body, same constant inputs)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from infoquant_export.trt.cases import PluginCase
from infoquant_export.trt.plugins import NAMESPACE

NP_OF = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.INT8: np.int8}


def single_node_model(model: onnx.ModelProto, node: onnx.NodeProto,
                      input_shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """``node`` with its initializer inputs and its function; the other inputs become graph inputs of the given
    shapes (types from the graph's value infos)."""
    inits = {t.name: t for t in model.graph.initializer}
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]}
    graph_inputs = [helper.make_tensor_value_info(n, types.get(n, onnx.TensorProto.FLOAT), input_shapes[n])
                    for n in node.input if n and n not in inits]
    outputs = [helper.make_tensor_value_info(n, types[n], None) if n in types
               else helper.make_empty_tensor_value_info(n) for n in node.output]
    graph = helper.make_graph([node], f"{node.op_type}_reference", graph_inputs, outputs,
                              [inits[n] for n in node.input if n in inits])
    functions = [f for f in model.functions if f.domain == NAMESPACE and f.name == node.op_type
                 and f.overload == node.overload]
    return helper.make_model(graph, opset_imports=list(model.opset_import), functions=functions,
                             ir_version=model.ir_version)


def run_reference(single: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(single.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def initializer_arrays(model: onnx.ModelProto, node: onnx.NodeProto) -> dict[str, np.ndarray]:
    """The node's constant inputs as numpy (INT4 weights unpacked to int8 by onnx's numpy_helper)."""
    inits = {t.name: t for t in model.graph.initializer}
    return {n: numpy_helper.to_array(inits[n]) for n in node.input if n in inits}


def node_attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute
            if a.name not in ("plugin_namespace", "plugin_version")}


# ---------------------------------------------------------------------------------------------------------------
# plugin cases: what TensorRT would hand each plugin, and what ONNX Runtime computes for the same node
# ---------------------------------------------------------------------------------------------------------------
def _activations(op_type: str, node: onnx.NodeProto, attrs: dict[str, Any], consts: dict[str, np.ndarray],
                 rng: np.random.Generator, rows: int) -> dict[str, np.ndarray]:
    if op_type == "QLinear":
        k = consts[node.input[1]].shape[1]
        x = (rng.standard_normal((rows, k)) * rng.uniform(0.1, 3, (rows, 1))).astype(np.float32)
        x[0, 3] = 40.0  # an outlier
        return {node.input[0]: x}
    if op_type in ("Hadamard", "BlockRotation"):
        width = attrs.get("size") or consts[node.input[1]].shape[0] * consts[node.input[1]].shape[1]
        return {node.input[0]: rng.standard_normal((rows, width)).astype(np.float32)}
    d = attrs["head_dim"]
    shape = (2, 2, max(1, rows // 2), d)
    if op_type == "KVQuantize":
        return {node.input[0]: rng.standard_normal(shape).astype(np.float32)}
    width = d // 2 if attrs["bits"] == 4 else d
    return {node.input[0]: rng.integers(0, 256 if attrs["bits"] == 8 else 256, (*shape[:3], width), dtype=np.uint8),
            node.input[1]: rng.uniform(0.01, 0.5, (*shape[:3], 1)).astype(np.float32),
            node.input[2]: rng.integers(0, 2 ** attrs["bits"], (*shape[:3], 1), dtype=np.uint8)}


def plugin_cases(model: onnx.ModelProto, rng: np.random.Generator, rows: int = 6,
                 per_kind: int = 2, half: bool = False) -> list[PluginCase]:
    """For the first and last node of each custom kind: random activations, ORT's outputs of the node, and the
    plugin-side inputs (INT4 weights packed two per byte as uint8, uint8 KV bytes typed INT8). ``half`` feeds the
    float activations as float16 (ORT sees the same values in float32; expected outputs rounded to float16)."""
    from infoquant_export.quant.primitives import pack_int4
    from infoquant_export.trt.plugins import SPECS

    cases = []
    kinds = sorted({n.op_type for n in model.graph.node if n.domain == NAMESPACE})
    for op_type in kinds:
        nodes = [n for n in model.graph.node if n.domain == NAMESPACE and n.op_type == op_type]
        for node in (nodes[:1] + nodes[-1:])[:per_kind]:
            spec = SPECS[op_type]
            attrs = spec.attrs(node_attrs(node))
            consts = initializer_arrays(model, node)
            feeds = _activations(op_type, node, attrs, consts, rng, rows)
            if half:
                feeds = {k: v.astype(np.float16).astype(np.float32) if v.dtype == np.float32 else v
                         for k, v in feeds.items()}
            expected = run_reference(single_node_model(model, node, {k: list(v.shape) for k, v in feeds.items()}),
                                     feeds)
            inputs: list[tuple[np.ndarray, str]] = []
            for i, name in enumerate(node.input):
                arr = consts[name] if name in consts else feeds[name]
                if op_type == "QLinear" and i == 1 and attrs["weight_bits"] == 4:
                    import torch

                    inputs.append((pack_int4(torch.from_numpy(arr.astype(np.int8))).numpy(), "INT4"))
                elif arr.dtype == np.uint8:
                    inputs.append((arr.view(np.int8), "INT8"))
                elif arr.dtype == np.int8:
                    inputs.append((arr, "INT8"))
                elif half and i == 0 and op_type != "KVDequantize":
                    inputs.append((arr.astype(np.float16), "HALF"))
                else:
                    inputs.append((np.ascontiguousarray(arr, dtype=np.float32), "FLOAT"))
            out_types = spec.output_types(attrs, [t for _, t in inputs])
            expected = [e.view(np.int8) if e.dtype == np.uint8 else
                        (e.astype(np.float16) if t == "HALF" else e) for e, t in zip(expected, out_types, strict=True)]
            cases.append(PluginCase(op_type, node.name, attrs, inputs, expected, out_types))
    return cases
