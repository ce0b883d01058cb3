"""PSOT report: activation statistics (range, code entropy, MSE), JSON/PNG writing and the summary."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from infoquant_export.psot import report as rep
from infoquant_export.psot.report import activation_stats, build_layer_entry, summarize, write_report
from infoquant_export.quant.primitives import fake_quantize_activation
from infoquant_export.transforms.hadamard import hadamard_matrix


def _outliers(tokens: int = 256, dim: int = 512) -> torch.Tensor:
    """Gaussian rows with one planted outlier of 100 per row (the massive-activation pattern PSOT removes)."""
    x = torch.randn(tokens, dim)
    x[torch.arange(tokens), torch.randint(0, dim, (tokens,))] = 100.0
    return x


def _orthogonal(kind: str, n: int) -> torch.Tensor:
    if kind == "hadamard":
        return hadamard_matrix(n)
    return torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))[0]


def test_uniform_spread_uses_the_whole_grid() -> None:
    s = activation_stats(torch.rand(256, 512) * 2 - 1, bits=4)
    assert s["code_entropy_bits"] > 3.9  # measured 3.976 (end codes 0 and 15 get half-width bins: max 3.973 + noise)
    assert s["levels_used"] == 16  # measured 16.0
    assert s["range_mean"] == pytest.approx(2.0, abs=0.02)  # measured 1.993


def test_outlier_collapses_entropy() -> None:
    s = activation_stats(_outliers(), bits=4)
    assert s["code_entropy_bits"] < 1.0  # measured 0.54: the Gaussian bulk sits in 2 of the 16 codes
    assert s["levels_used"] < 3.0  # measured 2.27
    assert s["kurtosis"] > 100  # measured 462
    assert s["absmax"] == 100.0


@pytest.mark.parametrize("kind", ["random", "hadamard"])
def test_rotation_raises_entropy_and_lowers_relative_mse(kind: str) -> None:
    x = _outliers()
    before = activation_stats(x)
    after = activation_stats((x.double() @ _orthogonal(kind, 512)).float())
    # rotation preserves sum x^2, so relative MSE = MSE / signal power and SQNR compare directly
    assert after["code_entropy_bits"] > 3.0  # measured 3.42 random, 3.31 hadamard (before 0.54)
    assert after["levels_used"] > 12  # measured 15.6 random, 13.6 hadamard (before 2.27)
    assert after["mse"] < 0.4 * before["mse"]  # measured 0.28 random, 0.078 hadamard (before 1.01)
    assert after["sqnr_db"] > before["sqnr_db"] + 5  # measured 18.7 random, 24.2 hadamard (before 13.1)
    assert after["range_mean"] < 0.3 * before["range_mean"]  # measured 27.4 random, 14.5 hadamard (before 103)


@pytest.mark.parametrize(("bits", "clip", "group_size"), [(4, 1.0, None), (4, 0.9, 64), (8, 1.0, None), (3, 0.8, 32)])
def test_mse_and_sqnr_match_fake_quantize(bits: int, clip: float, group_size: int | None) -> None:
    x = _outliers(64, 256)
    s = activation_stats(x, bits, clip, group_size)
    err = (fake_quantize_activation(x, bits, clip, group_size).double() - x.double()).pow(2)
    assert s["mse"] == pytest.approx(float(err.mean()), rel=1e-12)
    assert s["sqnr_db"] == pytest.approx(10 * math.log10(float(x.double().pow(2).sum() / err.sum())), rel=1e-12)
    assert 0 < s["code_entropy_bits"] <= bits


def test_group_size_is_per_head_range() -> None:
    x = torch.randn(64, 128)
    x[:, :64] *= 10  # head 0 is 10x wider than head 1
    per_head, per_token = activation_stats(x, group_size=64), activation_stats(x)
    assert per_head["range_mean"] < 0.6 * per_token["range_mean"]  # measured 25.9 vs 47.2
    assert per_head["mse"] < per_token["mse"]  # measured 0.41 vs 0.74
    with pytest.raises(ValueError, match="multiple"):
        activation_stats(x, group_size=48)


def test_zero_activation_is_finite_or_none_in_json(tmp_path: Path) -> None:
    s = activation_stats(torch.zeros(4, 8))
    assert s["code_entropy_bits"] == 0.0 and s["levels_used"] == 1.0 and s["mse"] == 0.0
    assert math.isnan(s["sqnr_db"]) and math.isnan(s["kurtosis"])
    write_report({"model": "z", "bits": 4, "layers": [{"layer": 0, "activations": {"v": {"before": s}}}]},
                 tmp_path / "r.json", None)
    loaded = json.loads((tmp_path / "r.json").read_text())
    assert loaded["layers"][0]["activations"]["v"]["before"]["sqnr_db"] is None


def _report(n_layers: int = 3) -> dict:
    layers = []
    for i in range(n_layers):
        acts = {"attn_input": _outliers(32, 64), "v": torch.randn(32, 64)}
        q = _orthogonal("hadamard", 64).float()
        entry = build_layer_entry(i, acts, {k: v @ q for k, v in acts.items()},
                                  {"residual": [10.0, 6.0, 5.0 - i], "v": [torch.tensor(3.0).item(), 2.0]},
                                  extras={"steps": 2, "final_cost": float("inf")}, group_sizes={"v": 16})
        layers.append(entry)
    return {"model": "tiny", "bits": 4, "basis_before": "unrotated", "layers": layers, "path": Path("/m")}


def test_build_layer_entry_shape_and_checks() -> None:
    e = _report(1)["layers"][0]
    assert e["layer"] == 0 and e["steps"] == 2 and set(e["cost_curves"]) == {"residual", "v"}
    assert set(e["activations"]) == {"attn_input", "v"}
    assert set(e["activations"]["v"]["after"]) == set(rep.STATS)
    x = {"v": torch.randn(4, 8)}
    with pytest.raises(ValueError, match="differ"):
        build_layer_entry(0, x, {"o_input": x["v"]}, {})
    with pytest.raises(ValueError, match="override"):
        build_layer_entry(0, x, x, {}, extras={"layer": 3})


def test_write_report_json_png_and_summary(tmp_path: Path) -> None:
    report = _report()
    write_report(report, tmp_path / "psot.json", tmp_path / "psot.png")
    loaded = json.loads((tmp_path / "psot.json").read_text())
    assert loaded["path"] == "/m" and loaded["layers"][1]["final_cost"] is None
    assert loaded["layers"][2]["cost_curves"]["residual"] == [10.0, 6.0, 3.0]
    png = (tmp_path / "psot.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["psot.json", "psot.png"]

    summary = summarize(loaded)  # works on the JSON round trip (None for non-finite values) as on the dict
    assert set(summary) == {"attn_input", "v"}
    for name in ("attn_input", "v"):
        for when in ("before", "after"):
            for stat in rep.STATS:
                vals = [e["activations"][name][when][stat] for e in report["layers"]]
                assert summary[name][when][stat] == pytest.approx(sum(vals) / len(vals), rel=1e-12)
    # attn_input: Hadamard spreads the planted outlier
    assert summary["attn_input"]["after"]["code_entropy_bits"] > summary["attn_input"]["before"]["code_entropy_bits"]


def test_summary_ignores_non_finite() -> None:
    layers = [{"layer": i, "activations": {"v": {"after": {"sqnr_db": v}}}} for i, v in enumerate([10.0, None, 20.0])]
    layers.append({"layer": 3, "activations": {"v": {"after": {"sqnr_db": math.inf}}}})
    assert summarize({"layers": layers}) == {"v": {"after": {"sqnr_db": 15.0}}}


def test_failed_write_leaves_no_partial_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "psot.json").write_text("old\n")

    def boom(*args: object, **kwargs: object) -> str:
        raise RuntimeError("disk full")

    monkeypatch.setattr(rep.json, "dumps", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_report(_report(1), tmp_path / "psot.json", tmp_path / "psot.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["psot.json"]
    assert (tmp_path / "psot.json").read_text() == "old\n"  # the previous report is intact
    monkeypatch.undo()

    from matplotlib.figure import Figure

    def half_png(self: Figure, fname: Path, **kwargs: object) -> None:
        Path(fname).write_bytes(b"\x89PNG partial")
        raise OSError("interrupted")

    monkeypatch.setattr(Figure, "savefig", half_png)
    with pytest.raises(OSError, match="interrupted"):
        write_report(_report(1), tmp_path / "new.json", tmp_path / "new.png")
    assert not (tmp_path / "new.png").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_missing_matplotlib_skips_png_with_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.warns(UserWarning, match="matplotlib"):
        write_report(_report(1), tmp_path / "r.json", tmp_path / "r.png")
    assert (tmp_path / "r.json").exists() and not (tmp_path / "r.png").exists()
