"""The LLM behind the Triton Python backend (decoupled): chat template, greedy decoding, streamed text.

Inputs follow Triton's generate extension: ``text_input`` (the user message), optional ``max_tokens`` and
``stream``; outputs ``text_output`` (the reply, or one piece per token when streaming) and ``output_ids`` (the
generated token ids). The decoder is ONNX Runtime running the exported W4A4KV4 graph with its 4-bit KV cache, or
the TensorRT engine (``infoquant_export.trt.runtime.TrtDecoder``) when a plan for this GPU is in the repository.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("infoquant_export.triton")


def supported_plan(plans_dir: Path) -> Path | None:
    """The plan built for this GPU's compute capability (``model_sm<cc>.plan``), or None (no GPU, no plan)."""
    if not plans_dir.is_dir():
        return None
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    plan = plans_dir / f"model_sm{major}{minor}.plan"
    return plan if plan.is_file() else None


def load_decoder(engine: str, version_dir: Path, gpu: int | None, threads: int | None) -> tuple[Any, str]:
    """``engine``: auto | ort | trt; ``gpu``: the instance's device id (None on a CPU instance). Returns the decoder
    and a label."""
    onnx_path = version_dir / "model.onnx"
    plan = supported_plan(version_dir / "plans") if engine in ("auto", "trt") else None
    if engine == "trt" and plan is None:
        raise RuntimeError(f"engine trt selected but {version_dir / 'plans'} has no plan for this GPU (or no GPU)")
    if plan is not None:
        try:
            from infoquant_export.trt.runtime import TrtDecoder
        except ImportError as err:
            if engine == "trt":
                raise RuntimeError("engine trt selected but infoquant_export.trt.runtime is not available "
                                   f"({err}); install infoquant-export[trt] or set engine ort") from err
            log.warning("TensorRT plan %s present but the TensorRT runtime is not importable (%s); using ORT",
                        plan, err)
        else:
            return TrtDecoder(str(plan), str(onnx_path)), f"trt:{plan.name}"
    from infoquant_export.runtime.ort_decoder import OrtDecoder

    providers: list[Any] = ["CPUExecutionProvider"]
    if gpu is not None:
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers = [("CUDAExecutionProvider", {"device_id": gpu}), "CPUExecutionProvider"]
    label = "ort:CUDA" if len(providers) > 1 else "ort:CPU"
    return OrtDecoder(onnx_path, threads=threads, providers=providers), label


class RequestError(ValueError):
    """A malformed request: answered with an error response, the server keeps serving."""


class LlmModel:
    """``initialize``/``execute``/``finalize`` of the decoupled Python-backend model."""

    def __init__(self, args: dict[str, Any], pb_utils: Any) -> None:
        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        threads = int(params.get("ort_threads", "0")) or None
        gpu = int(args.get("model_instance_device_id", 0)) if args.get("model_instance_kind") == "GPU" else None
        self.decoder, self.engine = load_decoder(params.get("engine", "auto"), version_dir, gpu, threads)
        self.tokenizer = self.decoder.tokenizer()
        self.stop = self.decoder.stop_ids(self.tokenizer)
        self.max_context = int(params["max_context"])
        self.default_max_tokens = int(params.get("default_max_tokens", "64"))
        log.info("infoquant LLM ready: engine %s, context %d", self.engine, self.max_context)

    # ----------------------------------------------------------------------------------------- request parsing
    def _input(self, request: Any, name: str) -> np.ndarray | None:
        tensor = self.pb.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy().reshape(-1)

    def parse(self, request: Any) -> tuple[np.ndarray, int, bool]:
        """Prompt ids [1, S] (chat template), the token budget and the stream flag; RequestError when malformed."""
        from infoquant_export.eval.generate import chat_prompt_ids

        text = self._input(request, "text_input")
        if text is None or text.size != 1:
            raise RequestError("text_input must hold exactly one string (one prompt per request)")
        raw = text[0]
        prompt = raw.decode("utf-8", errors="strict") if isinstance(raw, bytes) else str(raw)
        if not prompt.strip():
            raise RequestError("text_input is empty; send a non-empty prompt")
        max_tokens = self._input(request, "max_tokens")
        budget = self.default_max_tokens if max_tokens is None or max_tokens.size == 0 else int(max_tokens[0])
        if budget < 1:
            raise RequestError(f"max_tokens must be >= 1, not {budget}")
        stream = self._input(request, "stream")
        ids = chat_prompt_ids(self.tokenizer, prompt).numpy()
        if ids.shape[1] >= self.max_context:
            raise RequestError(f"the prompt has {ids.shape[1]} tokens, the context is {self.max_context}; "
                               "send a shorter prompt")
        return ids, min(budget, self.max_context - ids.shape[1]), bool(stream is not None and stream.size
                                                                        and stream[0])

    # -------------------------------------------------------------------------------------------- generation
    def tokens(self, ids: np.ndarray, budget: int) -> Iterator[tuple[int, bool]]:
        """Greedy tokens with a flag on the last one (same steps as ``eval.generate.greedy_loop``)."""
        logits, cache, _ = self.decoder(ids, self.decoder.empty_cache(ids.shape[0]))
        for step in range(budget):
            token = int(logits[0, -1].argmax())
            last = token in self.stop or step == budget - 1
            yield token, last
            if last:
                return
            logits, cache, _ = self.decoder(np.array([[token]], np.int64), cache)

    def _response(self, text: str, ids: list[int]) -> Any:
        return self.pb.InferenceResponse(output_tensors=[
            self.pb.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
            self.pb.Tensor("output_ids", np.array(ids, dtype=np.int64))])

    def serve(self, request: Any) -> None:
        sender = request.get_response_sender()
        final = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            ids, budget, stream = self.parse(request)
            generated: list[int] = []
            sent, pending = "", []
            for token, last in self.tokens(ids, budget):
                generated.append(token)
                if not stream:
                    continue
                pending.append(token)
                text = self.tokenizer.decode(generated, skip_special_tokens=True)
                if text.endswith("\ufffd") and not last:  # an incomplete UTF-8 character: wait for the rest
                    continue
                sender.send(self._response(text[len(sent):], pending), flags=final if last else 0)
                sent, pending = text, []
            if not stream:
                text = self.tokenizer.decode(generated, skip_special_tokens=True)
                sender.send(self._response(text, generated), flags=final)
        except RequestError as err:
            sender.send(self.pb.InferenceResponse(error=self.pb.TritonError(str(err))), flags=final)
        except Exception as err:  # never leave a request without its final response
            log.exception("generation failed")
            sender.send(self.pb.InferenceResponse(error=self.pb.TritonError(f"generation failed: {err}")),
                        flags=final)

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            self.serve(request)
        return None

    def finalize(self) -> None:
        self.decoder = None
