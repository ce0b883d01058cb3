"""The Jetson bundle: model files, sm_87 kernels, plugin sources, scripts, README needs computed from the model."""

import ast
import json
import subprocess

from infoquant_export.cli import main
from infoquant_export.runtime.ort_decoder import read_onnx_metadata


def test_bundle_contents(tiny_deploy_onnx, tmp_path, capsys):
    out = tmp_path / "bundle"
    assert main(["jetson-bundle", str(tiny_deploy_onnx.parent), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert read_onnx_metadata(out / "model" / "model.onnx")["variant"] == "reference"
    assert read_onnx_metadata(out / "model" / "model.trt.onnx")["variant"] == "trt-plugins"
    manifest = json.loads((out / "kernels" / "manifest.json").read_text())
    specs = manifest["targets"]["sm_87"]
    assert len(specs) == summary["kernels"] == 16  # measured: the 16 default specialisations
    assert "rmsnorm_quantize_4096" in specs and "kv_rope_hadamard_quantize_32x128" in specs  # the decoder prologues
    assert specs["hadamard_k_step_172x64"]["mma"] == []  # Orin (sm_87): the float64 K step as an FMA loop
    gemm = specs["w4a4_gemm_m64_k4096"]
    assert any("mma.sync" in m and "s8" in m for m in gemm["mma"])  # int8 tensor cores on Orin
    for name in specs:
        assert (out / "kernels" / "sm_87" / f"{name}.cubin").stat().st_size > 0
        assert ".target sm_87" in (out / "kernels" / "sm_87" / f"{name}.ptx").read_text()
    assert (out / "python" / "infoquant_export" / "deploy" / "jetson.py").is_file()
    assert (out / "python" / "infoquant_kernels").is_dir()
    for script in ("build_engine.py", "run.py"):
        ast.parse((out / script).read_text())
    for script in ("build_engine.sh", "run.sh"):
        assert subprocess.run(["bash", "-n", str(out / script)]).returncode == 0
    build = (out / "build_engine.py").read_text()
    assert "model.trt.onnx" in build and "build_engine(" in build  # the one build implementation, int8 KV variant
    # needs: tiny model, 2 layers x (K, V) x 2 KV heads x (8 code bytes + 4 scale + 1 zero) = 104 bytes per token
    need = summary["needs"]
    cfg = read_onnx_metadata(tiny_deploy_onnx)["model_config"]
    assert need["kv_cache_bytes_per_token"] == cfg["num_layers"] * 2 * cfg["num_kv_heads"] * (cfg["head_dim"] // 2 + 5)
    readme = (out / "README.md").read_text()
    assert f"{need['total_memory_mb']}" in readme
    assert "nothing here has been run on a Jetson" in readme.replace("\n", " ")
    files = json.loads((out / "bundle.json").read_text())["files"]
    assert files["model/model.onnx"]["bytes"] == tiny_deploy_onnx.stat().st_size


def test_bundle_bad_input(tiny_deploy_onnx, tmp_path, capsys):
    existing = tmp_path / "exists"
    existing.mkdir()
    assert main(["jetson-bundle", str(tiny_deploy_onnx), "--out", str(existing)]) == 2
    assert "already exists" in capsys.readouterr().err
    empty = tmp_path / "no-onnx"
    empty.mkdir()
    assert main(["jetson-bundle", str(empty), "--out", str(tmp_path / "b")]) == 2
    assert "has no ONNX file" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "no-onnx"]


def test_bundle_build_script_builds_an_engine(tiny_deploy_onnx, tmp_path):
    """The bundle's own build_engine.sh, run for real with TensorRT-RTX standing in for JetPack's TensorRT (same
    Python API; the plan targets sm_89 instead of the Orin, which TensorRT-RTX cannot target)."""
    import os

    import pytest

    from infoquant_export.deploy.jetson import build_bundle

    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed")
    out = tmp_path / "bundle"
    build_bundle(str(tiny_deploy_onnx), out, kernels=False)
    import sys

    env = {**os.environ, "INFOQUANT_TRT": "tensorrt_rtx",  # the scripts run `python3`: this environment's
           "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}
    run = subprocess.run(["bash", str(out / "build_engine.sh"), "--out", str(tmp_path / "m.plan"), "--max-context",
                          "256", "--max-seq", "64"], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-800:]
    side = json.loads((tmp_path / "m.plan.json").read_text())
    assert side["onnx"]["variant"] == "trt-plugins" and sum(p["layers"] for p in side["plugins"]) > 0
