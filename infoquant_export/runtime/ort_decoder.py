"""Run an exported decoder with ONNX Runtime (CPU): prefill, cached decode, tokenizer from the file's metadata."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from infoquant_export.errors import UserError
from infoquant_export.eval.generate import stop_ids, timed_greedy
from infoquant_export.export.exporter import META_PREFIX
from infoquant_export.export.model_graph import kv_names

OrtCache = dict[str, np.ndarray]


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The ``infoquant.*`` metadata of an exported file (graph only, no weights); UserError when not ours."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX file {path} does not exist", "pass a file written by `infoquant-export export`")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable ONNX file ({type(err).__name__})",
                        "re-export it with `infoquant-export export`") from err
    meta = {p.key[len(META_PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(META_PREFIX)}
    if meta.get("format") != "infoquant-export/onnx-decoder":
        raise UserError(f"{path} was not written by infoquant-export export (no infoquant metadata)",
                        "re-export it with `infoquant-export export`")
    return {k: v if k in ("format", "variant", "artifact_sha256", "producer_version") else json.loads(v)
            for k, v in meta.items()}


FOLD_MEMORY_FRACTION = 0.25


def linear_weight_count(cfg: dict[str, Any]) -> int:
    """Weights of the decoder's quantized linear layers (q, k, v, o, gate, up, down) from a model config."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    attn = cfg["num_heads"] * cfg["head_dim"]
    kv = cfg["num_kv_heads"] * cfg["head_dim"]
    return cfg["num_layers"] * (h * (2 * attn + 2 * kv) + 3 * h * i)


def _physical_memory() -> int:
    """Bytes of physical memory (0 where the OS does not say: nothing is folded then)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


class OrtDecoder:
    """An exported decoder in an ONNX Runtime session (CPU unless ``providers`` says otherwise).

    ``fold_weights``: ONNX Runtime folds each constant ``DequantizeLinear`` of an INT4 / INT8 weight (and the
    ``Transpose`` after it) into a float initializer once, at session creation, instead of dequantizing every
    weight on every call (its constant folding skips Q/DQ nodes unless ``session.disable_quant_qdq`` is set). Same
    float values, so the same outputs bit for bit; the session then holds the weights as float32 (4 bytes per
    weight instead of half a byte). ``None`` (default): fold when those float32 weights take at most
    ``FOLD_MEMORY_FRACTION`` of the machine's memory (the demo model: 0.4 GB, +0.9 GB resident measured; LLaMA-2-7B:
    26 GB, not folded on a 24 GB machine)."""

    def __init__(self, path: str | Path, threads: int | None = None, extra_outputs: tuple[str, ...] = (),
                 providers: list[Any] | None = None, fold_weights: bool | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.meta = read_onnx_metadata(self.path)
        if self.meta.get("variant") != "reference":
            raise UserError(f"{self.path} is the TensorRT variant (no function bodies); ONNX Runtime cannot run it",
                            "run the .onnx file written next to it")
        cfg, self.kv_bits = self.meta["model_config"], self.meta["kv_cache"]["bits"]
        self.num_layers, self.kv_heads, self.head_dim = cfg["num_layers"], cfg["num_kv_heads"], cfg["head_dim"]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        if fold_weights is None:
            fold_weights = 4 * linear_weight_count(cfg) <= FOLD_MEMORY_FRACTION * _physical_memory()
        self.fold_weights = fold_weights
        if fold_weights:
            options.add_session_config_entry("session.disable_quant_qdq", "1")
        if threads:
            options.intra_op_num_threads = threads
        model: Any = str(self.path)
        if extra_outputs:
            import onnx

            proto = onnx.load(str(self.path))
            for name in extra_outputs:
                proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
            model = proto.SerializeToString()
        try:
            self.session = ort.InferenceSession(model, options, providers=providers or ["CPUExecutionProvider"])
        except Exception as err:  # ORT raises its own exception types for malformed graphs
            raise UserError(f"ONNX Runtime cannot load {self.path}: {str(err).splitlines()[0][:200]}",
                            "re-export it with `infoquant-export export`") from err
        self.output_names = [o.name for o in self.session.get_outputs()]

    def empty_cache(self, batch: int) -> OrtCache:
        cache: OrtCache = {}
        for i in range(self.num_layers):
            for name in kv_names("past", i, self.kv_bits):
                if self.kv_bits >= 16:
                    cache[name] = np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)
                elif name.endswith("codes"):
                    width = self.head_dim // 2 if self.kv_bits == 4 else self.head_dim
                    cache[name] = np.zeros((batch, self.kv_heads, 0, width), np.uint8)
                else:
                    dtype = np.float32 if name.endswith("scale") else np.uint8
                    cache[name] = np.zeros((batch, self.kv_heads, 0, 1), dtype)
        return cache

    def __call__(self, input_ids: np.ndarray, cache: OrtCache | None = None
                 ) -> tuple[np.ndarray, OrtCache, dict[str, np.ndarray]]:
        """Logits [B, S, V], the present cache (as the next call's past) and any extra outputs."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        batch, seq = input_ids.shape
        cache = cache if cache is not None else self.empty_cache(batch)
        past = next(iter(cache.values())).shape[2]
        feeds = {"input_ids": input_ids, "attention_mask": np.ones((batch, past + seq), np.int64),
                 "position_ids": np.broadcast_to(np.arange(past, past + seq, dtype=np.int64), (batch, seq)).copy(),
                 **cache}
        outputs = dict(zip(self.output_names, self.session.run(self.output_names, feeds), strict=True))
        present = {name.replace("present.", "past.", 1): v for name, v in outputs.items()
                   if name.startswith("present.")}
        extras = {k: v for k, v in outputs.items() if k != "logits" and not k.startswith("present.")}
        return outputs["logits"], present, extras

    def tokenizer(self) -> Any:
        """The source model's tokenizer (with chat template), rebuilt from the embedded files."""
        files = self.meta.get("tokenizer") or {}
        if not files:
            raise UserError(f"{self.path} carries no tokenizer", "export from an artifact that has a tokenizer/")
        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory() as tmp:
            for name, text in files.items():
                (Path(tmp) / name).write_text(text, encoding="utf-8")
            return AutoTokenizer.from_pretrained(tmp)

    def stop_ids(self, tokenizer: Any) -> set[int]:
        return stop_ids(self.meta["model_config"].get("eos_token_id"), tokenizer)


def ort_greedy_generate(decoder: Any, input_ids: np.ndarray, max_new_tokens: int, stop: set[int],
                        timing: dict[str, Any] | None = None) -> list[int]:
    """Prefill once, then one token per step from the 4-bit KV cache (the loop of ``eval.generate``); any decoder
    with OrtDecoder's call interface (``trt.runtime.TrtDecoder`` too). ``timing``: see ``timed_greedy`` (the calls
    return host arrays, so they are synchronous)."""
    return timed_greedy(lambda: decoder(input_ids)[:2], lambda t, c: decoder(np.array([[t]], np.int64), c)[:2],
                        int(input_ids.shape[1]), max_new_tokens, stop, timing)
