"""The CLI end to end on a tiny model directory, and every bad input the issue names."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from infoquant_export.artifact import load_artifact
from infoquant_export.cli import main
from infoquant_export.errors import UserError
from infoquant_export.fsutil import atomic_output_dir
from tests.helpers import save_tiny_model_dir

FAST = ["--calib-windows", "4", "--calib-seq-len", "64"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "llama")


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_quantize_eval_generate_reload(model_dir, tmp_path, capsys):
    out = tmp_path / "art"
    code, stdout, err = run(["quantize", "--model", model_dir, "--out", out, "--device", "cpu", *FAST], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["config"] == "W4A4KV4-hadamard-gptq" and summary["peak_rss_mb"] > 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "report", "tokenizer",
                                                   "transforms.json"]
    assert "weights" in json.loads((out / "report" / "quantize.json").read_text())["seconds"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial directory left

    code, stdout, _ = run(["eval", out, "--seq-len", "64", "--max-windows", "4", "--json"], capsys)
    result = json.loads(stdout)
    assert code == 0 and {"ppl", "tokens", "windows", "seq_len", "corpus"} <= result.keys()
    assert result["windows"] == 4 and result["tokens"] == 4 * 63 and result["ppl"] > 1

    code, stdout, _ = run(["generate", out, "--prompt", "Hello", "--max-new-tokens", "5", "--json"], capsys)
    assert code == 0 and 1 <= len(json.loads(stdout)["tokens"]) <= 5

    ids = torch.randint(0, 512, (2, 32))
    first, second = load_artifact(out), load_artifact(out)
    assert torch.equal(first.model(ids)[0], second.model(ids)[0])  # bit for bit
    assert first.weights["layers.0.q"].codes.dtype == torch.int8


@pytest.mark.parametrize("args,message", [
    (["--w-bits", "9"], "invalid --w-bits 9"),
    (["--a-bits", "1"], "invalid --a-bits 1"),
    (["--kv-clip-ratio", "1.5"], "invalid --kv-clip-ratio"),
])
def test_invalid_options(model_dir, tmp_path, capsys, args, message):
    code, _, err = run(["quantize", "--model", model_dir, "--out", tmp_path / "o", *args], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_bad_models(tmp_path, capsys):
    corrupt = tmp_path / "broken.gguf"
    corrupt.write_bytes(b"GGUF" + os.urandom(64))
    no_weights = tmp_path / "empty_dir"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    cases = [(tmp_path / "missing", "does not exist"), (corrupt, "cannot load model"),
             (no_weights, "no .safetensors weights"), (tmp_path, "has no config.json")]
    for model, message in cases:
        code, _, err = run(["quantize", "--model", model, "--out", tmp_path / "o"], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "o").exists()


def test_unsupported_architecture(tmp_path, capsys):
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    gpt2.save_pretrained(tmp_path / "gpt2")
    code, _, err = run(["quantize", "--model", tmp_path / "gpt2", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "unsupported architecture 'gpt2'" in err


def test_size_without_hadamard_construction(tmp_path, capsys):
    model = save_tiny_model_dir(tmp_path / "odd", intermediate=130)  # 130 = 65 * 2: no Hadamard of that order
    code, _, err = run(["quantize", "--model", model, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "130" in err and not (tmp_path / "o").exists()
    code, _, err = run(["quantize", "--model", model, "--rotation", "none", "--weights", "rtn",
                        "--out", tmp_path / "o"], capsys)
    assert code == 0, err  # without rotations the same model quantizes


def test_existing_output_directory(model_dir, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    code, _, err = run(["quantize", "--model", model_dir, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "already exists" in err


def test_atomic_dir_leaves_nothing_on_interrupt(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(tmp_path / "o") as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError):
        with atomic_output_dir(tmp_path):
            pass


def test_ctrl_c_exits_130_without_partial_output(model_dir, tmp_path):
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "infoquant_export.cli", "quantize", "--model", str(model_dir), "--out", str(out),
           "--calib-windows", "4000", "--calib-seq-len", "256"]  # seconds of calibration, to interrupt
    # SIGINT as a terminal delivers it: a shell that starts pytest in the background (`... &`) ignores SIGINT, the
    # children inherit that, and Python then installs no KeyboardInterrupt handler (the command would finish, exit 0)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=Path.cwd(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen, deadline = b"", time.monotonic() + 300
    while b"GPTQ" not in seen and time.monotonic() < deadline and proc.poll() is None:
        seen += os.read(proc.stderr.fileno(), 256)  # wait for the calibration progress bar
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    err = (seen + rest).decode(errors="replace")
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
