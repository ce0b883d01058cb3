import pytest

from tests.export.conftest import make_artifact


@pytest.fixture(scope="session")
def tiny_exported(tmp_path_factory):
    """Tiny W4A4KV4 artifact exported with --target trt: (reference .onnx, function-free .trt.onnx)."""
    from infoquant_export.export.exporter import export_onnx

    root = tmp_path_factory.mktemp("trt")
    result = export_onnx(make_artifact(root), root / "model.onnx", target="trt")
    return result.onnx_path, result.trt_path
