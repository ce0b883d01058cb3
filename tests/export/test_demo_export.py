"""The demo model through ONNX Runtime: greedy generation with the 4-bit KV cache equals the fake-quant model.

Slow (quantizes the demo model). Set INFOQUANT_DEMO_ARTIFACT to an existing artifact directory to skip quantizing.
"""


import pytest

from infoquant_export.eval.generate import chat_prompt_ids, greedy_generate
from infoquant_export.runtime.ort_decoder import OrtDecoder, ort_greedy_generate

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain in two sentences why the sky is blue."]


@pytest.fixture(scope="module")
def demo(demo_rtn_artifact, demo_rtn_onnx):
    from infoquant_export.artifact import load_artifact

    return load_artifact(demo_rtn_artifact), OrtDecoder(demo_rtn_onnx)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_64_tokens_identical(demo, prompt):
    artifact, decoder = demo
    ids = chat_prompt_ids(artifact.tokenizer, prompt)
    expected = greedy_generate(artifact.model, ids, 64, stop=set())
    got = ort_greedy_generate(decoder, ids.numpy(), 64, stop=set())
    assert got == expected  # measured: identical for all three prompts (64/64 tokens)
