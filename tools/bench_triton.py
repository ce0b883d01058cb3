"""Throughput and latency of the Triton repository on the real tritonserver (nvidia-pytriton), JSON output.

    python tools/bench_triton.py --onnx out/demo/onnx/model.onnx [--concurrency 1,4,16] [--requests 2]
        [--max-tokens 32] [--repeat 3] [--instances 2] [--ort-threads 1]
    python tools/bench_triton.py --repo out/demo/triton ...

Each client sends ``--requests`` chat requests one after another through the HTTP generate endpoint (greedy,
``max_tokens`` new tokens, prompts cycled from a fixed list); per concurrency level the run is repeated
``--repeat`` times and the median of each figure is reported (all runs are in ``runs``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from infoquant_export.deploy.server import triton_server
from infoquant_export.deploy.triton_repo import RepoOptions, build_repository
from infoquant_export.errors import UserError

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain in two sentences why the sky is blue.", "Give me three tips for staying focused."]


def one_level(server, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    def client(index: int) -> list[tuple[float, int]]:
        out = []
        for r in range(requests):
            prompt = PROMPTS[(index + r) % len(PROMPTS)]
            start = time.perf_counter()
            status, body = server.generate(model, {"text_input": prompt, "max_tokens": max_tokens})
            if status != 200:
                raise RuntimeError(f"request failed: {status} {body}")
            ids = body["output_ids"]
            out.append((time.perf_counter() - start, 1 if isinstance(ids, int) else len(ids)))
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [x for part in pool.map(client, range(clients)) for x in part]
    wall = time.perf_counter() - start
    latencies = sorted(lat for lat, _ in results)
    tokens = sum(n for _, n in results)
    return {"wall_s": wall, "requests": len(results), "tokens": tokens, "tokens_per_s": tokens / wall,
            "requests_per_s": len(results) / wall, "latency_p50_s": statistics.median(latencies),
            "latency_p90_s": latencies[math.ceil(0.9 * len(latencies)) - 1],  # nearest rank
            "ms_per_token_p50": statistics.median(lat / n * 1000 for lat, n in results)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--onnx", help="exported model.onnx (a repository is generated in a temporary directory)")
    src.add_argument("--repo", help="an existing repository")
    p.add_argument("--model", default="infoquant_llm")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--requests", type=int, default=2, help="requests per client per run")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--instances", type=int, default=2)
    p.add_argument("--ort-threads", type=int, default=1)
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-triton-") as tmp:
        try:
            repo = Path(args.repo) if args.repo else Path(tmp) / "repo"
            if args.onnx:
                build_repository(args.onnx, repo, RepoOptions(instances=args.instances, ort_threads=args.ort_threads))
            with triton_server(repo, Path(tmp) / "server.log", timeout=600) as server:
                one_level(server, args.model, 1, 1, args.max_tokens)  # warm-up
                report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, "
                          f"{__import__('os').cpu_count()} cores, {platform.platform()}",
                          "command": " ".join(["python", "tools/bench_triton.py", *(argv or sys.argv[1:])]),
                          "instances": args.instances if args.onnx else None, "ort_threads": args.ort_threads,
                          "max_tokens": args.max_tokens, "requests_per_client": args.requests, "levels": {}}
                for clients in levels:
                    runs = [one_level(server, args.model, clients, args.requests, args.max_tokens)
                            for _ in range(args.repeat)]
                    median = {k: round(statistics.median(r[k] for r in runs), 4) for k in runs[0]}
                    report["levels"][str(clients)] = {"median": median, "runs": runs}
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
