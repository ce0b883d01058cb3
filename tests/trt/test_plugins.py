"""Each plugin's computation (``PluginSpec.run``, the code every ``enqueue`` runs) against ONNX Runtime running the
same node of the exported graph with its function body. On the CPU the kernels run in Triton's interpreter; the
same comparison on a GPU through ``enqueue``'s buffer path is in tests/gpu/test_plugins_gpu.py."""

import numpy as np
import onnx
import pytest
import torch

from infoquant_export.quant.primitives import pack_int4
from infoquant_export.trt.node_reference import initializer_arrays, node_attrs, run_reference, single_node_model
from infoquant_export.trt.plugins import SPECS
from infoquant_export.trt.plugins.base import DimsBuilder


def first_node(model, op_type, index=0):
    return [n for n in model.graph.node if n.domain == "infoquant" and n.op_type == op_type][index]


def case_inputs(op_type, node, attrs, consts, rng):
    """Random activations for the node's non-constant inputs."""
    if op_type == "QLinear":
        k = consts[node.input[1]].shape[1]
        x = (rng.standard_normal((5, k)) * rng.uniform(0.1, 3, (5, 1))).astype(np.float32)
        x[0, 3] = 40.0  # an outlier row
        return {node.input[0]: x}
    if op_type == "Hadamard":
        return {node.input[0]: rng.standard_normal((4, attrs["size"])).astype(np.float32)}
    if op_type == "KVQuantize":
        return {node.input[0]: rng.standard_normal((2, 2, 7, attrs["head_dim"])).astype(np.float32)}
    if op_type == "KVDequantize":
        d = attrs["head_dim"]
        return {node.input[0]: rng.integers(0, 256, (2, 2, 7, d // 2), dtype=np.uint8),
                node.input[1]: rng.uniform(0.01, 0.5, (2, 2, 7, 1)).astype(np.float32),
                node.input[2]: rng.integers(0, 16, (2, 2, 7, 1), dtype=np.uint8)}
    raise AssertionError(op_type)


def plugin_inputs(op_type, node, feeds, consts):
    """The buffers TensorRT hands the plugin: INT4 weights packed two per byte, uint8 KV bytes typed int8."""
    out = []
    for name in node.input:
        if name in consts:
            arr = consts[name]
            if op_type == "QLinear" and name == node.input[1]:
                out.append(pack_int4(torch.from_numpy(arr.astype(np.int8))))
                continue
            out.append(torch.from_numpy(np.array(arr)))
        else:
            arr = feeds[name]
            t = torch.from_numpy(arr.copy())
            out.append(t.view(torch.int8) if arr.dtype == np.uint8 else t)
    return out


@pytest.mark.parametrize("op_type", ["QLinear", "Hadamard", "KVQuantize", "KVDequantize"])
def test_plugin_run_matches_onnx_runtime(tiny_exported, op_type):
    onnx_path, _ = tiny_exported
    model = onnx.load(str(onnx_path))
    rng = np.random.default_rng(0)
    for index in (0, -1):  # the first and last node of this kind (different shapes: e.g. Hadamard 16 and 192)
        node = first_node(model, op_type, index)
        spec = SPECS[op_type]
        attrs = spec.attrs(node_attrs(node))
        consts = initializer_arrays(model, node)
        feeds = case_inputs(op_type, node, attrs, consts, rng)
        single = single_node_model(model, node, {k: list(v.shape) for k, v in feeds.items()})
        expected = run_reference(single, feeds)
        inputs = plugin_inputs(op_type, node, feeds, consts)
        shapes = spec.output_dims(attrs, [list(t.shape) if i != 1 or op_type != "QLinear" else
                                          [t.shape[0], t.shape[1] * 2] for i, t in enumerate(inputs)],
                                  DimsBuilder(lambda n: n))
        types = spec.output_types(attrs, ["FLOAT" if t.dtype == torch.float32 else
                                          ("INT4" if op_type == "QLinear" and i == 1 else "INT8")
                                          for i, t in enumerate(inputs)])
        outputs = [torch.zeros(s, dtype={"FLOAT": torch.float32, "INT8": torch.int8}[t])
                   for s, t in zip(shapes, types, strict=True)]
        spec.run(attrs, inputs, outputs)
        for got, want in zip(outputs, expected, strict=True):
            got = got.view(torch.uint8).numpy() if got.dtype == torch.int8 else got.numpy()
            assert got.shape == want.shape
            # measured: bit-identical for every node kind (codes, scales, zero points, float32 outputs)
            np.testing.assert_array_equal(got, want)


def test_type_and_shape_rules():
    q = SPECS["QLinear"]
    attrs = q.attrs({"act_bits": 4, "act_clip": 0.9, "act_clip_min": 0.9, "weight_bits": 4})
    assert q.output_types(attrs, ["HALF", "INT4", "FLOAT"]) == ["HALF"]
    assert q.supports(attrs, 1, ["FLOAT", "INT4"], 3) and not q.supports(attrs, 1, ["FLOAT", "INT8"], 3)
    assert not q.supports(attrs, 0, ["INT8"], 3)
    assert q.output_dims(attrs, [[2, 7, 64], [96, 64]], DimsBuilder(lambda n: n)) == [[2, 7, 96]]
    kv = SPECS["KVQuantize"]
    a = kv.attrs({"bits": 4, "clip": 0.95, "head_dim": 64})
    assert kv.output_dims(a, [[1, 3, 9, 64]], DimsBuilder(lambda n: n)) == [[1, 3, 9, 32], [1, 3, 9, 1], [1, 3, 9, 1]]
    with pytest.raises(ValueError, match="head_dim"):
        kv.attrs({"bits": 4, "clip": 0.95, "head_dim": 63})
    with pytest.raises(ValueError, match="size"):
        SPECS["Hadamard"].attrs({"size": 100, "num_blocks": 3})
