"""Prefill and decode throughput: ONNX Runtime (CPU) next to the PyTorch fake-quant model, same run, same tokens.

    python tools/bench_ort.py ARTIFACT_DIR MODEL.onnx [--prefill 512] [--decode 64] [--repeat 3] [--unfolded]

Prefill: one forward over ``--prefill`` tokens of the evaluation split. Decode: ``--decode`` single-token steps
from the cache after that prefill. Prints JSON with medians over ``--repeat`` runs and the ORT/torch ratios.
``--unfolded`` also times a session that keeps the INT4 weights (``OrtDecoder(fold_weights=False)``: every weight
dequantized on every call), interleaved with the others.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch

from infoquant_export.artifact import load_artifact
from infoquant_export.data import corpus
from infoquant_export.runtime.ort_decoder import OrtDecoder


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("onnx")
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--unfolded", action="store_true", help="also time OrtDecoder(fold_weights=False)")
    args = p.parse_args()
    artifact = load_artifact(args.artifact)
    model = artifact.model
    decoders = {"ort": OrtDecoder(args.onnx)}
    if args.unfolded:
        decoders["ort_unfolded"] = OrtDecoder(args.onnx, fold_weights=False)
    tokens = corpus.tokenize(artifact.tokenizer, corpus.load_text("default", "evaluation"))
    ids = tokens[: args.prefill + args.decode][None]
    prompt, steps = ids[:, : args.prefill], ids[0, args.prefill:]

    def torch_run() -> tuple[float, float]:
        with torch.no_grad():
            t_prefill = _timed(lambda: model(prompt))
            _, cache = model(prompt)
            start = time.perf_counter()
            for t in steps:
                _, cache = model(t.view(1, 1), cache)
            return t_prefill, time.perf_counter() - start

    def ort_run(decoder: OrtDecoder) -> tuple[float, float]:
        t_prefill = _timed(lambda: decoder(prompt.numpy()))
        _, cache, _ = decoder(prompt.numpy())
        start = time.perf_counter()
        for t in steps.numpy():
            _, cache, _ = decoder(np.array([[t]], np.int64), cache)
        return t_prefill, time.perf_counter() - start

    runs: dict[str, list[tuple[float, float]]] = {"torch": [], **{name: [] for name in decoders}}
    for _ in range(args.repeat):  # interleaved, so all see the same machine state
        runs["torch"].append(torch_run())
        for name, decoder in decoders.items():
            runs[name].append(ort_run(decoder))
    result: dict[str, object] = {"prefill_tokens": args.prefill, "decode_tokens": args.decode,
                                 "repeat": args.repeat, "threads": torch.get_num_threads()}
    for name, values in runs.items():
        prefill = statistics.median(v[0] for v in values)
        decode = statistics.median(v[1] for v in values)
        result[name] = {"prefill_tok_s": round(args.prefill / prefill, 1),
                        "decode_tok_s": round(args.decode / decode, 2)}
    result["ort_over_torch_prefill"] = round(result["ort"]["prefill_tok_s"] / result["torch"]["prefill_tok_s"], 3)
    result["ort_over_torch_decode"] = round(result["ort"]["decode_tok_s"] / result["torch"]["decode_tok_s"], 3)
    if args.unfolded:
        result["folded_over_unfolded_decode"] = round(
            result["ort"]["decode_tok_s"] / result["ort_unfolded"]["decode_tok_s"], 3)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
