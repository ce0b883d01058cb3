"""Each plugin's computation (``PluginSpec.run``, the code every ``enqueue`` runs) against ONNX Runtime running the
same node of the exported graph with its function body. On the CPU the kernels run in Triton's interpreter; the
same cases on a GPU through ``enqueue``'s buffer path are in tests/gpu/test_plugins_gpu.py."""

import numpy as np
import onnx
import pytest
import torch

from infoquant_export.trt.cases import PluginCase, logical_dims
from infoquant_export.trt.node_reference import plugin_cases
from infoquant_export.trt.plugins import SPECS
from infoquant_export.trt.plugins.base import DimsBuilder

TORCH = {"FLOAT": torch.float32, "HALF": torch.float16, "INT8": torch.int8, "INT4": torch.uint8}


def run_case_cpu(case: PluginCase) -> list[np.ndarray]:
    spec = SPECS[case.op_type]
    inputs = [torch.from_numpy(np.array(a)) for a, _ in case.inputs]
    dims = spec.output_dims(case.attrs, [list(logical_dims(a, t)) for a, t in case.inputs], DimsBuilder(lambda n: n))
    outputs = [torch.zeros(d, dtype=TORCH[t]) for d, t in zip(dims, case.output_types, strict=True)]
    spec.run(case.attrs, inputs, outputs)
    return [o.numpy() for o in outputs]


@pytest.mark.parametrize("half", [False, True])
def test_plugin_run_matches_onnx_runtime(tiny_exported, tmp_path, half):
    model = onnx.load(str(tiny_exported[0]))
    cases = plugin_cases(model, np.random.default_rng(0), half=half)
    assert {c.op_type for c in cases} == {"QLinear", "Hadamard", "KVQuantize", "KVDequantize"}
    for i, case in enumerate(cases):
        case.save(tmp_path / f"{i}.npz")
        case = PluginCase.load(tmp_path / f"{i}.npz")  # the GPU test reads cases saved like this
        for got, want in zip(run_case_cpu(case), case.expected, strict=True):
            assert got.shape == want.shape and got.dtype == want.dtype, case.node_name
            # measured: bit-identical for every node kind (codes, scales, zero points, float32 and float16 outputs)
            np.testing.assert_array_equal(got, want, err_msg=case.node_name)


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


def test_psot_graph_plugins_match_onnx_runtime_and_build(psot_exported, tmp_path):
    """Learned rotations (PSOT) add BlockRotation nodes; LAC sets QLinear's clip fields."""
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed")
    from infoquant_export.trt.build import build_engine

    model = onnx.load(str(psot_exported))
    cases = plugin_cases(model, np.random.default_rng(1))
    assert "BlockRotation" in {c.op_type for c in cases}
    for case in cases:
        for got, want in zip(run_case_cpu(case), case.expected, strict=True):
            if case.op_type == "BlockRotation":  # float64 matmul rounded once; summation order may differ
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)  # measured: bit-identical here
            else:
                np.testing.assert_array_equal(got, want, err_msg=case.node_name)
    side = build_engine(psot_exported, tmp_path / "psot.plan").sidecar
    assert {p["name"] for p in side["plugins"]} >= {"BlockRotation", "QLinear", "Hadamard", "KVQuantize"}
