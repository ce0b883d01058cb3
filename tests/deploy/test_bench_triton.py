"""tools/bench_triton.py against the real server (tiny model, one short run per level): valid JSON figures."""

import json
import subprocess
import sys
from pathlib import Path

from tests.deploy.conftest import require_triton_server

REPO = Path(__file__).resolve().parents[2]


def test_bench_triton_smoke(tiny_deploy_onnx):
    require_triton_server()
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench_triton.py"), "--onnx", str(tiny_deploy_onnx),
                           "--concurrency", "1,4", "--requests", "2", "--repeat", "2", "--max-tokens", "6"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    for clients in (1, 4):
        level = report["levels"][str(clients)]
        assert len(level["runs"]) == 2
        m = level["median"]
        assert m["requests"] == 2 * clients and m["tokens"] == 6 * 2 * clients  # the random model never stops early
        assert m["tokens_per_s"] > 0 and m["latency_p50_s"] > 0
        assert all(0 < r["latency_p50_s"] <= r["latency_p90_s"] for r in level["runs"])


def test_bench_triton_bad_onnx(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench_triton.py"), "--onnx",
                           str(tmp_path / "missing.onnx")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
