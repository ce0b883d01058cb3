import pytest

from infoquant_export.config import QuantConfig
from infoquant_export.pipeline import quantize_to_dir
from tests.helpers import save_tiny_model_dir


def make_artifact(root, family: str = "llama", model: dict | None = None, **quant) -> str:
    hf = save_tiny_model_dir(root / f"hf-{family}", family, **(model or {}))
    cfg = QuantConfig(rotation="hadamard", weights="rtn", **quant)
    out = root / f"art-{family}"
    quantize_to_dir(str(hf), cfg, out, progress=False)
    return str(out)


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    """W4A4KV4 Hadamard RTN artifact of a tiny random LLaMA (GQA 4/2, intermediate 192 = 12 * 16)."""
    return make_artifact(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="session")
def tiny_onnx(tiny_artifact, tmp_path_factory):
    from infoquant_export.export.exporter import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(tiny_artifact, out, target="trt")
    return out
