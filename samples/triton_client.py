"""Stream a chat reply from the Triton repository written by ``infoquant-export triton-repo`` (or ``pipeline``).

    tritonserver --model-repository out/demo/triton &
    python samples/triton_client.py --prompt "What is the capital of France?"              # gRPC stream
    python samples/triton_client.py --protocol http --prompt "Write a haiku about the sea."  # HTTP generate_stream

Needs ``pip install "tritonclient[all]"`` for gRPC; the HTTP mode uses only the standard library.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import urllib.request


def stream_grpc(url: str, model: str, prompt: str, max_tokens: int) -> list[int]:
    import numpy as np
    import tritonclient.grpc as grpcclient

    def tensor(name: str, array: np.ndarray, dtype: str) -> grpcclient.InferInput:
        t = grpcclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        return t

    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer(model, [
        tensor("text_input", np.array([prompt.encode()], dtype=np.object_), "BYTES"),
        tensor("max_tokens", np.array([max_tokens], np.int32), "INT32"),
        tensor("stream", np.array([True]), "BOOL")])
    ids: list[int] = []
    try:
        while True:
            result, error = results.get(timeout=600)
            if error is not None:
                raise SystemExit(f"error: {error}")
            ids += result.as_numpy("output_ids").tolist()
            print(result.as_numpy("text_output")[0].decode(), end="", flush=True)
            if result.get_response().parameters["triton_final_response"].bool_param:
                return ids
    finally:
        client.stop_stream()
        client.close()


def stream_http(url: str, model: str, prompt: str, max_tokens: int) -> list[int]:
    body = json.dumps({"text_input": prompt, "max_tokens": max_tokens, "stream": True}).encode()
    request = urllib.request.Request(f"http://{url}/v2/models/{model}/generate_stream", data=body, method="POST")
    ids: list[int] = []
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            for raw in response:  # server-sent events, one "data: {...}" line per piece
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    raise SystemExit(f"error: {event['error']}")
                value = event["output_ids"]
                ids += [value] if isinstance(value, int) else value
                print(event["text_output"], end="", flush=True)
    except urllib.error.HTTPError as err:
        raise SystemExit(f"error: HTTP {err.code}: {err.read().decode()}") from err
    return ids


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--model", default="infoquant_llm")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    p.add_argument("--url", default=None, help="host:port (default localhost:8001 for gRPC, localhost:8000 for HTTP)")
    p.add_argument("--print-ids", action="store_true", help="print the token ids as JSON after the text")
    args = p.parse_args(argv)
    url = args.url or ("localhost:8001" if args.protocol == "grpc" else "localhost:8000")
    run = stream_grpc if args.protocol == "grpc" else stream_http
    ids = run(url, args.model, args.prompt, args.max_tokens)
    print()
    if args.print_ids:
        print(json.dumps(ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
