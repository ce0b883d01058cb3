"""The Triton repository of the demo model on the real tritonserver: the same tokens as
``infoquant-export generate --backend ort``, under load too. Slow: quantizes the demo model with RTN unless
INFOQUANT_DEMO_ARTIFACT names an artifact directory (or INFOQUANT_DEMO_ONNX an exported model.onnx)."""

import os
from pathlib import Path

import pytest

from infoquant_export.deploy.triton_repo import RepoOptions, build_repository
from tests.deploy.conftest import require_triton_server
from tests.deploy.triton_checks import MODEL, cli_generate, concurrent_http, grpc_stream, ids_of

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain in two sentences why the sky is blue.", "Give me three tips for staying focused."]
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def demo_onnx(request):
    if os.environ.get("INFOQUANT_DEMO_ONNX"):
        return Path(os.environ["INFOQUANT_DEMO_ONNX"])
    return request.getfixturevalue("demo_rtn_onnx")


@pytest.fixture(scope="module")
def served(demo_onnx, tmp_path_factory):
    require_triton_server()
    from infoquant_export.deploy.server import triton_server

    root = tmp_path_factory.mktemp("demo-triton")
    build_repository(demo_onnx, root / "repo", RepoOptions(instances=2, ort_threads=1))
    with triton_server(root / "repo", root / "server.log", timeout=600) as server:
        yield server


@pytest.fixture(scope="module")
def expected(demo_onnx):
    return {p: cli_generate(demo_onnx, p, MAX_TOKENS) for p in PROMPTS}


def test_chat_same_tokens_as_cli(served, expected):
    for prompt in PROMPTS:
        status, body = served.generate(MODEL, {"text_input": prompt, "max_tokens": MAX_TOKENS})
        assert status == 200, body
        assert ids_of(body["output_ids"]) == expected[prompt]["tokens"]  # measured: identical for all 4 prompts
        assert body["text_output"] == expected[prompt]["text"]
        responses, error = grpc_stream(served, prompt, MAX_TOKENS)
        assert error is None and [t for ids, _ in responses for t in ids] == expected[prompt]["tokens"]
        assert "".join(text for _, text in responses) == expected[prompt]["text"]


def test_32_concurrent_and_malformed(served, expected):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(32)]
    results = concurrent_http(served, prompts, MAX_TOKENS, threads=8)
    for prompt, (status, body) in zip(prompts, results, strict=True):
        assert status == 200 and ids_of(body["output_ids"]) == expected[prompt]["tokens"]
    assert served.generate(MODEL, {"text_input": "", "max_tokens": 4})[0] == 400
    assert served.generate(MODEL, {"text_input": "word " * 9000, "max_tokens": 4})[0] == 400  # > the 2048 context
    assert served.generate(MODEL, {"text_input": "hi", "max_tokens": [1.5]})[0] >= 400
    status, body = served.generate(MODEL, {"text_input": PROMPTS[0], "max_tokens": MAX_TOKENS})
    assert status == 200 and ids_of(body["output_ids"]) == expected[PROMPTS[0]]["tokens"]
