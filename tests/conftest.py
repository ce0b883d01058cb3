"""Shared fixtures: tiny random models of each family, built in code (no downloads)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import tiny_hf_model


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_llama():
    return tiny_hf_model("llama")
