"""``infoquant-export jetson-bundle``: everything a Jetson Orin (sm_87) needs to build and run the engine offline.

    BUNDLE/model/model.onnx[.data]     the exported graph (function bodies; ONNX Runtime)
    BUNDLE/model/model.trt.onnx        the TensorRT variant (no functions, int8-typed KV cache) every TensorRT builds
    BUNDLE/kernels/sm_87/*.ptx|cubin   the Triton kernels compiled ahead of time for Orin (+ manifest.json)
    BUNDLE/python/                     infoquant_export + infoquant_kernels sources (the plugins), no install
    BUNDLE/build_engine.sh|.py         on the device: TensorRT from JetPack, register_plugins(), parse, build
    BUNDLE/run.sh|.py                  on the device: greedy chat through the engine
    BUNDLE/README.md                   prerequisites, memory and disk needs computed from the model
    BUNDLE/bundle.json                 file list with sizes and sha256
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from infoquant_export.deploy.triton_repo import context_length, find_onnx
from infoquant_export.errors import UserError
from infoquant_export.fsutil import atomic_output_dir

TARGET = "sm_87"
RUNTIME_OVERHEAD_MB = 1200  # CUDA context + TensorRT runtime + PyTorch/Python on Orin (estimate, not measured here)


def onnx_weight_bytes(onnx_path: Path) -> int:
    """Bytes of all initializers (inline or external), from the graph without loading external data."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    total = 0
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            total += int(next((e.value for e in tensor.external_data if e.key == "length"), 0))
        else:
            total += len(tensor.raw_data) or tensor.ByteSize()
    return total


def needs(onnx_path: Path, meta: dict[str, Any], context: int, bundle_bytes: int) -> dict[str, Any]:
    """Memory and disk needs from the model's shapes (MB); the 4-bit KV cache per token and at full context."""
    cfg = meta["model_config"]
    per_token = cfg["num_layers"] * 2 * cfg["num_kv_heads"] * (cfg["head_dim"] // 2 + 4 + 1)  # codes+scale+zero
    weights = onnx_weight_bytes(onnx_path)
    logits = cfg["vocab_size"] * 4 * 2  # float32 logits of the last position, input and output buffers
    activations = 4 * context * max(cfg["intermediate_size"], cfg["hidden_size"]) * 4  # prefill working set
    mb = 1 / 2**20
    engine_mb = weights * mb * 1.1  # the plan embeds the weights (+ ~10 % tactics and plugin data, estimate)
    gpu = weights + per_token * context + logits + activations
    return {
        "context_tokens": context, "weights_mb": round(weights * mb, 1),
        "kv_cache_bytes_per_token": per_token, "kv_cache_mb_at_context": round(per_token * context * mb, 2),
        "activations_mb_at_context": round(activations * mb, 1),
        "engine_memory_mb": round(gpu * mb, 1), "runtime_overhead_mb": RUNTIME_OVERHEAD_MB,
        "total_memory_mb": round(gpu * mb + RUNTIME_OVERHEAD_MB, 1),
        "bundle_disk_mb": round(bundle_bytes * mb, 1), "engine_disk_mb": round(engine_mb, 1),
        "build_peak_memory_mb": round(3 * weights * mb + RUNTIME_OVERHEAD_MB, 1),
        "total_disk_mb": round(bundle_bytes * mb + engine_mb, 1),
    }


def _copy_model(onnx_path: Path, dest: Path) -> None:
    from infoquant_export.export.exporter import trt_variant

    dest.mkdir()
    shutil.copy2(onnx_path, dest / "model.onnx")
    data = onnx_path.with_name(onnx_path.name + ".data")
    if data.is_file():
        shutil.copy2(data, dest / "model.onnx.data")
    trt = onnx_path.with_name(onnx_path.name[: -len(".onnx")] + ".trt.onnx")
    if trt.is_file():
        shutil.copy2(trt, dest / "model.trt.onnx")
    else:  # exported with --target ort: strip the function bodies here
        os.replace(trt_variant(dest / "model.onnx"), dest / "model.trt.onnx")


def _compile_kernels(dest: Path) -> dict[str, Any]:
    try:
        import triton  # noqa: F401
    except ImportError as err:
        raise UserError("triton is not installed, so the kernels cannot be compiled for sm_87",
                        "pip install triton==3.6.0, or pass --no-kernels") from err
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-m", "infoquant_export.deploy.jetson_kernels", str(dest), TARGET],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"kernel compilation failed:\n{proc.stderr[-2000:]}")
    return json.loads((dest / "manifest.json").read_text())


def _copy_sources(dest: Path) -> None:
    import infoquant_kernels

    import infoquant_export

    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for module in (infoquant_export, infoquant_kernels):
        src = Path(module.__file__).parent
        shutil.copytree(src, dest / src.name, ignore=ignore)


def _files(root: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        out[str(path.relative_to(root))] = {"bytes": path.stat().st_size, "sha256": h.hexdigest()}
    return out


def build_bundle(source: str | Path, out: str | Path, kernels: bool = True) -> dict[str, Any]:
    """Write the bundle atomically; returns its summary (needs, files, kernels)."""
    from infoquant_export import __version__
    from infoquant_export.deploy import jetson_templates as tpl
    from infoquant_export.runtime.ort_decoder import read_onnx_metadata

    out = Path(out)
    if out.exists():
        raise UserError(f"output bundle {out} already exists", "choose a new --out path or remove it first")
    onnx_path = find_onnx(source)
    meta = read_onnx_metadata(onnx_path)
    if meta.get("variant") != "reference":
        raise UserError(f"{onnx_path} is the TensorRT variant", "pass the full .onnx file")
    context = context_length(onnx_path, None)
    with atomic_output_dir(out) as tmp:
        _copy_model(onnx_path, tmp / "model")
        manifest = _compile_kernels(tmp / "kernels") if kernels else None
        _copy_sources(tmp / "python")
        for name, text in tpl.SCRIPTS.items():
            (tmp / name).write_text(text.replace("@CONTEXT@", str(context)))
            if name.endswith(".sh"):
                (tmp / name).chmod(0o755)
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        need = needs(onnx_path, meta, context, size)
        cfg = meta["model_config"]
        (tmp / "README.md").write_text(tpl.readme(
            version=__version__, model=meta.get("source", {}).get("name", "model"), cfg=cfg, need=need,
            kernels=sorted(manifest["targets"][TARGET]) if manifest else None))
        files = _files(tmp)
        summary = {"bundle": str(out), "onnx": str(onnx_path), "target": TARGET, "needs": need,
                   "kernels": len(manifest["targets"][TARGET]) if manifest else 0, "files": len(files)}
        (tmp / "bundle.json").write_text(json.dumps({**summary, "producer_version": __version__,
                                                     "files": files}, indent=2))
    return summary
