"""``--precision fp16|bf16``: NVIDIA ModelOpt AutoCast lowers everything that is not an infoquant plugin (norms,
RoPE, attention softmax, SiLU, embedding, lm_head) for TensorRT's strongly typed network, the documented replacement
for the removed ``--fp16`` builder flag. The plugins keep their float32 inputs and outputs (their numerics are
defined in float32; AutoCast inserts the casts around them); graph inputs and outputs keep their types.

ModelOpt 0.47 runs here on the CPU when installed without its ``[onnx]`` extra (which pins onnxruntime-gpu):
``pip install --no-deps nvidia-modelopt==0.47.0`` plus ``onnx_graphsurgeon onnxslim onnxscript lief ml_dtypes
cppimport nvidia-ml-py scipy`` (the ``autocast`` extra of this package). AutoCast runs the model once in ONNX
Runtime to find values that would overflow float16 and keeps those nodes in float32, so it needs the reference
``.onnx`` (with function bodies), not the ``.trt.onnx`` variant.
"""

from __future__ import annotations

import contextlib
import tempfile
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from infoquant_export.errors import UserError
from infoquant_export.trt.plugins import NAMESPACE

LOW = {"fp16": "fp16", "bf16": "bf16"}


def autocast(onnx_path: Path, precision: str, variant: str | None) -> Any:
    """The AutoCast-converted model (onnx.ModelProto) for ``precision`` ("fp16" or "bf16")."""
    if variant != "reference":
        raise UserError(f"--precision {precision} needs the reference .onnx (AutoCast runs it in ONNX Runtime); "
                        f"{onnx_path.name} is the function-free TensorRT variant", "pass the .onnx written next to it")
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError as err:
        raise UserError(f"--precision {precision} needs NVIDIA ModelOpt AutoCast ({err})",
                        'pip install -e ".[autocast]" (see infoquant_export/trt/precision.py)') from err
    import onnx

    _give_modelopt_our_tensorrt()
    with tempfile.TemporaryDirectory(prefix="infoquant-autocast-") as tmp:
        calibration = _calibration_inputs(onnx_path, Path(tmp))
        model = onnx.load(str(onnx_path))
        renamed = _unique_function_names(model)
        flat = Path(tmp) / "model.onnx"
        onnx.save(model, str(flat), save_as_external_data=model.ByteSize() > 2**30, location="model.onnx.data")
        try:
            # in tmp: ONNX Runtime's symbolic shape inference (run by AutoCast) saves sym_shape_infer_temp.onnx
            # (+ external data) to the working directory when its inference is incomplete, and leaves it there
            with contextlib.chdir(tmp):
                converted = convert_to_mixed_precision(
                    onnx_path=str(flat), low_precision_type=LOW[precision], keep_io_types=True,
                    calibration_data=str(calibration), op_types_to_exclude=renamed,  # plugins stay float32
                    nodes_to_exclude=_cache_nodes(model) + _rope_table_nodes(model),
                    trt_plugins_precision=[f"{name}:fp32" for name in renamed], providers=["cpu"])
        except Exception as err:  # ModelOpt raises bare AssertionErrors from its graph passes
            where = traceback.extract_tb(err.__traceback__)[-1]
            raise UserError(f"ModelOpt AutoCast failed for --precision {precision} ({type(err).__name__} in "
                            f"{Path(where.filename).name}:{where.lineno} {where.name})",
                            "use --precision fp32 or fp16 (bf16 fails in ModelOpt 0.47's type inference)") from err
    _restore_function_names(converted)
    # AutoCast guesses the custom nodes' output types (it typed KVDequantize's float output uint8): drop the
    # intermediate value infos; TensorRT takes the plugins' declared types and infers the rest
    del converted.graph.value_info[:]
    return converted


def autocast_file(onnx_path: Path, precision: str, out: Path) -> Path:
    """Write the AutoCast model to ``out`` with the source's metadata (``verify --precision`` runs it in ONNX
    Runtime: the cost of the precision choice, measured on the CPU)."""
    import onnx

    from infoquant_export.runtime.ort_decoder import read_onnx_metadata

    meta = read_onnx_metadata(onnx_path)
    model = autocast(onnx_path, precision, meta.get("variant"))
    source = onnx.load(str(onnx_path), load_external_data=False)
    del model.metadata_props[:]
    model.metadata_props.extend(source.metadata_props)
    onnx.save(model, str(out), save_as_external_data=model.ByteSize() > 2**30, location=out.name + ".data")
    return out


SEP = "__"


def _rope_table_nodes(model: Any) -> list[str]:
    """Regexes for the nodes computed from ``position_ids`` alone (the RoPE angle tables): angles ``pos *
    inv_freq`` reach hundreds of radians, where float16's spacing is 0.25-0.5 rad, so they stay float32."""
    import re

    constant = {t.name for t in model.graph.initializer}
    derived = {"position_ids"}
    names = []
    for node in model.graph.node:  # topological order
        inputs = [i for i in node.input if i]
        if inputs and any(i in derived for i in inputs) and all(i in derived or i in constant for i in inputs):
            derived.update(node.output)
            names.append(f"^{re.escape(node.name)}$")
        elif not inputs or all(i in constant for i in inputs):
            constant.update(node.output)
    return names


def _cache_nodes(model: Any) -> list[str]:
    """Regexes for the nodes that write the present KV cache (Concat of past and new codes / scales / zero points):
    they move bytes and must keep their types (AutoCast mistakes the plugins' uint8 outputs for floats)."""
    import re

    return [f"^{re.escape(n.name)}$" for n in model.graph.node if any(o.startswith("present.") for o in n.output)]


def _unique_function_names(model: Any) -> list[str]:
    """AutoCast's graph tools drop ONNX function overloads (every Hadamard node would then run the first Hadamard
    body): give each (op, overload) its own name ``op__overload`` for the duration of AutoCast."""
    names = set()
    for node in model.graph.node:
        if node.domain == NAMESPACE and node.overload:
            node.op_type, node.overload = f"{node.op_type}{SEP}{node.overload}", ""
            names.add(node.op_type)
    for f in model.functions:
        if f.domain == NAMESPACE and f.overload:
            f.name, f.overload = f"{f.name}{SEP}{f.overload}", ""
    return sorted(names)


def _restore_function_names(model: Any) -> None:
    for node in model.graph.node:
        if node.domain == NAMESPACE and SEP in node.op_type:
            node.op_type, node.overload = node.op_type.split(SEP, 1)
    for f in model.functions:
        if f.domain == NAMESPACE and SEP in f.name:
            f.name, f.overload = f.name.split(SEP, 1)


def _calibration_inputs(onnx_path: Path, directory: Path, windows: int = 2, seq_len: int = 64) -> Path:
    """Real token windows (the default corpus' calibration split, the model's own tokenizer) as AutoCast's
    reference-run inputs: a prefill of ``seq_len`` tokens on an empty 4-bit cache, one .npz per window."""
    import numpy as np

    from infoquant_export.data.corpus import load_text, tokenize
    from infoquant_export.runtime.ort_decoder import OrtDecoder, read_onnx_metadata

    class _Meta:  # what OrtDecoder.tokenizer reads
        def __init__(self) -> None:
            self.path, self.meta = onnx_path, read_onnx_metadata(onnx_path)

    meta = _Meta()
    tokens = tokenize(OrtDecoder.tokenizer(meta), load_text("default", "calibration")[:20000]).numpy()  # type: ignore[arg-type]
    cfg, bits = meta.meta["model_config"], meta.meta["kv_cache"]["bits"]
    for w in range(windows):
        ids = tokens[w * seq_len:(w + 1) * seq_len][None, :].astype(np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                 "position_ids": np.arange(seq_len, dtype=np.int64)[None, :]}
        feeds.update(OrtDecoder.empty_cache(SimpleNamespace(  # type: ignore[arg-type]
            num_layers=cfg["num_layers"], kv_heads=cfg["num_kv_heads"], head_dim=cfg["head_dim"], kv_bits=bits), 1))
        np.savez(directory / f"window{w}.npz", **feeds)
    return directory


def _give_modelopt_our_tensorrt() -> None:
    """AutoCast asks TensorRT's parser (``import tensorrt``) for the custom nodes' output types and shapes. Hand it
    the TensorRT we use (TensorRT-RTX has the same API), with our plugins registered and the uint8 KV cache typed
    int8 as in our own builds (``export/trt_graph``)."""
    import modelopt.onnx.trt_utils as trt_utils

    from infoquant_export.trt import load_tensorrt, register_plugins

    trt_info = load_tensorrt()
    register_plugins(trt_info.flavour)
    trt_utils.trt = _TensorRTShim(trt_info.module)
    # AutoCast moves custom nodes to domain "trt.plugins" so that ONNX Runtime's TensorRT provider runs them; ONNX
    # Runtime runs ours on the CPU through their function bodies, which live in our domain: keep it.
    import modelopt.onnx.autocast.graphsanitizer as sanitizer

    sanitizer.set_trt_plugin_domain = lambda model, custom_ops: model


class _TensorRTShim:
    def __init__(self, trt: Any) -> None:
        self._trt = trt

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trt, name)

    def init_libnvinfer_plugins(self, *args: Any) -> bool:  # our plugins are registered already
        return True

    def OnnxParser(self, network: Any, log: Any) -> Any:  # noqa: N802 (TensorRT's name)
        return _ParserShim(self._trt.OnnxParser(network, log))


class _ParserShim:
    def __init__(self, parser: Any) -> None:
        self._parser = parser

    def __getattr__(self, name: str) -> Any:
        return getattr(self._parser, name)

    def parse_from_file(self, path: str) -> bool:
        import onnx

        return self.parse(onnx.load(path, load_external_data=False).SerializeToString(), path)

    def parse(self, data: bytes, path: str | None = None) -> bool:
        import onnx

        from infoquant_export.export.trt_graph import retype_uint8_as_int8

        model = onnx.load_from_string(data)
        _restore_function_names(model)  # our plugins' names
        del model.functions[:]
        retype_uint8_as_int8(model)
        blob = model.SerializeToString()
        return self._parser.parse(blob, path) if path else self._parser.parse(blob)
