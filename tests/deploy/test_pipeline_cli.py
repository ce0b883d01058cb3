"""``infoquant-export pipeline`` end to end on a tiny random LLaMA directory (the demo model runs in BENCHMARKS.md),
and the sample that does the same for a user's Hugging Face directory."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from infoquant_export.cli import main
from infoquant_export.deploy.pbtxt import parse_config
from tests.helpers import save_tiny_model_dir

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("pipeline") / "hf-llama")


def test_pipeline_summary_and_artifacts(hf_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["pipeline", "--model", str(hf_dir), "--out", str(out), "--weights", "rtn", "--eval-windows", "2",
                 "--verify-windows", "2", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0
    ppl = summary["perplexity"]
    assert ppl["windows"] == 2 and ppl["fp"] > 1 and ppl["w4a4kv4"] > 1
    assert abs(ppl["w4a4kv4"] / ppl["fp"] - 1) < 0.2  # random model near uniform: measured 709 vs 706, 510 vs 516
    parity = summary["ort_parity"]
    assert parity["passed"] and parity["top1_agreement"] == 1.0  # measured: 1.0 (bit-exact ORT)
    assert summary["engine"]["status"] in ("skipped", "built", "failed")
    a = summary["artifacts"]
    for key in ("artifact", "onnx", "trt_onnx", "verify_report", "triton_repository"):
        assert Path(a[key]).exists(), key
    assert parse_config((out / "triton" / "infoquant_llm" / "config.pbtxt").read_text()).backend == "python"
    assert json.loads((out / "summary.json").read_text()) == summary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary sibling left


def test_pipeline_bad_input(hf_dir, tmp_path, capsys):
    (tmp_path / "exists").mkdir()
    assert main(["pipeline", "--model", str(hf_dir), "--out", str(tmp_path / "exists")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["pipeline", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--weights",
                 "rtn"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


def test_sample_quantize_hf_llama(hf_dir, tmp_path):
    out = tmp_path / "mine"
    proc = subprocess.run([sys.executable, str(REPO / "samples" / "quantize_hf_llama.py"), str(hf_dir), "--out",
                           str(out), "--weights", "rtn", "--eval-windows", "1", "--verify-windows", "1", "--jetson"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ORT parity" in proc.stdout and "PASSED" in proc.stdout
    assert (tmp_path / "mine-jetson" / "model" / "model.trt.onnx").is_file()
    assert (out / "triton" / "infoquant_llm" / "1" / "model.onnx").is_file()


def test_sigterm_leaves_nothing(hf_dir, tmp_path):
    import signal
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "infoquant_export.cli", "pipeline", "--model", str(hf_dir), "--out",
                             str(out), "--weights", "rtn", "--eval-windows", "1", "--verify-windows", "1"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.partial-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the pipeline ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(120)
    assert code == 130, (code, proc.stderr.read()[-3000:])  # once 0: a swallowed interrupt, now re-raised
    assert list(tmp_path.iterdir()) == []
