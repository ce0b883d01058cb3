"""``infoquant-export MODEL.onnx --engine OUT.plan`` (and ``infoquant-export build``): an exported decoder ->
a serialized TensorRT engine with the infoquant plugins, as explicit stages.

    check     the ONNX file is ours (metadata), every infoquant node names a plugin we have, in our version
    adapt     in memory: the uint8 KV cache typed int8 (``export/trt_graph``); AutoCast for --precision fp16/bf16
    parse     TensorRT's ONNX parser with our plugins registered; count plugin layers == custom nodes (no silent
              import of a node's local-function body)
    profile   optimization profiles for prefill and decode over batch, sequence and past length
    build     strongly typed; TensorRT-RTX: ahead-of-time targets (--sm); timing cache
    publish   plan written to a temporary sibling and renamed, then the JSON sidecar ``OUT.plan.json``
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from infoquant_export.errors import UserError
from infoquant_export.trt.plugins import NAMESPACE, SPECS, VERSION

RTX_SMS = (75, 80, 86, 89, 120, 121)  # trt.ComputeCapability members of TensorRT-RTX 1.7 (no 87, no 90)
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class Range:
    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class Profile:
    """One optimization profile: ranges for batch, new tokens (seq) and cached tokens (past)."""

    name: str
    batch: Range
    seq: Range
    past: Range

    def dims(self) -> dict[str, Range]:
        total = Range(self.past.min + self.seq.min, self.past.opt + self.seq.opt, self.past.max + self.seq.max)
        return {"batch": self.batch, "seq": self.seq, "past": self.past, "total": total}


def default_profiles(max_batch: int, max_seq: int, max_context: int) -> list[Profile]:
    """Prefill (up to ``max_seq`` new tokens, optionally after a cached prefix) and decode (one new token)."""
    if not 1 <= max_seq <= max_context:
        raise UserError(f"--max-seq {max_seq} must be between 1 and --max-context {max_context}",
                        "lower --max-seq or raise --max-context")
    if max_batch < 1:
        raise UserError(f"--max-batch {max_batch} must be >= 1", "pass a positive batch size")
    b = Range(1, 1, max_batch)
    prefill = Profile("prefill", b, Range(1, min(128, max_seq), max_seq), Range(0, 0, max_context - max_seq))
    decode = Profile("decode", b, Range(1, 1, 1), Range(0, min(256, max_context - 1), max_context - 1))
    return [prefill, decode]


@dataclass
class BuildResult:
    plan_path: Path
    sidecar_path: Path
    sidecar: dict[str, Any] = field(default_factory=dict)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_sms(text: str | list[int] | None, rtx: bool) -> list[int]:
    """``--sm 86,89`` -> [86, 89]; checked against what the TensorRT flavour can target."""
    if text is None or text == "":
        return [89] if rtx else []
    items = text if isinstance(text, list) else [t.strip() for t in str(text).split(",") if t.strip()]
    try:
        sms = [int(str(t).lower().removeprefix("sm_").removeprefix("sm")) for t in items]
    except ValueError as err:
        raise UserError(f"--sm {text!r} is not a list of compute capabilities", "use e.g. --sm 86,89") from err
    if not rtx:
        raise UserError("--sm selects TensorRT-RTX ahead-of-time targets; data-centre TensorRT builds for the GPU "
                        "it runs on", "drop --sm, or use TensorRT-RTX (INFOQUANT_TRT=tensorrt_rtx)")
    bad = [s for s in sms if s not in RTX_SMS]
    if bad:
        raise UserError(f"--sm {','.join(map(str, bad))} is not a TensorRT-RTX target (no sm_87 Orin, no sm_90 H100)",
                        f"choose from {','.join(map(str, RTX_SMS))}")
    return sorted(set(sms))


def check_onnx(onnx_path: Path) -> tuple[Any, dict[str, Any], Counter]:
    """Load the graph (not external weights), check it is ours and that every custom node has a plugin."""
    import onnx
    from google.protobuf.message import DecodeError

    from infoquant_export.runtime.ort_decoder import read_onnx_metadata

    meta = read_onnx_metadata(onnx_path)  # UserError for missing / unreadable / foreign files
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except (DecodeError, OSError, ValueError) as err:
        raise UserError(f"{onnx_path} is not a readable ONNX file ({type(err).__name__})",
                        "re-export it with `infoquant-export export`") from err
    nodes: Counter = Counter()
    for node in model.graph.node:
        if node.domain != NAMESPACE:
            continue
        attrs = {a.name: a for a in node.attribute}
        version = attrs["plugin_version"].s.decode() if "plugin_version" in attrs else "1"
        if node.op_type not in SPECS:
            raise UserError(f"custom node {node.name} ({NAMESPACE}::{node.op_type}) has no infoquant plugin",
                            "re-export with this version of infoquant-export")
        if version != VERSION:
            raise UserError(f"node {node.name} asks for plugin {node.op_type} version {version}; this build has "
                            f"version {VERSION}", "re-export the model with this version of infoquant-export")
        nodes[node.op_type] += 1
    if not nodes:
        raise UserError(f"{onnx_path} has no infoquant custom nodes (nothing for our plugins)",
                        "export a quantized artifact with `infoquant-export export`")
    return model, meta, nodes


def _input_dim_names(model: Any) -> dict[str, list[str | int]]:
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}


def build_engine(onnx_path: str | Path, plan_path: str | Path, *, sm: str | list[int] | None = None,
                 max_batch: int = 1, max_seq: int = 512, max_context: int = 2048, precision: str = "fp32",
                 timing_cache: str | Path | None = None, flavour: str | None = None, builder_level: int | None = None,
                 verbose: bool = False, allow_reexec: bool = False) -> BuildResult:
    """Build ``plan_path`` from an exported ONNX file (see the module docstring); returns the sidecar."""
    from infoquant_export.trt import load_tensorrt, logger, register_plugins

    start = time.perf_counter()
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not plan_path.parent.is_dir():
        raise UserError(f"directory {plan_path.parent} of the engine path does not exist",
                        "create it first or choose another --engine path")
    if plan_path.is_dir():
        raise UserError(f"--engine {plan_path} is a directory", "pass a file path such as out/model.plan")
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}", "use fp32, fp16 or bf16")
    profiles = default_profiles(max_batch, max_seq, max_context)
    model, meta, custom = check_onnx(onnx_path)  # check
    trt_info = load_tensorrt(flavour, allow_reexec)
    sms = parse_sms(sm, trt_info.is_rtx)
    trt = trt_info.module
    register_plugins(trt_info.flavour)

    from infoquant_export.export.trt_graph import retype_uint8_as_int8  # adapt

    if precision != "fp32":
        from infoquant_export.trt.precision import autocast

        model = autocast(onnx_path, precision, meta.get("variant"))
        retype_uint8_as_int8(model)
    elif meta.get("variant") == "reference":
        import onnx

        model = onnx.load(str(onnx_path), load_external_data=False)
        retype_uint8_as_int8(model)
    dim_names = _input_dim_names(model)

    log = logger(trt_info, verbose)
    builder = trt.Builder(log)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED") and not trt_info.version.startswith("11."):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, log)
    ok = parser.parse(model.SerializeToString(), str(onnx_path))  # parse (path: external weights next to it)
    if not ok:
        errors = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors))
        raise UserError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors[:300]}",
                        "re-export it with `infoquant-export export` (and check the TensorRT version)")
    plugin_layers = _plugin_layers(trt, network)
    if sum(plugin_layers.values()) != sum(custom.values()) or plugin_layers != custom:
        raise UserError(f"TensorRT imported {dict(plugin_layers)} plugin layers for {dict(custom)} custom nodes "
                        "(some were imported as their local-function bodies)",
                        "use TensorRT >= 10.7, or the function-free MODEL.trt.onnx written by export --target trt")

    config = builder.create_builder_config()  # profile
    for p in profiles:
        prof = builder.create_optimization_profile()
        dims = p.dims()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            names = dim_names.get(tensor.name, [])
            shape = [list(tensor.shape) for _ in range(3)]
            for axis, dim in enumerate(names):
                if isinstance(dim, str):
                    if dim not in dims:
                        raise UserError(f"input {tensor.name} has an unknown dynamic dim {dim!r}",
                                        "re-export with `infoquant-export export`")
                    r = dims[dim]
                    shape[0][axis], shape[1][axis], shape[2][axis] = r.min, r.opt, r.max
            prof.set_shape(tensor.name, *shape)
        config.add_optimization_profile(prof)
    if trt_info.is_rtx:  # build
        config.num_compute_capabilities = len(sms)
        for i, s in enumerate(sms):
            config.set_compute_capability(getattr(trt.ComputeCapability, f"SM{s}"), i)
    if builder_level is not None:
        config.builder_optimization_level = builder_level
    cache = None if trt_info.is_rtx else _load_timing_cache(config, timing_cache)  # RTX: timing caches are no-ops
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    build_seconds = time.perf_counter() - t0
    if plan is None:
        raise UserError(f"TensorRT failed to build an engine from {onnx_path} (see the messages above)",
                        "check the profile limits (--max-batch/--max-seq/--max-context) and the TensorRT version")
    data = bytes(memoryview(plan))
    sidecar = {
        "format": "infoquant-export/trt-engine", "format_version": 1,
        "tensorrt": {"flavour": trt_info.flavour, "version": trt_info.version},
        "targets": [f"sm_{s}" for s in sms] if trt_info.is_rtx else ["current-gpu"],
        "profiles": [{"name": p.name, **{k: asdict(v) for k, v in p.dims().items()}} for p in profiles],
        "precision": precision, "strongly_typed": True,
        "plugins_embedded": False,  # Python IPluginV3 plugins: the serving process needs Python, torch and triton
        "plugins": [{"name": n, "namespace": NAMESPACE, "version": VERSION, "layers": plugin_layers[n]}
                    for n in sorted(plugin_layers)],
        "onnx": {"path": onnx_path.name, "sha256": _sha256(onnx_path), "variant": meta.get("variant"),
                 "artifact_sha256": meta.get("artifact_sha256")},
        "model_config": meta.get("model_config"), "kv_cache": meta.get("kv_cache"),
        "network": {"layers": network.num_layers, "inputs": network.num_inputs, "outputs": network.num_outputs},
        "plan_bytes": len(data), "plan_sha256": hashlib.sha256(data).hexdigest(),
        "timing_cache": (None if timing_cache is None else "not used: TensorRT-RTX has no timing cache"
                         if trt_info.is_rtx else str(timing_cache)),
        "build_seconds": round(build_seconds, 3), "total_seconds": None,
    }
    sidecar_path = plan_path.with_name(plan_path.name + ".json")
    tmp_plan = plan_path.with_name(f".{plan_path.name}.tmp-{os.getpid()}")  # publish
    tmp_side = sidecar_path.with_name(f".{sidecar_path.name}.tmp-{os.getpid()}")
    try:
        tmp_plan.write_bytes(data)
        sidecar["total_seconds"] = round(time.perf_counter() - start, 3)
        tmp_side.write_text(json.dumps(sidecar, indent=2) + "\n")
        if cache is not None:
            _save_timing_cache(config, Path(timing_cache))  # type: ignore[arg-type]
        os.replace(tmp_plan, plan_path)
        os.replace(tmp_side, sidecar_path)
    except BaseException:
        tmp_plan.unlink(missing_ok=True)
        tmp_side.unlink(missing_ok=True)
        raise
    return BuildResult(plan_path, sidecar_path, sidecar)


def _plugin_layers(trt: Any, network: Any) -> Counter:
    """Plugin layers of the parsed network by plugin name (ours only)."""
    counts: Counter = Counter()
    kinds = {getattr(trt.LayerType, n) for n in ("PLUGIN_V3", "PLUGIN_V2", "PLUGIN") if hasattr(trt.LayerType, n)}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type not in kinds:
            continue
        plugin = None
        if layer.type == getattr(trt.LayerType, "PLUGIN_V3", None):
            layer.__class__ = trt.IPluginV3Layer
            plugin = layer.plugin
        core = plugin.get_capability_interface(trt.PluginCapabilityType.CORE) if plugin is not None else None
        name = getattr(core, "plugin_name", None) if core is not None else None
        ns = getattr(core, "plugin_namespace", NAMESPACE) if core is not None else NAMESPACE
        if ns == NAMESPACE and name is not None:
            counts[name] += 1
    return counts


def _load_timing_cache(config: Any, path: str | Path | None) -> Any:
    if path is None:
        return None
    path = Path(path)
    blob = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def _save_timing_cache(config: Any, path: Path) -> None:
    cache = config.get_timing_cache()
    data = bytes(memoryview(cache.serialize()))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
