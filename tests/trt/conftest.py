import pytest

from tests.export.conftest import make_artifact


@pytest.fixture(scope="session")
def tiny_exported(tmp_path_factory):
    """Tiny W4A4KV4 artifact exported with --target trt: (reference .onnx, function-free .trt.onnx)."""
    from infoquant_export.export.exporter import export_onnx

    root = tmp_path_factory.mktemp("trt")
    result = export_onnx(make_artifact(root), root / "model.onnx", target="trt")
    return result.onnx_path, result.trt_path


@pytest.fixture(scope="session")
def psot_exported(tmp_path_factory):
    """Tiny PSOT + LAC artifact (learned rotations: BlockRotation nodes, LAC clip pairs), exported."""
    from infoquant_export.config import CalibrationConfig, LacConfig, PsotConfig, QuantConfig
    from infoquant_export.export.exporter import export_onnx
    from infoquant_export.pipeline import quantize_to_dir
    from tests.helpers import save_tiny_model_dir

    root = tmp_path_factory.mktemp("trt-psot")
    cfg = QuantConfig(rotation="psot", weights="rtn", calibration=CalibrationConfig(num_windows=4, seq_len=32),
                      psot=PsotConfig(num_windows=4, seq_len=32, epochs=1, eta_m=4),
                      lac=LacConfig(enabled=True, epochs=1, lr=0.2, warmup_steps=0))
    quantize_to_dir(str(save_tiny_model_dir(root / "hf")), cfg, root / "art", progress=False)
    return export_onnx(root / "art", root / "psot.onnx").onnx_path
