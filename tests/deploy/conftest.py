import pytest

from infoquant_export.export.exporter import export_onnx
from tests.export.conftest import make_artifact


@pytest.fixture(scope="session")
def tiny_deploy_onnx(tmp_path_factory):
    """Exported tiny random W4A4KV4 model (+ its TensorRT variant) in a directory of its own."""
    root = tmp_path_factory.mktemp("deploy")
    art = make_artifact(root)
    (root / "onnx").mkdir()
    export_onnx(art, root / "onnx" / "model.onnx", target="trt")
    return root / "onnx" / "model.onnx"


def require_triton_server():
    pytest.importorskip("pytriton", reason="nvidia-pytriton (the bundled tritonserver) is not installed: "
                        "pip install -e '.[test]'")
    pytest.importorskip("tritonclient.grpc", reason="tritonclient[all] is not installed")
