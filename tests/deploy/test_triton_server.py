"""The generated Triton repository served by the real tritonserver (nvidia-pytriton) on 127.0.0.1: tiny model.

Same tokens as ``infoquant-export generate --backend ort`` through the HTTP generate endpoint, its SSE stream and
tritonclient's gRPC stream; 32 concurrent requests; malformed requests answered with errors while serving goes on.
The demo model runs the same checks in test_triton_demo.py (slow).
"""

import pytest

from infoquant_export.deploy.triton_repo import RepoOptions, build_repository
from tests.deploy.conftest import require_triton_server
from tests.deploy.triton_checks import (
    MODEL,
    cli_generate,
    concurrent_http,
    grpc_stream,
    http_generate_stream,
    ids_of,
)

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Hello!", "Count to five."]
MAX_TOKENS = 12
CONTEXT = 96


@pytest.fixture(scope="module")
def served(tiny_deploy_onnx, tmp_path_factory):
    require_triton_server()
    from infoquant_export.deploy.server import triton_server

    root = tmp_path_factory.mktemp("triton")
    build_repository(tiny_deploy_onnx.parent, root / "repo", RepoOptions(instances=2, max_context=CONTEXT))
    with triton_server(root / "repo", root / "server.log", timeout=300) as server:  # stopped on exit, always
        yield server


@pytest.fixture(scope="module")
def expected(tiny_deploy_onnx):
    return {p: cli_generate(tiny_deploy_onnx, p, MAX_TOKENS) for p in PROMPTS}


@pytest.mark.parametrize("prompt", PROMPTS)
def test_http_generate_equals_cli(served, expected, prompt):
    status, body = served.generate(MODEL, {"text_input": prompt, "max_tokens": MAX_TOKENS})
    assert status == 200, body
    assert ids_of(body["output_ids"]) == expected[prompt]["tokens"]  # measured: identical, 12/12 tokens
    assert body["text_output"] == expected[prompt]["text"]
    assert len(expected[prompt]["tokens"]) == MAX_TOKENS  # the random model never emits its stop id in 12 steps


def test_grpc_stream_equals_cli(served, expected):
    for prompt in PROMPTS:
        responses, error = grpc_stream(served, prompt, MAX_TOKENS)
        assert error is None
        assert len(responses) > 1  # streamed: one response per token (or per complete UTF-8 piece)
        assert [t for ids, _ in responses for t in ids] == expected[prompt]["tokens"]
        assert "".join(text for _, text in responses) == expected[prompt]["text"]


def test_grpc_non_streaming_and_sse(served, expected):
    prompt = PROMPTS[0]
    responses, error = grpc_stream(served, prompt, MAX_TOKENS, stream=False)
    assert error is None and len(responses) == 1 and responses[0][0] == expected[prompt]["tokens"]
    events = http_generate_stream(served, {"text_input": prompt, "max_tokens": MAX_TOKENS, "stream": True})
    assert len(events) > 1
    assert [t for e in events for t in ids_of(e["output_ids"])] == expected[prompt]["tokens"]


def test_32_concurrent_requests_match_sequential(served, expected):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(32)]
    results = concurrent_http(served, prompts, MAX_TOKENS, threads=8)
    assert all(status == 200 for status, _ in results)
    for prompt, (_, body) in zip(prompts, results, strict=True):
        assert ids_of(body["output_ids"]) == expected[prompt]["tokens"]


def test_malformed_requests_get_errors_and_serving_continues(served, expected):
    status, body = served.generate(MODEL, {"text_input": "   ", "max_tokens": 4})
    assert status == 400 and "empty" in body["error"]
    status, body = served.generate(MODEL, {"text_input": "word " * 200, "max_tokens": 4})
    assert status == 400 and f"the context is {CONTEXT}" in body["error"]
    status, body = served.generate(MODEL, {"text_input": "hi", "max_tokens": "four"})  # wrong dtype
    assert status >= 400 and "error" in body
    status, body = served.generate(MODEL, {"text_input": "hi", "max_tokens": 0})
    assert status == 400 and "max_tokens" in body["error"]
    _, error = grpc_stream(served, "hi", 4, max_tokens_dtype="FP32")  # wrong dtype over gRPC
    assert error is not None and "max_tokens" in error
    status, body = served.generate(MODEL, {"text_input": PROMPTS[2], "max_tokens": MAX_TOKENS})
    assert status == 200 and ids_of(body["output_ids"]) == expected[PROMPTS[2]]["tokens"]
    assert served.ready(MODEL) and served.process.poll() is None


def test_dynamic_batching_repository_serves(tiny_deploy_onnx, expected, tmp_path):
    require_triton_server()
    from infoquant_export.deploy.server import triton_server

    build_repository(tiny_deploy_onnx, tmp_path / "repo",
                     RepoOptions(max_batch_size=4, dynamic_batching=True, instance_kind="cpu"))
    with triton_server(tmp_path / "repo", tmp_path / "server.log") as server:
        results = concurrent_http(server, PROMPTS, MAX_TOKENS, threads=4)
    for prompt, (status, body) in zip(PROMPTS, results, strict=True):
        assert status == 200 and ids_of(body["output_ids"]) == expected[prompt]["tokens"]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_sample_streaming_client(served, expected, protocol):
    import json
    import subprocess
    import sys
    from pathlib import Path

    sample = Path(__file__).resolve().parents[2] / "samples" / "triton_client.py"
    url = served.grpc_url if protocol == "grpc" else served.http_url
    proc = subprocess.run([sys.executable, str(sample), "--protocol", protocol, "--url", url, "--prompt", PROMPTS[1],
                           "--max-tokens", str(MAX_TOKENS), "--print-ids"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text, ids = proc.stdout.rsplit("\n", 2)[:2]
    assert json.loads(ids) == expected[PROMPTS[1]]["tokens"]
    assert text == expected[PROMPTS[1]]["text"]
