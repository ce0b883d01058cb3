"""The canonical model reproduces each HF family exactly, and incremental decode equals a full forward."""

from __future__ import annotations

import pytest
import torch

from infoquant_export.errors import UserError
from infoquant_export.models.adapters import adapter_for, to_canonical
from tests.helpers import sqnr_db, tiny_hf_model

CASES = [
    ("llama", dict(kv_heads=4)),  # MHA
    ("llama", dict(kv_heads=2)),  # GQA
    ("llama", dict(kv_heads=1, tie=True)),  # MQA, tied embeddings
    ("qwen2", dict(kv_heads=2)),  # q/k/v biases
    ("mistral", dict(kv_heads=2)),  # sliding window 16
]


@pytest.mark.parametrize("family,kwargs", CASES)
def test_canonical_matches_hf(family, kwargs):
    hf = tiny_hf_model(family, **kwargs)
    model = to_canonical(hf)
    ids = torch.randint(0, 128, (2, 40))  # longer than Mistral's window
    with torch.no_grad():
        ref = hf(ids).logits
        ours, _ = model(ids)
    assert sqnr_db(ref, ours) > 100  # measured inf: bit-identical to HF in float32
    if family == "qwen2":
        assert model.layers[0].q.bias is not None and model.layers[0].o.bias is None


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_decode_with_cache_matches_full_forward(family):
    model = to_canonical(tiny_hf_model(family))
    ids = torch.randint(0, 128, (1, 30))
    full, _ = model(ids)
    logits, cache = model(ids[:, :20])
    steps = [logits]
    for t in range(20, 30):
        logits, cache = model(ids[:, t:t + 1], cache)
        steps.append(logits)
    assert sqnr_db(full, torch.cat(steps, dim=1)) > 100  # measured ~130 dB


def test_unsupported_architecture_is_a_user_error():
    class Config:
        model_type = "gpt2"

    with pytest.raises(UserError, match="unsupported architecture 'gpt2'"):
        adapter_for(Config())
