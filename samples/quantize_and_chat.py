"""Quantize a model with the Python API, measure perplexity, save the artifact and chat with it.

    python samples/quantize_and_chat.py --model demo --out out/sample-w4a4kv4
    python samples/quantize_and_chat.py --model /path/to/hf-llama-dir --out out/my-w4a4kv4 --weights rtn
"""

from __future__ import annotations

import argparse

from infoquant_export.artifact import load_artifact, save_artifact
from infoquant_export.config import CalibrationConfig, QuantConfig
from infoquant_export.eval.generate import chat
from infoquant_export.fsutil import atomic_output_dir
from infoquant_export.pipeline import evaluate, quantize


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo")
    parser.add_argument("--out", required=True)
    parser.add_argument("--weights", default="gptq", choices=["rtn", "gptq"])
    parser.add_argument("--prompt", default="Give me three tips for staying focused.")
    args = parser.parse_args()

    cfg = QuantConfig(weights=args.weights, calibration=CalibrationConfig(num_windows=32)).validate()
    result = quantize(args.model, cfg)  # load -> fuse norms + Hadamard rotations -> GPTQ/RTN + A4/KV4 quantizers
    print(evaluate(result.model, result.tokenizer, max_windows=20))
    with atomic_output_dir(args.out) as tmp:
        save_artifact(tmp, result.model, result.tokenizer, cfg, result.schema, result.source, result.weights)
    artifact = load_artifact(args.out)  # what `infoquant-export export` will read
    print(chat(artifact.model, artifact.tokenizer, args.prompt)["text"])


if __name__ == "__main__":
    main()
