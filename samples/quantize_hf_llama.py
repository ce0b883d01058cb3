"""Quantize your own Hugging Face LLaMA-family directory to W4A4KV4 end to end, without a notebook.

    python samples/quantize_hf_llama.py /path/to/Llama-3.2-1B-Instruct --out out/my-llama [--weights rtn]
        [--jetson]   # also write out/my-llama-jetson (ONNX, sm_87 kernels, build/run scripts)

Runs the same stages as ``infoquant-export pipeline``: Hadamard rotations + GPTQ (or RTN) -> perplexity FP vs
W4A4KV4 -> ONNX export -> ONNX Runtime parity -> TensorRT engine when TensorRT is importable -> Triton
repository; then prints where everything is. The directory needs config.json, safetensors weights and the
tokenizer (with a chat template for chat use). Architectures: LLaMA, Qwen2, Mistral (see models/adapters.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from infoquant_export.deploy.end_to_end import PipelineOptions, format_summary, run_pipeline
from infoquant_export.errors import UserError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", help="Hugging Face model directory (config.json, *.safetensors, tokenizer)")
    p.add_argument("--out", required=True, help="new output directory")
    p.add_argument("--weights", choices=("rtn", "gptq"), default="gptq")
    p.add_argument("--eval-windows", type=int, default=None, help="perplexity windows (default: all)")
    p.add_argument("--verify-windows", type=int, default=16)
    p.add_argument("--jetson", action="store_true", help="also write OUT-jetson, the Jetson Orin bundle")
    args = p.parse_args(argv)
    try:
        if not (Path(args.model_dir) / "config.json").is_file():
            raise UserError(f"{args.model_dir} has no config.json", "pass a Hugging Face model directory")
        summary = run_pipeline(args.out, PipelineOptions(model=args.model_dir, weights=args.weights,
                                                         eval_windows=args.eval_windows,
                                                         verify_windows=args.verify_windows))
        if args.jetson:
            from infoquant_export.deploy.jetson import build_bundle

            summary["jetson_bundle"] = build_bundle(summary["artifacts"]["onnx"], f"{args.out}-jetson")["bundle"]
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    if "jetson_bundle" in summary:
        print(f"Jetson bundle       {summary['jetson_bundle']}")
    print(json.dumps(summary["perplexity"]))
    return 0 if summary["ort_parity"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
