"""Scripts and README of the Jetson bundle (written verbatim; they run on the device, never here)."""

from __future__ import annotations

from typing import Any

BUILD_SH = """#!/usr/bin/env bash
# Build the TensorRT engine on the Jetson with JetPack's TensorRT (no network needed).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$HERE/python${PYTHONPATH:+:$PYTHONPATH}"
export INFOQUANT_KERNEL_DIR="$HERE/kernels/sm_87"
exec python3 "$HERE/build_engine.py" "$@"
"""

BUILD_PY = '''"""Build the engine on the device with JetPack's TensorRT: ``infoquant_export.trt.build`` (the same stages
as ``infoquant-export build``: plugins registered, plugin layers counted against custom nodes, prefill and decode
profiles, JSON sidecar next to the plan).

    ./build_engine.sh [--out model_sm87.plan] [--max-context @CONTEXT@] [--max-seq 512] [--onnx FILE]

It parses model/model.trt.onnx on every TensorRT: that variant has no ONNX local functions (TensorRT < 10.7, e.g.
JetPack 6's 10.3, would import those instead of the plugins) and types the 4-bit KV cache int8 (TensorRT has no
uint8 intermediate tensors). Strongly typed network: the graph's own Q/DQ and plugin types.
"""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(HERE, "model_sm87.plan"))
    p.add_argument("--max-context", type=int, default=@CONTEXT@)
    p.add_argument("--max-seq", type=int, default=512)
    p.add_argument("--onnx", default=os.path.join(HERE, "model", "model.trt.onnx"), help="override the ONNX file")
    args = p.parse_args()
    try:
        from infoquant_export.errors import UserError
        from infoquant_export.trt import load_tensorrt
        from infoquant_export.trt.build import build_engine
    except ImportError as err:
        sys.exit(f"error: infoquant_export.trt is missing from {HERE}/python ({err}); rebuild the bundle")
    try:  # JetPack's `tensorrt` (python3-libnvinfer); INFOQUANT_TRT=tensorrt_rtx selects TensorRT-RTX elsewhere
        trt = load_tensorrt()
        print(f"{trt.flavour} {trt.version}: parsing {args.onnx}")
        result = build_engine(args.onnx, args.out, max_seq=min(args.max_seq, args.max_context),
                              max_context=args.max_context)
    except UserError as err:
        sys.exit(f"error: {err}")
    side = result.sidecar
    print(f"wrote {args.out} ({side['plan_bytes'] / 2**20:.1f} MB, "
          f"{sum(p['layers'] for p in side['plugins'])} plugin layers) in {side['build_seconds']:.0f} s")


if __name__ == "__main__":
    main()
'''

RUN_SH = """#!/usr/bin/env bash
# Greedy chat through the engine built by build_engine.sh (no network needed).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$HERE/python${PYTHONPATH:+:$PYTHONPATH}"
export INFOQUANT_KERNEL_DIR="$HERE/kernels/sm_87"
exec python3 "$HERE/run.py" "$@"
"""

RUN_PY = '''"""Chat with the engine: ./run.sh --prompt "What is the capital of France?" [--max-new-tokens 64]"""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--plan", default=os.path.join(HERE, "model_sm87.plan"))
    args = p.parse_args()
    if not os.path.isfile(args.plan):
        sys.exit(f"error: {args.plan} does not exist; run ./build_engine.sh first")
    import numpy as np

    from infoquant_export.eval.generate import chat_prompt_ids, greedy_loop
    from infoquant_export.trt.runtime import TrtDecoder

    decoder = TrtDecoder(args.plan, os.path.join(HERE, "model", "model.onnx"))
    tokenizer = decoder.tokenizer()
    ids = chat_prompt_ids(tokenizer, args.prompt).numpy()
    logits, cache, _ = decoder(ids, decoder.empty_cache(1))
    step = lambda token, c: decoder(np.array([[token]], np.int64), c)[:2]  # noqa: E731
    tokens = greedy_loop(logits, cache, step, args.max_new_tokens, decoder.stop_ids(tokenizer))
    print(tokenizer.decode(tokens, skip_special_tokens=True))


if __name__ == "__main__":
    main()
'''

SCRIPTS = {"build_engine.sh": BUILD_SH, "build_engine.py": BUILD_PY, "run.sh": RUN_SH, "run.py": RUN_PY}


def readme(version: str, model: str, cfg: dict[str, Any], need: dict[str, Any], kernels: list[str] | None) -> str:
    kernel_text = (f"`kernels/sm_87/`: {len(kernels)} Triton kernel specialisations compiled ahead of time to PTX "
                   "and cubin for sm_87 (`manifest.json` lists the MMA instructions)" if kernels else
                   "kernels: not compiled (--no-kernels); the plugins fall back to compiling them with triton on the "
                   "device")
    return f"""# Jetson Orin bundle: {model} W4A4KV4 (infoquant-export {version})

Built on a host; **nothing here has been run on a Jetson** (none was available). Nothing in the bundle needs
network access on the device.

## Contents

- `model/model.trt.onnx`: the graph TensorRT builds on every version (no ONNX local functions, which TensorRT
  < 10.7 such as JetPack 6.x's 10.3 would import instead of the plugins; the 4-bit KV cache typed int8);
  `model/model.onnx`: the full graph with function bodies, for ONNX Runtime on the device.
- {kernel_text}.
- `python/`: the `infoquant_export` and `infoquant_kernels` sources (the plugins register from
  `infoquant_export.trt.register_plugins()`); used from PYTHONPATH, nothing to install.
- `build_engine.sh`: registers the plugins, parses the ONNX file matching the installed TensorRT, builds
  `model_sm87.plan` (strongly typed; context {need['context_tokens']} tokens, `--max-context` changes it).
- `run.sh --prompt "..."`: greedy chat through the engine, tokenizer and chat template from the ONNX metadata.

## Must already be on the device

- JetPack 6.x (TensorRT 10.3, CUDA 12.6) or JetPack 7.2.2+ (TensorRT 11.4.1), with TensorRT's Python bindings
  (`python3-libnvinfer`, part of JetPack).
- PyTorch for Jetson (NVIDIA's wheel for the JetPack release) and `triton` (the plugins' kernels).
- Python packages `numpy`, `onnx`, `transformers` (with `tokenizers`) and `safetensors`. Without network, install
  them from a wheelhouse made on a connected host:
  `pip download --platform manylinux2014_aarch64 --python-version 3.10 --only-binary=:all: onnx transformers
  safetensors numpy -d wheels`, copy `wheels/`, then `pip install --no-index --find-links wheels onnx transformers
  safetensors numpy` on the device.

## Memory and disk (computed from the model: {cfg['num_layers']} layers, hidden {cfg['hidden_size']},
{cfg['num_kv_heads']} KV heads of {cfg['head_dim']}, vocabulary {cfg['vocab_size']})

| | MB |
|---|---|
| weights (4-bit codes, scales, embedding / LM head) | {need['weights_mb']} |
| 4-bit KV cache: {need['kv_cache_bytes_per_token']} bytes per token, at {need['context_tokens']} tokens \
| {need['kv_cache_mb_at_context']} |
| activations, prefill of the full context (estimate) | {need['activations_mb_at_context']} |
| engine memory (weights + KV + activations) | {need['engine_memory_mb']} |
| CUDA context, TensorRT, PyTorch/Python (estimate) | {need['runtime_overhead_mb']} |
| **total memory to run** (Orin shares it between CPU and GPU) | **{need['total_memory_mb']}** |
| peak memory while building the engine (estimate: 3x weights + runtime) | {need['build_peak_memory_mb']} |
| disk: this bundle | {need['bundle_disk_mb']} |
| disk: the engine (weights + ~10 %, estimate) | {need['engine_disk_mb']} |
| **total disk** | **{need['total_disk_mb']}** |

## On the device

    ./build_engine.sh            # minutes; writes model_sm87.plan
    ./run.sh --prompt "What is the capital of France?"

The engine is specific to the device's GPU (sm_87) and TensorRT version: rebuild after a JetPack upgrade. Orin has
INT8 tensor cores but no INT4 MMA in Triton; the 4-bit GEMM runs int8 `mma.sync` on the unpacked nibbles. Expect
little decode speed-up at batch size 1: W4A4KV4 on the edge mostly buys memory.
"""
