"""On the real demo model (SmolLM2-135M-Instruct, downloaded once from PyPI): conversion, rotation, artifact."""

from __future__ import annotations

import copy

import pytest
import torch

from infoquant_export.artifact import load_artifact, save_artifact
from infoquant_export.config import QuantConfig
from infoquant_export.eval.generate import chat
from infoquant_export.models.adapters import to_canonical
from infoquant_export.models.loading import load_hf_model
from infoquant_export.quant.calibrate import quantize_model
from infoquant_export.transforms.rotate import apply_transforms, hadamard_schema
from tests.helpers import sqnr_db


@pytest.fixture(scope="module")
def demo():
    hf, tokenizer, _ = load_hf_model("demo")
    ids = torch.tensor([tokenizer("The capital of France is Paris. The Eiffel Tower is one of the most visited "
                                  "monuments in the world, built for the 1889 World's Fair.")["input_ids"]])
    with torch.no_grad():
        hf_logits = hf(ids).logits
    model = to_canonical(hf)
    del hf
    return model, tokenizer, ids, hf_logits


def test_canonical_model_matches_transformers(demo):
    model, _, ids, hf_logits = demo
    assert model.cfg.num_layers == 30 and model.cfg.num_kv_heads == 3 and model.cfg.tie_word_embeddings
    assert sqnr_db(hf_logits, model(ids)[0]) > 100  # measured inf (bit-identical)


@pytest.mark.parametrize("blocks", [1, 2, 4])
def test_rotated_full_precision_model_matches_original(demo, blocks):
    model, _, ids, _ = demo
    reference, _ = model(ids)
    rotated = apply_transforms(copy.deepcopy(model), hadamard_schema(576, 64, 1536, blocks, seed=0))
    assert sqnr_db(reference, rotated(ids)[0]) >= 60  # measured 122 dB (1 block)


def test_full_precision_chat(demo):
    model, tokenizer, _, _ = demo
    reply = chat(model, tokenizer, "What is the capital of France?", max_new_tokens=12)
    assert "Paris" in reply["text"]


def test_quantized_artifact_reloads_bit_for_bit(demo, tmp_path):
    model, tokenizer, ids, _ = demo
    cfg = QuantConfig(weights="rtn")
    quantized = copy.deepcopy(model)
    schema = hadamard_schema(576, 64, 1536)
    apply_transforms(quantized, schema)
    weights = quantize_model(quantized, cfg, progress=False)
    expected, _ = quantized(ids)
    save_artifact(tmp_path, quantized, tokenizer, cfg, schema, {"kind": "demo"}, weights)
    loaded = load_artifact(tmp_path)
    assert torch.equal(loaded.model(ids)[0], expected)
    nll = torch.nn.functional.cross_entropy(expected[0, :-1], ids[0, 1:]).item()
    assert nll < 5.0  # measured 3.64 (FP 1.36; the same W4A4KV4 RTN without rotations: 8.69)
