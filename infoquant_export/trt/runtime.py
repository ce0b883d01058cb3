"""Run a TensorRT engine built by ``infoquant-export build`` (needs a GPU the TensorRT flavour supports).

:class:`TrtDecoder` has the call interface of ``runtime.ort_decoder.OrtDecoder`` (``empty_cache``, ``__call__``,
``tokenizer``, ``stop_ids``): logits come back as numpy, the 4-bit KV cache stays on the GPU as torch tensors
(codes and zero points int8 views of the uint8 bytes, ``export/trt_graph``). One execution context per optimization
profile (prefill, decode); the plugins are registered before deserializing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from infoquant_export.errors import UserError

TORCH_OF = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
            "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}


def read_sidecar(plan: Path) -> dict[str, Any]:
    side = plan.with_name(plan.name + ".json")
    if not plan.is_file():
        raise UserError(f"engine {plan} does not exist", "build it with infoquant-export MODEL.onnx --engine PLAN")
    if not side.is_file():
        raise UserError(f"engine {plan} has no sidecar {side.name}", "rebuild it with infoquant-export build")
    try:
        meta = json.loads(side.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"sidecar {side} is not valid JSON", "rebuild the engine with infoquant-export build") from err
    if meta.get("format") != "infoquant-export/trt-engine":
        raise UserError(f"{side} was not written by infoquant-export build", "rebuild the engine")
    return meta


class TrtDecoder:
    """An infoquant engine in TensorRT execution contexts (one per profile)."""

    def __init__(self, plan_path: str | Path, onnx_path: str | Path | None = None, flavour: str | None = None) -> None:
        import torch

        from infoquant_export.trt import load_tensorrt, logger, register_plugins

        self.plan_path = Path(plan_path)
        self.meta = read_sidecar(self.plan_path)
        self.onnx_path = Path(onnx_path) if onnx_path else self.plan_path.with_name(self.meta["onnx"]["path"])
        flavour = flavour or self.meta["tensorrt"]["flavour"]
        trt_info = load_tensorrt(flavour)
        if not torch.cuda.is_available():
            raise UserError(f"running {self.plan_path} needs a CUDA GPU ({trt_info.flavour} engines are built for "
                            f"{', '.join(self.meta['targets'])}); none is visible",
                            "run it on a machine with such a GPU, or use --backend ort with the .onnx file")
        register_plugins(trt_info.flavour)
        trt = self.trt = trt_info.module
        self.runtime = trt.Runtime(logger(trt_info))
        self.engine = self.runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self.engine is None:
            raise UserError(f"TensorRT could not deserialize {self.plan_path} on this GPU "
                            f"({torch.cuda.get_device_name()}; engine targets {', '.join(self.meta['targets'])})",
                            "rebuild the engine for this GPU (--sm) or with the TensorRT installed here")
        self.profiles = [p["name"] for p in self.meta["profiles"]]
        self.contexts = []
        self.stream = torch.cuda.Stream()
        for i in range(len(self.profiles)):
            ctx = self.engine.create_execution_context()
            ctx.set_optimization_profile_async(i, self.stream.cuda_stream)
            self.contexts.append(ctx)
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in self.names if n not in self.inputs]
        cfg = self.meta["model_config"]
        self.num_layers, self.kv_heads, self.head_dim = cfg["num_layers"], cfg["num_kv_heads"], cfg["head_dim"]
        self.kv_bits = self.meta["kv_cache"]["bits"]

    def _dtype(self, name: str) -> Any:
        import torch

        return getattr(torch, TORCH_OF[self.engine.get_tensor_dtype(name).name])

    def empty_cache(self, batch: int) -> dict[str, Any]:
        import torch

        cache = {}
        for name in self.inputs:
            if name.startswith("past."):
                shape = list(self.engine.get_tensor_shape(name))
                shape = [batch, shape[1], 0, shape[3]]
                cache[name] = torch.empty(shape, dtype=self._dtype(name), device="cuda")
        return cache

    def _profile(self, seq: int, past: int) -> int:
        for i, p in enumerate(self.meta["profiles"]):
            if p["seq"]["min"] <= seq <= p["seq"]["max"] and p["past"]["min"] <= past <= p["past"]["max"]:
                return i
        raise UserError(f"{seq} new tokens after {past} cached ones fit no profile of {self.plan_path}",
                        "rebuild with larger --max-seq / --max-context")

    def __call__(self, input_ids: np.ndarray, cache: dict[str, Any] | None = None
                 ) -> tuple[np.ndarray, dict[str, Any], dict[str, np.ndarray]]:
        import torch

        ids = torch.as_tensor(np.asarray(input_ids, dtype=np.int64), device="cuda")
        batch, seq = ids.shape
        cache = cache if cache is not None else self.empty_cache(batch)
        past = next(iter(cache.values())).shape[2] if cache else 0
        feeds = {"input_ids": ids, "attention_mask": torch.ones(batch, past + seq, dtype=torch.int64, device="cuda"),
                 "position_ids": torch.arange(past, past + seq, device="cuda").expand(batch, seq).contiguous(),
                 **cache}
        ctx = self.contexts[self._profile(seq, past)]
        for name in self.inputs:
            t = feeds[name].contiguous()
            feeds[name] = t
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr() if t.numel() else _dummy().data_ptr())
        outs = {}
        for name in self.outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            outs[name] = torch.empty(shape, dtype=self._dtype(name), device="cuda")
            ctx.set_tensor_address(name, outs[name].data_ptr() if outs[name].numel() else _dummy().data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream())
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of {self.plan_path} failed")
        self.stream.synchronize()
        present = {n.replace("present.", "past.", 1): v for n, v in outs.items() if n.startswith("present.")}
        extras = {n: v.cpu().numpy() for n, v in outs.items() if n != "logits" and not n.startswith("present.")}
        return outs["logits"].float().cpu().numpy(), present, extras

    def tokenizer(self) -> Any:
        from infoquant_export.runtime.ort_decoder import OrtDecoder

        return OrtDecoder.tokenizer(_MetaOnly(self.onnx_path))  # type: ignore[arg-type]

    def stop_ids(self, tokenizer: Any) -> set[int]:
        from infoquant_export.eval.generate import stop_ids

        return stop_ids(self.meta["model_config"].get("eos_token_id"), tokenizer)


class _MetaOnly:
    """The ONNX metadata reader's view needed by ``OrtDecoder.tokenizer``."""

    def __init__(self, onnx_path: Path) -> None:
        from infoquant_export.runtime.ort_decoder import read_onnx_metadata

        self.path = onnx_path
        self.meta = read_onnx_metadata(onnx_path)


_DUMMY: list[Any] = []


def _dummy() -> Any:
    import torch

    if not _DUMMY:
        _DUMMY.append(torch.empty(16, dtype=torch.uint8, device="cuda"))
    return _DUMMY[0]
