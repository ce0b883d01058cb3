"""tools/bench_kernels.py keeps running: its --smoke mode (tiny shapes, interpreter) prints the JSON it promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[2]


def _smoke(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``tools/bench_kernels.py --smoke --sections ARGS...`` in Triton's interpreter, no GPU."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, str(REPO / "tools" / "bench_kernels.py"), "--smoke", "--sections",
                           *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_bench_kernels_smoke(tmp_path):
    proc = _smoke("gemm,quantize,attention", "--out", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert json.loads((tmp_path / "r.json").read_text()) == result
    assert {"gemm", "quantize", "attention"} <= result.keys() and result["smoke"] is True
    assert all(row["w4a4_gemm_ms"] > 0 and row["fp16_ms"] > 0 for row in result["gemm"])
    assert all(row["kernel_ms"] > 0 for row in result["quantize"]) and result["attention"][0]["kv4_ms"] > 0


def test_bench_kernels_unknown_section_exits_2():
    proc = _smoke("gemm,e2ee", timeout=300)
    assert proc.returncode == 2 and "unknown section(s) e2ee" in proc.stderr and not proc.stdout


def test_bench_kernels_without_gpu_exits_2():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench_kernels.py")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr


def test_bench_kernels_variants_smoke(tmp_path):
    """--sections variants: every variant runs and gives the default's bits (GEMM, quantize) in the interpreter;
    --out is rewritten after each kind of variant and ends equal to the printed JSON."""
    proc = _smoke("variants", "--variant-kinds", "attention,gemm,quantize,k_step", "--out", str(tmp_path / "v.json"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "v.json").read_text()) == json.loads(proc.stdout)
    v = json.loads(proc.stdout)["variants"]
    assert list(v) == ["attention", "gemm", "quantize", "k_step"]  # in the order asked
    gemm = [x for row in v["gemm"] for x in row["variants"]]
    quant = [x for row in v["quantize"] for x in row["variants"]]
    assert len(gemm) >= 5 and all(x["same_bits"] for x in gemm)
    assert len(quant) >= 5 and all(x["same_bits"] for x in quant)
    # a decode step's row: the few-rows route (the default) and the many-rows kernels give the same bits
    decode = next(row for row in v["quantize"] if row["M"] == 1)
    assert {"default", "few_rows_off"} <= {x["name"] for x in decode["variants"]}
    assert [(x["M"], x["K"], x["p"]) for x in v["k_step"]] == [(4, 172, 64), (4, 344, 32), (2, 172, 64)]
    k_step = [x for row in v["k_step"] for x in row["variants"]]
    # every tile equals the torch float64 K step (4 tiles at 4 rows; the default and a decode tile at 2 rows)
    assert len(k_step) == 10 and all(x["same_bits"] for x in k_step)
    attn = {x["name"]: x for x in v["attention"][0]["variants"]}
    assert v["attention"][0]["variants"][0]["name"] == "default" and attn["default"]["same_bits"]
    # the CUDA-core kernel's token loop pipelined (2, 3 stages) computes what the plain loop does
    flat = attn["cc_bt64_w4_s1_x1"]["max_rel_diff"]
    assert attn["cc_bt64_w4_s2_x1"]["max_rel_diff"] == attn["cc_bt64_w4_s3_x1"]["max_rel_diff"] == flat < 1e-3
    # the Gluon kernel is listed with the reason it cannot run here (Gluon has no interpreter)
    assert "compiled GPU code" in attn["mma_bt32_w4_s1"]["error"] and "ms" not in attn["mma_bt32_w4_s1"]


def test_bench_kernels_unknown_variant_kind_exits_2():
    proc = _smoke("variants", "--variant-kinds", "attention,gemmm", timeout=300)
    assert proc.returncode == 2 and "--variant-kinds 'attention,gemmm'" in proc.stderr and not proc.stdout


def test_bench_kernels_profile_smoke():
    """--sections profile: time per kernel (per top-level op on the CPU) of one prefill and one decode step."""
    proc = _smoke("profile")
    assert proc.returncode == 0, proc.stderr[-2000:]
    prof = json.loads(proc.stdout)["profile"]
    for phase in ("prefill", "decode"):
        for model in ("fp16", "w4a4kv4"):
            p = prof[phase][model]
            rows = p["by_kernel"]
            assert p["total_ms"] > 0 and p["launches"] >= p["kernels"] >= len(rows) > 0
            assert [r["ms"] for r in rows] == sorted((r["ms"] for r in rows), reverse=True)
            assert 0.99 < sum(r["share"] for r in rows) <= 1.0 + 1e-9 or len(rows) == 20
