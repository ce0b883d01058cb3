"""Each plugin's ``enqueue`` path on a GPU (``v3.run_on_stream``: raw device pointers + dims + TensorRT type names,
TensorRT's stream), no TensorRT runtime needed, against ONNX Runtime's output of the same node.

Cases come from ``tools/plugin_cases.py`` (the GPU machine has no ONNX Runtime): set ``INFOQUANT_PLUGIN_CASES``;
without it, cases are made here when ONNX Runtime is importable.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from infoquant_export.trt.cases import PluginCase, logical_dims
from infoquant_export.trt.plugins import SPECS
from infoquant_export.trt.plugins.base import DimsBuilder
from infoquant_export.trt.plugins.v3 import run_on_stream

pytestmark = pytest.mark.gpu
TORCH = {"FLOAT": torch.float32, "HALF": torch.float16, "INT8": torch.int8, "INT4": torch.uint8}


def _cases() -> list[Path]:
    root = os.environ.get("INFOQUANT_PLUGIN_CASES")
    return sorted(Path(root).glob("*.npz")) if root else []


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    files = _cases()
    if files:
        return [PluginCase.load(f) for f in files]
    pytest.importorskip("onnxruntime")
    import onnx

    from infoquant_export.export.exporter import export_onnx
    from infoquant_export.trt.node_reference import plugin_cases
    from tests.export.conftest import make_artifact

    root = tmp_path_factory.mktemp("cases")
    path = export_onnx(make_artifact(root), root / "m.onnx").onnx_path
    model = onnx.load(str(path))
    return plugin_cases(model, np.random.default_rng(0)) + plugin_cases(model, np.random.default_rng(1), half=True)


def test_enqueue_matches_onnx_runtime(cases):
    assert torch.cuda.is_available()
    stream = torch.cuda.Stream()
    kinds = set()
    for case in cases:
        spec = SPECS[case.op_type]
        inputs = [torch.from_numpy(np.array(a)).cuda() for a, _ in case.inputs]
        in_dims = [logical_dims(a, t) for a, t in case.inputs]
        out_dims = spec.output_dims(case.attrs, [list(d) for d in in_dims], DimsBuilder(lambda n: n))
        outputs = [torch.full(d, 7, dtype=TORCH[t], device="cuda") for d, t in zip(out_dims, case.output_types,
                                                                                    strict=True)]
        torch.cuda.synchronize()
        run_on_stream(spec, case.attrs,
                      [(t.data_ptr(), d, ty) for t, d, (_, ty) in zip(inputs, in_dims, case.inputs, strict=True)],
                      [(t.data_ptr(), tuple(t.shape), ty) for t, ty in zip(outputs, case.output_types, strict=True)],
                      stream.cuda_stream)
        stream.synchronize()
        for got, want in zip(outputs, case.expected, strict=True):
            got = got.cpu().numpy()
            assert got.shape == want.shape and got.dtype == want.dtype, case.node_name
            np.testing.assert_array_equal(got, want, err_msg=f"{case.op_type} {case.node_name}")  # bit-identical
        kinds.add(case.op_type)
    assert kinds >= {"QLinear", "Hadamard", "KVQuantize", "KVDequantize"}
