"""``infoquant-export triton-repo``: a Triton Inference Server model repository for an exported model.

    REPO/<name>/config.pbtxt          decoupled Python-backend LLM (generate extension: text_input -> text_output)
    REPO/<name>/1/model.py            entry point (adds the recorded Python paths, imports deploy.triton_model)
    REPO/<name>/1/model.onnx[.data]   the exported W4A4KV4 graph (a copy or hard link: the repository is movable)
    REPO/<name>/1/plans/model_smXY.plan   TensorRT plans, when given (selected at load time on a matching GPU)
    REPO/<name>_trt/config.pbtxt      with plans: platform tensorrt_plan, cc_model_filenames, KV cache as I/O
    REPO/README.md                    how to serve it and what the server's Python needs
"""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infoquant_export.deploy.pbtxt import ONNX_TO_TRITON, parameters, parse_config, quote, write_config
from infoquant_export.errors import UserError
from infoquant_export.fsutil import atomic_output_dir

DEFAULT_CONTEXT = 2048
KINDS = {"auto": "KIND_AUTO", "cpu": "KIND_CPU", "gpu": "KIND_GPU"}
PLAN_KEY = re.compile(r"^sm_?(\d)(\d+)$")


@dataclass
class RepoOptions:
    name: str = "infoquant_llm"
    instances: int = 1
    instance_kind: str = "auto"
    max_batch_size: int = 0
    dynamic_batching: bool = False
    engine: str = "auto"                                      # auto | ort | trt
    max_context: int | None = None                            # default: the tokenizer's, else 2048
    default_max_tokens: int = 64
    ort_threads: int = 0
    plans: dict[str, Path] = field(default_factory=dict)      # "sm89" -> plan file
    config_extra: str = ""                                    # pbtxt text appended to the LLM config
    python_paths: list[str] | None = None                     # default: this interpreter's site-packages


def find_onnx(source: str | Path) -> Path:
    """The exported ONNX file of ``source`` (a .onnx file, an export directory or a pipeline output)."""
    source = Path(source)
    if source.suffix == ".onnx":
        if not source.is_file():
            raise UserError(f"ONNX file {source} does not exist", "pass a file written by `infoquant-export export`")
        if source.name.endswith(".trt.onnx"):
            raise UserError(f"{source} is the TensorRT variant (no function bodies)", "pass the .onnx beside it")
        return source
    if not source.is_dir():
        raise UserError(f"{source} is neither a directory nor a .onnx file", "pass DIR or model.onnx")
    for candidate in (source / "model.onnx", source / "onnx" / "model.onnx"):
        if candidate.is_file():
            return candidate
    found = sorted(p for p in source.glob("*.onnx") if not p.name.endswith(".trt.onnx"))
    if len(found) == 1:
        return found[0]
    fix = (f"export it first (infoquant-export export {source} --out {source}/model.onnx) or pass the .onnx file"
           if not found else "pass the .onnx file to use")
    raise UserError(f"{source} has {'no' if not found else len(found)} ONNX file{'s' if found else ''}", fix)


def plugins_embedded(plan: Path) -> bool:
    """Whether a plan can run without Python (its plugins embedded ahead of time): from the sidecar that
    ``infoquant-export build`` writes; a plan without a sidecar is taken as the user's own such engine."""
    sidecar = plan.with_name(plan.name + ".json")
    if not sidecar.is_file():
        return True
    try:
        return bool(json.loads(sidecar.read_text()).get("plugins_embedded", False))
    except (json.JSONDecodeError, OSError):
        return False


def parse_plans(specs: list[str]) -> dict[str, Path]:
    """``sm89=PATH`` (or ``sm_89=PATH``) -> {"sm89": PATH}."""
    plans: dict[str, Path] = {}
    for spec in specs:
        key, _, path = spec.partition("=")
        match = PLAN_KEY.match(key.strip())
        if not match or not path:
            raise UserError(f"invalid --plan {spec!r}", "use --plan smXY=PATH, e.g. --plan sm89=out/model.plan")
        if not Path(path).is_file():
            raise UserError(f"plan file {path} does not exist", "build it first (infoquant-export build)")
        plans[f"sm{match.group(1)}{match.group(2)}"] = Path(path)
    return plans


def default_python_paths() -> list[str]:
    """Where this interpreter finds infoquant_export and its dependencies (for the server's Python stub)."""
    import infoquant_export

    paths = [*site.getsitepackages(), site.getusersitepackages()]
    paths.append(str(Path(infoquant_export.__file__).resolve().parents[1]))  # a source checkout
    return list(dict.fromkeys(p for p in paths if Path(p).is_dir()))


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def llm_config(opts: RepoOptions, max_context: int, python_paths: list[str]) -> str:
    batched = opts.max_batch_size > 0
    text = f"""
name: {quote(opts.name)}
backend: "python"
max_batch_size: {opts.max_batch_size}
model_transaction_policy {{ decoupled: true }}
input [
  {{ name: "text_input" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "max_tokens" data_type: TYPE_INT32 dims: [ 1 ] optional: true }},
  {{ name: "stream" data_type: TYPE_BOOL dims: [ 1 ] optional: true }}
]
output [
  {{ name: "text_output" data_type: TYPE_STRING dims: [ {"1" if not batched else "-1"} ] }},
  {{ name: "output_ids" data_type: TYPE_INT64 dims: [ -1 ] }}
]
instance_group [ {{ count: {opts.instances} kind: {KINDS[opts.instance_kind]} }} ]
"""
    if opts.dynamic_batching:
        text += "dynamic_batching { }\n"
    text += parameters({"engine": opts.engine, "max_context": str(max_context),
                        "default_max_tokens": str(opts.default_max_tokens), "ort_threads": str(opts.ort_threads),
                        "python_paths": os.pathsep.join(python_paths)})
    return text + "\n" + opts.config_extra


def plan_config(name: str, onnx_path: Path, plans: dict[str, Path]) -> str:
    """``tensorrt_plan`` model: one plan per compute capability; inputs/outputs (the KV cache included) from the
    ONNX graph, explicit shapes (max_batch_size 0)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}

    def tensor(value: Any) -> str:
        t = value.type.tensor_type
        dtype = onnx.TensorProto.DataType.Name(t.elem_type)
        if dtype not in ONNX_TO_TRITON:
            raise UserError(f"{onnx_path}: tensor {value.name} has type {dtype}, which Triton cannot carry",
                            "re-export the model")
        dims = ", ".join(str(d.dim_value) if d.HasField("dim_value") else "-1" for d in t.shape.dim)
        return f'  {{ name: {quote(value.name)} data_type: {ONNX_TO_TRITON[dtype]} dims: [ {dims} ] }}'

    files = {key: f"model_{key}.plan" for key in sorted(plans)}
    inputs = ",\n".join(tensor(v) for v in graph.input if v.name not in initializers)
    outputs = ",\n".join(tensor(v) for v in graph.output)
    ccs = "\n".join(f"cc_model_filenames {{ key: {quote(key[2] + '.' + key[3:])} value: {quote(f)} }}"
                    for key, f in files.items())
    return f"""
name: {quote(name)}
platform: "tensorrt_plan"
max_batch_size: 0
default_model_filename: {quote(next(iter(files.values())))}
{ccs}
input [
{inputs}
]
output [
{outputs}
]
instance_group [ {{ count: 1 kind: KIND_GPU }} ]
"""


def context_length(onnx_path: Path, requested: int | None) -> int:
    if requested is not None:
        if requested < 2:
            raise UserError(f"--max-context {requested} is too small", "use at least 2 tokens")
        return requested
    from infoquant_export.runtime.ort_decoder import read_onnx_metadata

    files = read_onnx_metadata(onnx_path).get("tokenizer") or {}
    import json

    limit = json.loads(files.get("tokenizer_config.json", "{}")).get("model_max_length")
    return int(limit) if isinstance(limit, int | float) and 1 < limit < 10**6 else DEFAULT_CONTEXT


def check_options(opts: RepoOptions) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", opts.name):
        raise UserError(f"invalid model name {opts.name!r}", "use letters, digits, '_', '-' or '.'")
    if opts.instances < 1:
        raise UserError(f"--instances {opts.instances}", "use 1 or more")
    if opts.max_batch_size < 0 or (opts.dynamic_batching and opts.max_batch_size < 1):
        raise UserError(f"--max-batch-size {opts.max_batch_size} with dynamic batching "
                        f"{'on' if opts.dynamic_batching else 'off'}", "dynamic batching needs --max-batch-size >= 1")
    if opts.engine == "trt" and not opts.plans:
        raise UserError("--engine trt needs a TensorRT plan", "pass --plan smXY=PATH")
    if opts.default_max_tokens < 1:
        raise UserError(f"--default-max-tokens {opts.default_max_tokens}", "use 1 or more")


README = """# Triton model repository (infoquant-export {version})

Model `{name}`: {model} W4A4KV4 (4-bit weights, activations and KV cache), decoupled Python backend, engine
`{engine}` (auto: a TensorRT plan for the GPU when one is in `{name}/1/plans/` and the TensorRT runtime imports,
else ONNX Runtime, CUDA provider on a GPU instance). Context {context} tokens.

Serve it:

    tritonserver --model-repository "$(pwd)"   # run in this directory

Ask it (Triton's generate extension; `"stream": true` with `generate_stream` for server-sent events):

    curl -s localhost:8000/v2/models/{name}/generate -d '{{"text_input": "Hello!", "max_tokens": 32}}'

Outputs: `text_output` (the reply) and `output_ids` (greedy token ids). Over gRPC the model is decoupled, so use the
streaming API (`samples/triton_client.py`).

The server's Python backend must import `infoquant_export` with onnxruntime, numpy, transformers and torch: in an
NGC `tritonserver:<yy.mm>-py3` container run `pip install infoquant-export` (or this project's wheel) into the
Python the stub uses. The paths of the environment that wrote this repository are recorded in `python_paths`
(config.pbtxt) and added when they exist; `$INFOQUANT_PYTHONPATH` adds more.
{trt}"""


def build_repository(source: str | Path, out: str | Path, opts: RepoOptions) -> dict[str, Any]:
    """Write the repository atomically (temporary sibling, then rename); returns a summary."""
    from infoquant_export import __version__
    from infoquant_export.runtime.ort_decoder import read_onnx_metadata

    out = Path(out)
    if out.exists():
        raise UserError(f"output repository {out} already exists", "choose a new --out path or remove it first")
    check_options(opts)
    onnx_path = find_onnx(source)
    meta = read_onnx_metadata(onnx_path)
    if meta.get("variant") != "reference":
        raise UserError(f"{onnx_path} is the TensorRT variant", "pass the full .onnx file")
    max_context = context_length(onnx_path, opts.max_context)
    paths = opts.python_paths if opts.python_paths is not None else default_python_paths()
    llm_text = llm_config(opts, max_context, paths)
    parse_config(llm_text, f"{opts.name}/config.pbtxt")  # before anything is written
    trt_name = f"{opts.name}_trt"
    embedded = {k: p for k, p in opts.plans.items() if plugins_embedded(p)}
    trt_text = plan_config(trt_name, onnx_path, embedded) if embedded else None
    if trt_text:
        parse_config(trt_text, f"{trt_name}/config.pbtxt")
    with atomic_output_dir(out) as tmp:
        version = tmp / opts.name / "1"
        version.mkdir(parents=True)
        write_config(tmp / opts.name, llm_text)
        shutil.copyfile(Path(__file__).with_name("model_py_template.py"), version / "model.py")
        _link_or_copy(onnx_path, version / "model.onnx")
        data = onnx_path.with_name(onnx_path.name + ".data")
        if data.is_file():
            _link_or_copy(data, version / "model.onnx.data")
        if trt_text:
            (tmp / trt_name / "1").mkdir(parents=True)
            write_config(tmp / trt_name, trt_text)
            for key, plan in embedded.items():
                _link_or_copy(plan, tmp / trt_name / "1" / f"model_{key}.plan")
        if opts.plans:
            (version / "plans").mkdir()
            for key, plan in opts.plans.items():
                _link_or_copy(plan, version / "plans" / f"model_{key}.plan")
                sidecar = plan.with_name(plan.name + ".json")  # TrtDecoder reads the engine's profiles from it
                if sidecar.is_file():
                    _link_or_copy(sidecar, version / "plans" / f"model_{key}.plan.json")
        trt_note = (f"\nModel `{trt_name}`: the TensorRT plan(s) {', '.join(sorted(embedded))} as a `tensorrt_plan` "
                    "model (KV cache as explicit inputs/outputs, one plan per compute capability); needs the NGC "
                    "server with the TensorRT backend.\n" if embedded else "")
        if len(embedded) < len(opts.plans):
            trt_note += ("\nNo `tensorrt_plan` model for plan(s) "
                         f"{', '.join(sorted(set(opts.plans) - set(embedded)))}: their plugins are Python IPluginV3 "
                         "plugins (see the .plan.json sidecar), which Triton's TensorRT backend cannot load; the "
                         f"Python-backend model `{opts.name}` runs them.\n")
        (tmp / "README.md").write_text(README.format(
            version=__version__, name=opts.name, model=meta.get("source", {}).get("name", "model"),
            engine=opts.engine, context=max_context, trt=trt_note))
    models = [opts.name] + ([trt_name] if embedded else [])
    return {"repository": str(out), "models": models, "onnx": str(onnx_path), "max_context": max_context,
            "engine": opts.engine, "plans": sorted(opts.plans), "python": sys.version.split()[0]}
