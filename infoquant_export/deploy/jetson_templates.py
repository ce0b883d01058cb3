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

BUILD_PY = '''"""Parse the bundled ONNX with JetPack's TensorRT after registering the plugins; write the engine.

    ./build_engine.sh [--out model_sm87.plan] [--max-context @CONTEXT@] [--workspace-mb 1024]

TensorRT < 10.7 (JetPack 6.x ships 10.3) parses model/model.trt.onnx (no ONNX local functions); 10.7+ and 11.x
(JetPack 7.2.2+: 11.4.1) parse model/model.onnx. Strongly typed network: the graph's own Q/DQ and plugin types.
"""

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def version_tuple(text):
    return tuple(int(p) for p in text.split(".")[:2])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(HERE, "model_sm87.plan"))
    p.add_argument("--max-context", type=int, default=@CONTEXT@)
    p.add_argument("--workspace-mb", type=int, default=1024)
    p.add_argument("--onnx", default=None, help="override the ONNX file")
    args = p.parse_args()
    try:
        import tensorrt as trt
    except ImportError:
        sys.exit("error: TensorRT Python is not importable; it ships with JetPack (python3-libnvinfer)")
    try:
        from infoquant_export.trt import register_plugins
    except ImportError as err:
        sys.exit(f"error: infoquant_export.trt is missing from {HERE}/python ({err}); rebuild the bundle")
    version = version_tuple(trt.__version__)
    onnx_path = args.onnx or os.path.join(HERE, "model", "model.trt.onnx" if version < (10, 7) else "model.onnx")
    print(f"TensorRT {trt.__version__}: parsing {onnx_path}")
    register_plugins()  # before parsing: the parser maps infoquant nodes to the registered plugins
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        for i in range(parser.num_errors):
            print(parser.get_error(i), file=sys.stderr)
        sys.exit("error: the ONNX parser failed (see above)")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, args.workspace_mb << 20)
    profile = builder.create_optimization_profile()
    ctx = args.max_context
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        if tensor.name in ("input_ids", "position_ids"):
            lo, opt, hi = [1, 1], [1, min(128, ctx)], [1, ctx]
        elif tensor.name == "attention_mask":
            lo, opt, hi = [1, 1], [1, ctx // 2], [1, ctx]
        else:  # past cache [batch, kv_heads, past, width]
            lo, opt, hi = ([1, shape[1], n, shape[3]] for n in (0, ctx // 2, ctx - 1))
        profile.set_shape(tensor.name, lo, opt, hi)
    config.add_optimization_profile(profile)
    start = time.time()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        sys.exit("error: the engine build failed (see the TensorRT log above)")
    with open(args.out, "wb") as f:
        f.write(plan)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MB) in {time.time() - start:.0f} s")


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

- `model/model.trt.onnx`: the graph without ONNX local functions, for JetPack 6.x's TensorRT 10.3;
  `model/model.onnx`: the full graph, for TensorRT >= 10.7 (JetPack 7.2.2+ ships TensorRT 11.4.1).
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
