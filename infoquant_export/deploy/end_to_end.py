"""``infoquant-export pipeline``: quantize -> perplexity (FP vs quantized) -> export -> verify -> TensorRT engine
(when TensorRT is importable) -> Triton repository, into one output directory, with a summary.

    OUT/artifact/          quantized artifact (quantize)
    OUT/onnx/model.onnx    exported graph (+ model.trt.onnx, the function-free variant for TensorRT < 10.7)
    OUT/verify.json        ORT parity report
    OUT/engine/model_smXY.plan   TensorRT engine(s), when built
    OUT/triton/            Triton model repository
    OUT/summary.json       what the command printed, as JSON
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infoquant_export.config import QuantConfig
from infoquant_export.errors import UserError
from infoquant_export.fsutil import atomic_output_dir


@dataclass
class PipelineOptions:
    model: str = "demo"
    rotation: str = "hadamard"
    weights: str = "gptq"
    device: str = "cpu"
    eval_windows: int | None = 80          # as BENCHMARKS.md (40,880 predicted tokens); None: the whole split
    verify_windows: int = 16
    seq_len: int = 512
    engine_sm: list[int] = field(default_factory=lambda: [89])
    progress: bool = True


def _stage(name: str, progress: bool) -> float:
    _stop_if_terminated()
    if progress:
        print(f"[pipeline] {name} ...", file=sys.stderr, flush=True)
    return time.perf_counter()


def build_engine(onnx_path: Path, engine_dir: Path, sms: list[int]) -> dict[str, Any]:
    """TensorRT engine via ``infoquant_export.trt.build`` when TensorRT is importable; else a skip note."""
    from infoquant_export.trt import load_tensorrt, trt_available

    if not trt_available():
        return {"status": "skipped", "note": "TensorRT not importable; pip install -e '.[trt-rtx]' (builds on a CPU) "
                "or TensorRT >= 10.7, then infoquant-export build + triton-repo --plan smXY=PLAN"}
    from infoquant_export.trt.build import build_engine as trt_build

    try:
        flavour = load_tensorrt().flavour
    except UserError as err:
        return {"status": "skipped", "note": str(err)}
    if flavour == "tensorrt":  # data-centre TensorRT builds for the GPU it runs on
        import torch

        if not torch.cuda.is_available():
            return {"status": "skipped", "note": "tensorrt needs a GPU to build; TensorRT-RTX builds on a CPU"}
        major, minor = torch.cuda.get_device_capability()
        targets: list[tuple[int, list[int] | None]] = [(major * 10 + minor, None)]
    else:
        targets = [(sm, [sm]) for sm in sms]
    engine_dir.mkdir()
    plans = {}
    for sm, sm_arg in targets:
        plan = engine_dir / f"model_sm{sm}.plan"
        try:
            trt_build(onnx_path, plan, sm=sm_arg)
        except Exception as err:  # a failed build is reported, the rest of the pipeline still runs
            return {"status": "failed", "note": f"sm{sm}: {type(err).__name__}: {str(err).splitlines()[0][:200]}"}
        plans[f"sm{sm}"] = plan
    return {"status": "built", "plans": plans}


_TERMINATED: list[bool] = []  # set by the SIGTERM handler


def _stop_if_terminated() -> None:
    """Re-raise a SIGTERM at a stage boundary: the handler's KeyboardInterrupt lands wherever Python was, and a
    library that catches BaseException there would swallow it (seen once: the pipeline finished with exit 0)."""
    if _TERMINATED:
        raise KeyboardInterrupt


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the temporary output is removed (the run is long; batch systems stop jobs
    with SIGTERM); it is also remembered and re-raised at the next stage boundary and before the output is
    committed."""
    _TERMINATED.clear()

    def handler(signum: int, frame: Any) -> None:
        _TERMINATED.append(True)
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_pipeline(out: str | Path, opts: PipelineOptions) -> dict[str, Any]:
    with _terminate_as_interrupt():
        return _run(Path(out), opts)


def _run(out: Path, opts: PipelineOptions) -> dict[str, Any]:
    from infoquant_export.deploy.triton_repo import RepoOptions, build_repository
    from infoquant_export.export.exporter import export_onnx
    from infoquant_export.models.loading import load_model
    from infoquant_export.pipeline import evaluate, load_for_eval, quantize_to_dir
    from infoquant_export.verify import verify

    out = Path(out)
    if out.exists():
        raise UserError(f"output directory {out} already exists", "choose a new --out path or remove it first")
    if opts.verify_windows < 1 or (opts.eval_windows is not None and opts.eval_windows < 1):
        raise UserError("window counts must be positive", "use --eval-windows / --verify-windows >= 1")
    if opts.model != "demo" and not Path(opts.model).exists():
        raise UserError(f"model {opts.model} does not exist", "pass --model demo, a .gguf file or a HF directory")
    cfg = QuantConfig(rotation=opts.rotation, weights=opts.weights).validate()
    seconds: dict[str, float] = {}
    start_all = time.perf_counter()
    with atomic_output_dir(out) as tmp:
        t = _stage("quantize", opts.progress)
        quant = quantize_to_dir(opts.model, cfg, tmp / "artifact", opts.device, progress=opts.progress)
        seconds["quantize"] = time.perf_counter() - t

        t = _stage("perplexity FP vs W4A4KV4", opts.progress)
        ppl = {}
        loaded = load_model(opts.model)  # not load_for_eval: a HF directory also looks like an artifact there
        ppl["fp"] = evaluate(loaded.model.to(opts.device), loaded.tokenizer, "default", opts.seq_len,
                             opts.eval_windows, progress=opts.progress)
        del loaded
        model, tokenizer, _ = load_for_eval(str(tmp / "artifact"), opts.device)
        ppl["quantized"] = evaluate(model, tokenizer, "default", opts.seq_len, opts.eval_windows,
                                    progress=opts.progress)
        del model
        seconds["eval"] = time.perf_counter() - t

        t = _stage("export ONNX", opts.progress)
        (tmp / "onnx").mkdir()
        exported = export_onnx(tmp / "artifact", tmp / "onnx" / "model.onnx", target="trt")
        seconds["export"] = time.perf_counter() - t

        t = _stage("verify ONNX Runtime parity", opts.progress)
        report = verify(tmp / "artifact", exported.onnx_path, "default", opts.seq_len, opts.verify_windows,
                        progress=opts.progress)
        (tmp / "verify.json").write_text(json.dumps(report, indent=2))
        seconds["verify"] = time.perf_counter() - t

        t = _stage("TensorRT engine", opts.progress)
        engine = build_engine(exported.onnx_path, tmp / "engine", opts.engine_sm)
        seconds["engine"] = time.perf_counter() - t

        t = _stage("Triton repository", opts.progress)
        build_repository(exported.onnx_path, tmp / "triton", RepoOptions(plans=engine.get("plans", {})))
        seconds["triton_repo"] = time.perf_counter() - t

        summary = {
            "model": quant.get("model") or opts.model, "config": quant["config"],
            "perplexity": {"fp": round(ppl["fp"]["ppl"], 3), "w4a4kv4": round(ppl["quantized"]["ppl"], 3),
                           "corpus": ppl["fp"]["corpus"], "windows": ppl["fp"]["windows"], "seq_len": opts.seq_len},
            "ort_parity": {"passed": report["passed"], "top1_agreement": report["top1_agreement"],
                           "ppl_torch": report["ppl_reference"], "ppl_ort": report["ppl_backend"],
                           "logits_sqnr_db": report["logits_sqnr_db"], "tokens": report["tokens"]},
            "engine": {k: v for k, v in engine.items() if k != "plans"},
            "artifacts": {"artifact": str(out / "artifact"), "onnx": str(out / "onnx" / "model.onnx"),
                          "trt_onnx": str(out / "onnx" / "model.trt.onnx"), "verify_report": str(out / "verify.json"),
                          "engine": [str(out / "engine" / p.name) for p in engine.get("plans", {}).values()] or None,
                          "triton_repository": str(out / "triton")},
            "seconds": {k: round(v, 1) for k, v in seconds.items()},
        }
        summary["seconds"]["total"] = round(time.perf_counter() - start_all, 1)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        _stop_if_terminated()  # before atomic_output_dir renames the result into place
    return summary


def _db(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def format_summary(s: dict[str, Any]) -> str:
    """The short table the command prints."""
    p, v, e, a = s["perplexity"], s["ort_parity"], s["engine"], s["artifacts"]
    rows = [
        ("model", f"{s['model']} ({s['config']})"),
        ("perplexity FP", f"{p['fp']:.3f} ({p['corpus']}, {p['windows']} x {p['seq_len']} tokens)"),
        ("perplexity W4A4KV4", f"{p['w4a4kv4']:.3f}"),
        ("ORT parity", f"{'PASSED' if v['passed'] else 'FAILED'}: top-1 {v['top1_agreement']:.4%}, ppl torch "
                       f"{v['ppl_torch']:.4f} vs ort {v['ppl_ort']:.4f}, logits SQNR {_db(v['logits_sqnr_db'])} dB"),
        ("TensorRT engine", e["status"] + (f" ({e['note']})" if e.get("note") else "")),
        ("artifact", a["artifact"]), ("ONNX", a["onnx"]), ("ONNX (TensorRT < 10.7)", a["trt_onnx"]),
        ("verify report", a["verify_report"]), ("engine", ", ".join(a["engine"]) if a["engine"] else "-"),
        ("Triton repository", a["triton_repository"]),
        ("wall time", f"{s['seconds']['total']:.0f} s (" + ", ".join(
            f"{k} {v:.0f}" for k, v in s["seconds"].items() if k != "total") + ")"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
