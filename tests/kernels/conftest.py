"""Shared setup of the kernel tests.

The kernels run compiled on a CUDA device when one is present, else in Triton's interpreter on CPU tensors
(``infoquant_export.kernels`` sets ``TRITON_INTERPRET=1`` when there is no CUDA device). ``DEVICE`` is where kernel
inputs go; every reference is computed on the CPU with the primitives and compared after ``.cpu()``.
"""

from __future__ import annotations

import pytest
import torch

from infoquant_export.config import QuantConfig
from infoquant_export.kernels import interpreted
from infoquant_export.pipeline import quantize_to_dir
from tests.export.conftest import make_artifact

DEVICE = "cpu" if interpreted() else "cuda"
# Triton's interpreter (triton 3.6 with numpy >= 2) warns on every scalar kernel argument; not ours to fix.
INTERPRETER_WARNING = "ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning"


@pytest.fixture(scope="session")
def kernel_artifact_root(tmp_path_factory):
    return tmp_path_factory.mktemp("kernels")


@pytest.fixture(scope="session")
def tiny_artifact(kernel_artifact_root) -> str:
    """The W4A4KV4 Hadamard RTN artifact of tests/export (tiny random LLaMA, GQA 4/2, intermediate 192 = 12 * 16),
    built from a fixed seed so that the measured values below do not depend on which tests ran first."""
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        return make_artifact(kernel_artifact_root)
    finally:
        torch.random.set_rng_state(state)


def requantize(tiny_artifact: str, name: str, **quant) -> str:
    """Another artifact of the same tiny HF model (``make_artifact`` saved it beside the artifact) with ``quant``
    (RTN without the MSE clip search: only the bit widths matter to the tests that use it)."""
    from pathlib import Path

    root = Path(tiny_artifact).parent
    out = root / f"art-{name}"
    if not out.exists():
        config = QuantConfig(rotation="hadamard", weights="rtn", w_clip_search=False, **quant)
        quantize_to_dir(str(root / "hf-llama"), config, out, progress=False)
    return str(out)
