"""``infoquant-export export``: artifact directory -> ONNX file(s), as explicit stages.

    plan      validate the artifact (format, schema, tensors, exportable bits) and the output path
    build     the decoder graph with lazy initializers (``model_graph.DecoderGraph``)
    annotate  metadata: quant config, transform schema, model config, cache layout, tokenizer, artifact digest
    write     save to a temporary path next to the output (external data when large), streaming tensors
    check     ``onnx.checker`` (full_check) and strict shape inference on the written file
    publish   rename into place; ``--target trt`` also writes the function-free variant for old TensorRT parsers
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from infoquant_export import __version__
from infoquant_export.artifact import Manifest, read_manifest, require_exportable
from infoquant_export.errors import UserError
from infoquant_export.export.model_graph import DecoderGraph, TensorSource
from infoquant_export.export.trt_graph import retype_uint8_as_int8

TWO_GB = 2 * 1024**3
EXTERNAL_THRESHOLD = 512 * 1024**2  # above this, stream weights to NAME.onnx.data (measured: 1.74 vs 6.1 GB peak RSS)
TOKENIZER_MAX_BYTES = 32 * 1024**2
META_PREFIX = "infoquant."


@dataclass
class ExportResult:
    onnx_path: Path
    trt_path: Path | None
    external_data: bool
    seconds: float
    initializer_bytes: int
    num_custom_nodes: int


def artifact_digest(manifest: Manifest) -> str:
    """SHA-256 over the artifact's config, transform schema and weights file (what verify matches against)."""
    h = hashlib.sha256()
    for name in ("config.json", "transforms.json", "model.safetensors"):
        with open(manifest.directory / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def tokenizer_files(manifest: Manifest) -> dict[str, str]:
    """The artifact's tokenizer directory (text files) to embed in the model metadata."""
    directory = manifest.directory / "tokenizer"
    if not directory.is_dir():
        return {}
    files = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.stat().st_size <= TOKENIZER_MAX_BYTES:
            try:
                files[path.name] = path.read_text()
            except UnicodeDecodeError:
                continue
    return files


def metadata(manifest: Manifest, variant: str) -> dict[str, str]:
    q = manifest.quant
    cache = {"bits": q.kv_bits, "packed": q.kv_bits == 4, "layout": "[batch, kv_heads, seq, head_dim(/2)]",
             "num_layers": manifest.model.num_layers}
    meta: dict[str, Any] = {
        "format": "infoquant-export/onnx-decoder", "format_version": 1, "producer_version": __version__,
        "variant": variant, "model_config": manifest.model.to_dict(), "quant_config": q.to_dict(),
        "transform_schema": manifest.schema.to_dict(), "kv_cache": cache,
        "artifact_sha256": artifact_digest(manifest), "source": manifest.config.get("source", {}),
        "tokenizer": tokenizer_files(manifest),
    }
    return {META_PREFIX + k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def check_output_path(out: Path) -> None:
    if out.suffix != ".onnx":
        raise UserError(f"output {out} does not end in .onnx", "pass --out PATH/model.onnx")
    if not out.parent.is_dir():
        raise UserError(f"output directory {out.parent} does not exist", f"create it first (mkdir -p {out.parent})")
    if out.is_dir():
        raise UserError(f"output {out} is a directory", "pass a file path ending in .onnx")


def check_onnx(path: Path) -> None:
    """Full checker and strict shape inference (both read the file, so external data works)."""
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)


def _save(model: ir.Model, path: Path, external: bool) -> None:
    data = path.name + ".data" if external else None
    ir.save(model, path, external_data=data, size_threshold_bytes=1024)


def export_onnx(directory: str | Path, out: str | Path, target: str = "ort", external_data: bool | None = None,
                check: bool = True) -> ExportResult:
    """Export an artifact directory to ONNX (see the module docstring for the stages)."""
    start = time.perf_counter()
    out = Path(out)
    check_output_path(out)  # plan
    manifest = read_manifest(directory)
    require_exportable(manifest)
    graph = DecoderGraph(manifest, TensorSource(manifest))
    model = graph.build()  # build
    model.metadata_props.update(metadata(manifest, "reference"))  # annotate
    init_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values())
    external = init_bytes > EXTERNAL_THRESHOLD if external_data is None else external_data
    if init_bytes > TWO_GB and not external:
        raise UserError(f"the model has {init_bytes / 1024**3:.1f} GB of weights; protobuf holds at most 2 GB",
                        "drop --no-external-data")
    trt_out = out.with_suffix(".trt.onnx") if target == "trt" else None
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    written = [tmp, tmp.with_name(tmp.name + ".data")]
    try:
        _save(model, tmp, external)  # write
        if check:
            check_onnx(tmp)  # check
        if trt_out is not None:
            stripped = trt_variant(tmp)
            written.append(stripped)
        # publish: data first, then the graph that references it
        if external:
            os.replace(written[1], out.with_name(out.name + ".data"))
            _relink_external(tmp, out.name + ".data")
        os.replace(tmp, out)
        if trt_out is not None:
            if external:
                _relink_external(written[2], out.name + ".data")
            os.replace(written[2], trt_out)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return ExportResult(out, trt_out, external, time.perf_counter() - start, init_bytes,
                        sum(1 for n in model.graph.all_nodes() if n.domain == "infoquant"))


def trt_variant(path: Path) -> Path:
    """The same graph without the local function bodies (TensorRT < 10.7 always inlines a local function), with
    the uint8 KV cache tensors typed int8 (``trt_graph``: TensorRT has no uint8 intermediates)."""
    model = onnx.load(str(path), load_external_data=False)  # inline weights load; external ones stay shared
    del model.functions[:]
    retype_uint8_as_int8(model)
    for prop in model.metadata_props:
        if prop.key == META_PREFIX + "variant":
            prop.value = "trt-plugins"
    stripped = path.with_name(path.name.replace(".tmp-", ".trt.tmp-"))
    onnx.save(model, str(stripped))
    onnx.checker.check_model(str(stripped), full_check=True)
    onnx.shape_inference.infer_shapes(onnx.load(str(stripped), load_external_data=False), check_type=True)
    return stripped


def _relink_external(path: Path, data_name: str) -> None:
    """Point every external tensor of ``path`` at ``data_name`` (after renaming the data file)."""
    model = onnx.load(str(path), load_external_data=False)
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = data_name
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
