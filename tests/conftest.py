"""Shared test setup: every test starts from the same torch seed."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # the Triton kernels run in the interpreter; set before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def demo_rtn_artifact(tmp_path_factory):
    """The demo model (SmolLM2-135M-Instruct) quantized W4A4KV4 (Hadamard, RTN), once per test session (~75 s on 2
    cores); INFOQUANT_DEMO_ARTIFACT reuses an existing artifact directory."""
    import os

    from infoquant_export.config import QuantConfig
    from infoquant_export.pipeline import quantize_to_dir

    directory = os.environ.get("INFOQUANT_DEMO_ARTIFACT")
    if not directory:
        directory = tmp_path_factory.mktemp("demo") / "w4a4kv4"
        quantize_to_dir("demo", QuantConfig(rotation="hadamard", weights="rtn"), directory, progress=False)
    return directory


@pytest.fixture(scope="session")
def demo_rtn_onnx(demo_rtn_artifact, tmp_path_factory):
    """``demo_rtn_artifact`` exported to ONNX (read-only for the tests that share it)."""
    from infoquant_export.export.exporter import export_onnx

    return export_onnx(demo_rtn_artifact, tmp_path_factory.mktemp("demo-onnx") / "model.onnx").onnx_path
