"""Per-layer PSOT report: what the learned rotations did to each activation's range, code entropy and 4-bit MSE.

Written by ``infoquant-export quantize --rotation psot`` as JSON (plain floats; inf/nan -> null) and a PNG.
Quantizer-friendly activations have a small range and enough spread inside it: a high entropy of their b-bit codes
(max ``bits``) and a low quantization MSE.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch

from infoquant_export.fsutil import atomic_output_file
from infoquant_export.quant.primitives import activation_qparams, fake_quantize_activation, quantize_activation

STATS = ("range_mean", "absmax", "kurtosis", "code_entropy_bits", "levels_used", "mse", "sqnr_db")


def activation_stats(x: torch.Tensor, bits: int = 4, clip: float = 1.0,
                     group_size: int | None = None) -> dict[str, float]:
    """Range, absmax, kurtosis, code entropy, levels used, MSE and SQNR of per-token (per-group) b-bit ``x`` [T, D]."""
    if not 1 <= bits <= 8:
        raise ValueError(f"activation_stats supports 1..8 bits, got {bits}")
    if group_size is not None and x.shape[-1] % group_size:
        raise ValueError(f"last dim {x.shape[-1]} is not a multiple of group_size {group_size}")
    xf = x.detach().float().reshape(-1, x.shape[-1])
    rows = xf if group_size is None else xf.reshape(-1, group_size)  # one quantization row per token (or head)
    scale, zero_point = activation_qparams(rows, bits, clip)
    codes = quantize_activation(rows, scale, zero_point, bits).long()
    n_codes = 1 << bits
    p = torch.bincount(codes.flatten(), minlength=n_codes).double() / codes.numel()
    p = p[p > 0]
    per_row = torch.zeros(codes.shape[0], n_codes, dtype=torch.int64).scatter_add_(1, codes, torch.ones_like(codes))
    xd = xf.double()
    centred = xd - xd.mean(dim=-1, keepdim=True)
    var = centred.pow(2).mean(dim=-1)
    err = fake_quantize_activation(x.detach(), bits, clip, group_size).double().reshape(xd.shape) - xd
    signal, noise = float(xd.pow(2).sum()), float(err.pow(2).sum())
    sqnr = 10 * math.log10(signal / noise) if noise > 0 else (math.inf if signal > 0 else math.nan)
    return {
        "range_mean": float((rows.amax(dim=-1) - rows.amin(dim=-1)).double().mean()),
        "absmax": float(xf.abs().max()),
        "kurtosis": float((centred.pow(4).mean(dim=-1) / var.pow(2)).mean()),  # nan for a constant row
        "code_entropy_bits": abs(float((p * p.log2()).sum())),
        "levels_used": float((per_row > 0).sum(dim=-1).double().mean()),
        "mse": float(err.pow(2).mean()),
        "sqnr_db": sqnr,
    }


def build_layer_entry(layer: int, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor],
                      cost_curves: dict[str, list[float]], extras: dict[str, Any] | None = None,
                      bits: int = 4, group_sizes: dict[str, int | None] | None = None) -> dict[str, Any]:
    """``{"layer", "activations": {name: {"before": stats, "after": stats}}, "cost_curves", **extras}``."""
    if set(before) != set(after):
        raise ValueError(f"before/after activation names differ: {sorted(before)} vs {sorted(after)}")
    extras = extras or {}
    if clash := {"layer", "activations", "cost_curves"} & set(extras):
        raise ValueError(f"extras may not override {sorted(clash)}")
    gs = group_sizes or {}
    acts = {name: {"before": activation_stats(before[name], bits, group_size=gs.get(name)),
                   "after": activation_stats(after[name], bits, group_size=gs.get(name))} for name in before}
    curves = {stage: [float(c) for c in curve] for stage, curve in cost_curves.items()}
    return {"layer": int(layer), "activations": acts, "cost_curves": curves, **extras}


def _plain(obj: Any) -> Any:
    """JSON-plain copy: tensors/tuples -> lists, non-finite floats -> None, Paths -> str."""
    if isinstance(obj, torch.Tensor):
        obj = obj.tolist()
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


def _plot(report: dict[str, Any], png_path: Path) -> None:
    try:
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn(f"matplotlib is not installed: skipping {png_path}", stacklevel=3)
        return
    layers = report["layers"]
    xs = [e["layer"] for e in layers]
    names = list(dict.fromkeys(n for e in layers for n in e["activations"]))
    stages = list(dict.fromkeys(s for e in layers for s in e["cost_curves"]))
    panels = [("entropy", n) for n in names] + [("mse", None), ("range_mean", None)] + [("cost", s) for s in stages]
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig = Figure(figsize=(5 * ncols, 3.5 * nrows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    colors = {n: f"C{i}" for i, n in enumerate(names)}
    lnorm = Normalize(min(xs, default=0), max(max(xs, default=0), min(xs, default=0) + 1))

    def series(name: str, when: str, stat: str) -> list[float]:
        return [_num(e["activations"].get(name, {}).get(when, {}).get(stat)) for e in layers]

    for ax, (kind, key) in zip(axes, panels, strict=False):
        if kind == "cost":
            for x, e in zip(xs, layers, strict=True):
                curve = [_num(c) for c in e["cost_curves"].get(key, [])]
                if curve:
                    norm = curve[0] if math.isfinite(curve[0]) and curve[0] != 0 else 1.0
                    ax.plot([c / norm for c in curve], color=colormaps["viridis"](lnorm(x)), lw=1)
            fig.colorbar(ScalarMappable(lnorm, "viridis"), ax=ax, label="layer")
            ax.set(title=f"PSOT cost: {key}", xlabel="epoch (0 = initial)", ylabel="cost / initial cost")
            continue
        for name in [key] if kind == "entropy" else names:
            stat = "code_entropy_bits" if kind == "entropy" else kind
            c = colors[name]
            ax.plot(xs, series(name, "before", stat), "--o", color=c, ms=3, label=f"{name} before")
            ax.plot(xs, series(name, "after", stat), "-o", color=c, ms=3, label=f"{name} after")
        if kind == "entropy":
            bits = report.get("bits", 4)
            ax.set(title=f"{key}: {bits}-bit code entropy", ylabel="bits", ylim=(0, bits + 0.1))
        elif kind == "mse":
            ax.set(title="quantization MSE", yscale="log")
        else:
            ax.set(title="mean per-token range (max - min)")
        ax.set_xlabel("layer")
        ax.legend(fontsize=6)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"PSOT report: {report.get('model', '')} (before = {report.get('basis_before', '?')})")
    fig.tight_layout()
    with atomic_output_file(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def write_report(report: dict[str, Any], json_path: Path, png_path: Path | None) -> None:
    """Atomically write the report as plain JSON and, when ``png_path`` is given, as a PNG (needs matplotlib)."""
    with atomic_output_file(json_path) as tmp:
        tmp.write_text(json.dumps(_plain(report), indent=2, allow_nan=False) + "\n")
    if png_path is not None:
        _plot(report, Path(png_path))


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """``{name: {"before": {stat: mean}, "after": {...}}}``: means over layers, ignoring non-finite values."""
    out: dict[str, Any] = {}
    for entry in report["layers"]:
        for name, whens in entry["activations"].items():
            for when, stats in whens.items():
                acc = out.setdefault(name, {}).setdefault(when, {})
                for stat, v in stats.items():
                    acc.setdefault(stat, []).extend([float(v)] if v is not None and math.isfinite(v) else [])
    return {n: {w: {s: (sum(v) / len(v) if v else None) for s, v in st.items()} for w, st in ws.items()}
            for n, ws in out.items()}
