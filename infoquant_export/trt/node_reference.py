"""One custom node of an exported graph as its own ONNX model, run by ONNX Runtime: the reference that each
plugin's computation is checked against (same node, same attributes, same function body, same constant inputs)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

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
    outputs = [helper.make_tensor_value_info(n, types[n], None) if n in types else helper.make_empty_tensor_value_info(n)
               for n in node.output]
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
