"""GPU tests: compiled kernels on a CUDA device (``pytest -m gpu tests/gpu``); skipped without one."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "tests/gpu" in str(item.fspath):
            item.add_marker(skip)


def pytest_runtest_logreport(report):
    """Print a failure's traceback as soon as the test fails: a device call's time limit may stop pytest before its
    summary (an H200 run lost the traceback of an order-dependent failure that way)."""
    if report.failed and "tests/gpu" in report.nodeid.replace("\\", "/"):
        print(f"\n--- {report.nodeid} ({report.when}) failed:\n{report.longreprtext[-4000:]}\n---", flush=True)
