"""Shared checks against a running Triton server (tiny model in the default suite, demo model as slow tests)."""

from __future__ import annotations

import json
import queue
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from infoquant_export.cli import COMMANDS, build_parser

MODEL = "infoquant_llm"


def cli_generate(onnx_path: str, prompt: str, max_new_tokens: int) -> dict[str, Any]:
    """What ``infoquant-export generate MODEL.onnx --backend ort`` returns (tokens, text)."""
    args = build_parser().parse_args(["generate", str(onnx_path), "--backend", "ort", "--prompt", prompt,
                                      "--max-new-tokens", str(max_new_tokens)])
    return COMMANDS["generate"](args)


def ids_of(value: Any) -> list[int]:
    """The generate extension writes a one-element array as a scalar."""
    return [value] if isinstance(value, int) else list(value)


def http_generate_stream(server: Any, body: dict) -> list[dict]:
    """POST generate_stream; the server-sent events as dicts."""
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/{MODEL}/generate_stream",
                                     data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=600) as r:
        text = r.read().decode()
    return [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: ")]


def _input(name: str, array: np.ndarray, dtype: str) -> Any:
    import tritonclient.grpc as grpcclient

    tensor = grpcclient.InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return tensor


def grpc_stream(server: Any, prompt: str, max_tokens: int, stream: bool = True,
                max_tokens_dtype: str = "INT32") -> tuple[list[tuple[list[int], str]], str | None]:
    """One request over tritonclient's gRPC streaming API: the responses (ids, text) and the error, if any."""
    import tritonclient.grpc as grpcclient

    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        tokens = np.array([max_tokens], np.int32 if max_tokens_dtype == "INT32" else np.float32)
        inputs = [_input("text_input", np.array([prompt.encode()], dtype=np.object_), "BYTES"),
                  _input("max_tokens", tokens, max_tokens_dtype), _input("stream", np.array([stream]), "BOOL")]
        client.async_stream_infer(MODEL, inputs)
        responses = []
        while True:
            result, error = results.get(timeout=600)
            if error is not None:
                return responses, str(error)
            responses.append((result.as_numpy("output_ids").tolist(), result.as_numpy("text_output")[0].decode()))
            if result.get_response().parameters["triton_final_response"].bool_param:
                return responses, None
    finally:
        client.stop_stream()
        client.close()


def concurrent_http(server: Any, prompts: list[str], max_tokens: int, threads: int) -> list[tuple[int, dict]]:
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda p: server.generate(MODEL, {"text_input": p, "max_tokens": max_tokens}), prompts))
