"""The TensorRT view of an exported graph (in memory, or written as ``MODEL.trt.onnx``).

TensorRT has no UINT8 intermediate tensors ("legalUINT8" parser assertion), and the 4-bit KV cache is uint8 in the
reference graph (packed codes, zero points). TensorRT sees those tensors as INT8 holding the same bytes: graph
inputs/outputs and value infos are retyped, the KVQuantize/KVDequantize plugins declare INT8, and the only standard
op touching them (Concat of past and new cache) is type-agnostic. Callers reinterpret uint8 <-> int8 arrays as views.
"""

from __future__ import annotations

import onnx

UINT8, INT8 = onnx.TensorProto.UINT8, onnx.TensorProto.INT8
MOVES_BYTES = {"Concat", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Slice", "Transpose", "Expand"}  # any type


def retype_uint8_as_int8(model: onnx.ModelProto) -> list[str]:
    """Retype every uint8 graph input, output and value info of the main graph as int8; returns their names.
    Raises ValueError if a main-graph node that does more than move bytes (Concat, Reshape, ...) touches them."""
    graph = model.graph
    infos = [*graph.input, *graph.output, *graph.value_info]
    names = {vi.name for vi in infos if vi.type.tensor_type.elem_type == UINT8}
    for node in graph.node:
        if node.domain == "" and node.op_type not in MOVES_BYTES and names & {*node.input, *node.output}:
            raise ValueError(f"uint8 tensor used by {node.op_type} node {node.name}: cannot retype for TensorRT")
        if node.domain == "" and any(a.name == "to" and a.i == UINT8 for a in node.attribute):
            raise ValueError(f"node {node.name} casts to uint8: cannot retype for TensorRT")
    for vi in infos:
        if vi.name in names:
            vi.type.tensor_type.elem_type = INT8
    return sorted(names)
