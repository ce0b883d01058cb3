"""``infoquant-export verify``: parity of a backend (ONNX Runtime) against the PyTorch fake-quant model.

Both run the same token windows of the evaluation split. Reported per output: max abs error, SQNR, cosine, top-1
agreement, KL(reference || backend), and the perplexity of each; with ``per_layer`` the residual stream after every
decoder layer is compared too and the first layer whose SQNR falls below ``layer_sqnr_db`` is named. Element-wise
tolerance checks use Polygraphy's comparator (``SimpleCompareFunc``) on every window.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from infoquant_export.artifact import load_artifact, read_manifest, require_exportable
from infoquant_export.data import corpus
from infoquant_export.errors import UserError
from infoquant_export.export.exporter import artifact_digest
from infoquant_export.fsutil import atomic_output_file
from infoquant_export.runtime.ort_decoder import OrtDecoder, read_onnx_metadata


@dataclass
class Thresholds:
    top1_agreement: float = 0.995  # fraction of tokens whose argmax agrees
    ppl_rel_diff: float = 0.005  # |ppl_backend - ppl_reference| / ppl_reference
    logits_sqnr_db: float = 40.0
    layer_sqnr_db: float = 40.0  # per-layer divergence threshold (reporting only)
    polygraphy_atol: float = 1e-3  # Polygraphy SimpleCompareFunc on logits, median error statistic
    polygraphy_rtol: float = 1e-3


class _Stats:
    """Running sums for SQNR / cosine / max error of one output over windows."""

    def __init__(self) -> None:
        self.signal = self.noise = self.dot = self.ref_sq = self.test_sq = 0.0
        self.max_abs = 0.0

    def add(self, ref: torch.Tensor, test: torch.Tensor) -> None:
        ref, test = ref.double(), test.double()
        diff = test - ref
        self.signal += float(ref.pow(2).sum())
        self.noise += float(diff.pow(2).sum())
        self.dot += float((ref * test).sum())
        self.ref_sq += float(ref.pow(2).sum())
        self.test_sq += float(test.pow(2).sum())
        self.max_abs = max(self.max_abs, float(diff.abs().max()))

    @property
    def sqnr_db(self) -> float:
        return math.inf if self.noise == 0 else 10 * math.log10(self.signal / self.noise)

    @property
    def cosine(self) -> float:
        return self.dot / math.sqrt(self.ref_sq * self.test_sq) if self.ref_sq and self.test_sq else 1.0


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def check_match(artifact_dir: str | Path, onnx_path: str | Path) -> dict[str, Any]:
    """UserError unless the ONNX file was exported from exactly this artifact."""
    meta = read_onnx_metadata(onnx_path)
    manifest = read_manifest(artifact_dir)
    require_exportable(manifest)
    if meta.get("artifact_sha256") != artifact_digest(manifest):
        raise UserError(f"{onnx_path} was not exported from {artifact_dir} (artifact digest differs)",
                        f"re-export: infoquant-export export {artifact_dir} --out {onnx_path}")
    return meta


def open_backend(onnx_path: str | Path, extra: tuple[str, ...], precision: str, engine: str | Path | None,
                 workdir: Path) -> tuple[Any, str]:
    """The backend under test and its label: ONNX Runtime on the exported file, on its AutoCast form
    (``precision`` fp16/bf16: what that TensorRT precision choice costs, measured on the CPU), or a TensorRT
    engine (needs a GPU TensorRT supports)."""
    if engine is not None:
        from infoquant_export.trt.runtime import TrtDecoder

        if extra:
            raise UserError("--per-layer compares ONNX Runtime's layer outputs; an engine exposes none",
                            "drop --per-layer with --engine")
        return TrtDecoder(engine, onnx_path), "tensorrt"
    if precision != "fp32":
        from infoquant_export.trt.precision import autocast_file

        path = autocast_file(Path(onnx_path), precision, workdir / f"autocast-{precision}.onnx")
        return OrtDecoder(path, extra_outputs=extra), f"onnxruntime-cpu (autocast {precision})"
    return OrtDecoder(onnx_path, extra_outputs=extra), "onnxruntime-cpu"


def verify(artifact_dir: str | Path, onnx_path: str | Path, source: str = "default", seq_len: int = 512,
           num_windows: int = 16, per_layer: bool = False, thresholds: Thresholds | None = None,
           plot: str | Path | None = None, progress: bool = True, precision: str = "fp32",
           engine: str | Path | None = None) -> dict[str, Any]:
    """Compare a backend (ONNX Runtime by default) against the fake-quant model; returns the report."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="infoquant-verify-") as tmp:
        return _verify(artifact_dir, onnx_path, source, seq_len, num_windows, per_layer, thresholds, plot, progress,
                       precision, engine, Path(tmp))


def _verify(artifact_dir: str | Path, onnx_path: str | Path, source: str, seq_len: int, num_windows: int,
            per_layer: bool, thresholds: Thresholds | None, plot: str | Path | None, progress: bool, precision: str,
            engine: str | Path | None, workdir: Path) -> dict[str, Any]:
    from polygraphy.comparator import IterationResult, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER
    from tqdm.auto import tqdm

    G_LOGGER.module_severity = G_LOGGER.WARNING  # the verdict is in the report, not per-window logs

    th = thresholds or Thresholds()
    check_match(artifact_dir, onnx_path)
    artifact = load_artifact(artifact_dir)
    model = artifact.model
    layers = range(model.cfg.num_layers)
    extra = tuple(f"layers.{i}.output" for i in layers) if per_layer else ()
    backend, label = open_backend(onnx_path, extra, precision, engine, workdir)
    tokens = corpus.tokenize(artifact.tokenizer, corpus.load_text(source, "evaluation"))
    windows = corpus.eval_windows(tokens, seq_len, num_windows)
    compare = SimpleCompareFunc(atol=th.polygraphy_atol, rtol=th.polygraphy_rtol, check_error_stat="median")

    logits_stats, layer_stats = _Stats(), [_Stats() for _ in layers]
    agree = total = 0
    nll_ref = nll_backend = kl_sum = 0.0
    polygraphy_passed = True
    captured: dict[int, torch.Tensor] = {}
    hooks = [layer.register_forward_hook(lambda _m, _i, out, k=k: captured.__setitem__(k, out[0]))
             for k, layer in enumerate(model.layers)] if per_layer else []
    try:
        for window in tqdm(windows, desc="verify", disable=not progress):
            ids = window[None]
            with torch.no_grad():
                ref, _ = model(ids)
            out, _, extras = backend(ids.numpy())
            test = torch.from_numpy(out)
            logits_stats.add(ref, test)
            for k in (range(len(layer_stats)) if per_layer else ()):
                layer_stats[k].add(captured[k], torch.from_numpy(extras[f"layers.{k}.output"]))
            agree += int((ref.argmax(-1) == test.argmax(-1)).sum())
            total += ref.shape[1]
            logp_ref, logp_test = F.log_softmax(ref.double(), -1), F.log_softmax(test.double(), -1)
            kl_sum += float((logp_ref.exp() * (logp_ref - logp_test)).sum())
            target = ids[0, 1:]
            nll_ref += float(F.nll_loss(logp_ref[0, :-1], target, reduction="sum"))
            nll_backend += float(F.nll_loss(logp_test[0, :-1], target, reduction="sum"))
            result = compare(IterationResult({"logits": ref.numpy()}, runner_name="torch-fake-quant"),
                             IterationResult({"logits": out}, runner_name=label))
            polygraphy_passed &= bool(all(bool(r) for r in result.values()))
    finally:
        for h in hooks:
            h.remove()

    predicted = len(windows) * (seq_len - 1)
    ppl_ref, ppl_backend = math.exp(nll_ref / predicted), math.exp(nll_backend / predicted)
    report: dict[str, Any] = {
        "artifact": str(artifact_dir), "onnx": str(onnx_path), "backend": label, "precision": precision,
        "corpus": corpus.corpus_name(source), "windows": len(windows), "seq_len": seq_len, "tokens": total,
        "top1_agreement": agree / total, "ppl_reference": ppl_ref, "ppl_backend": ppl_backend,
        "ppl_rel_diff": abs(ppl_backend - ppl_ref) / ppl_ref, "logits_sqnr_db": _json_float(logits_stats.sqnr_db),
        "logits_cosine": logits_stats.cosine, "logits_max_abs_error": logits_stats.max_abs,
        "kl_divergence": kl_sum / total, "polygraphy_passed": polygraphy_passed, "thresholds": asdict(th),
    }
    if per_layer:
        sqnrs = [s.sqnr_db for s in layer_stats]
        first = next((i for i, v in enumerate(sqnrs) if v < th.layer_sqnr_db), None)
        report["per_layer"] = [{"layer": i, "sqnr_db": _json_float(s.sqnr_db), "cosine": s.cosine,
                                "max_abs_error": s.max_abs} for i, s in enumerate(layer_stats)]
        report["first_divergent_layer"] = first
        if plot:
            plot_layers(sqnrs, th.layer_sqnr_db, Path(plot))
    report["passed"] = bool(report["top1_agreement"] >= th.top1_agreement and report["ppl_rel_diff"] <= th.ppl_rel_diff
                            and logits_stats.sqnr_db >= th.logits_sqnr_db and polygraphy_passed)
    return report


def plot_layers(sqnrs: list[float], threshold: float, out: Path) -> None:
    """PNG of per-layer SQNR (bit-exact layers drawn at the top of the axis)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise UserError("--plot needs matplotlib", 'pip install "infoquant-export[plot]"') from err
    finite = [v for v in sqnrs if math.isfinite(v)]
    cap = max([threshold + 20, *finite]) + 10
    values = [v if math.isfinite(v) else cap for v in sqnrs]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(range(len(values)), values, marker="o")
    ax.axhline(threshold, color="red", linestyle="--", label=f"threshold {threshold:g} dB")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("SQNR vs fake-quant (dB)")
    exact = len(finite) < len(sqnrs)
    ax.set_title("per-layer parity" + (f" (bit-exact layers drawn at {cap:.0f} dB)" if exact else ""))
    ax.legend()
    fig.tight_layout()
    with atomic_output_file(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
