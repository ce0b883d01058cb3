"""`export`, `verify` and `generate --backend ort` from the command line, including bad input (exit 2)."""

import json
import shutil

import onnx
import pytest

from infoquant_export.cli import main


def run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_export_verify_generate(tiny_artifact, tmp_path, capsys):
    code, out, _ = run(["export", tiny_artifact, "--out", tmp_path / "m.onnx", "--target", "trt"], capsys)
    assert code == 0 and json.loads(out)["custom_nodes"] == 22
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.trt.onnx"]
    code, out, _ = run(["verify", tiny_artifact, tmp_path / "m.onnx", "--windows", "4", "--seq-len", "64",
                        "--json", tmp_path / "r.json", "--plot", tmp_path / "r.png"], capsys)
    report = json.loads((tmp_path / "r.json").read_text())
    assert code == 0 and "PASSED" in out and report["passed"] is True
    assert report["top1_agreement"] == 1.0  # measured: 1.0 (bit-exact logits up to the float32 LM head)
    assert abs(report["ppl_backend"] - report["ppl_reference"]) / report["ppl_reference"] < 1e-6
    assert report["first_divergent_layer"] is None and len(report["per_layer"]) == 2
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    # impossible threshold -> exit 1 with the verdict FAILED
    code, out, _ = run(["verify", tiny_artifact, tmp_path / "m.onnx", "--windows", "1", "--seq-len", "32",
                        "--min-top1", "1.01"], capsys)
    assert code == 1 and "FAILED" in out
    code, out, _ = run(["generate", tmp_path / "m.onnx", "--prompt", "Hello", "--max-new-tokens", "8", "--json"],
                       capsys)
    ort_reply = json.loads(out)
    code2, out, _ = run(["generate", tiny_artifact, "--backend", "torch", "--prompt", "Hello",
                         "--max-new-tokens", "8", "--json"], capsys)
    torch_reply = json.loads(out)
    assert code == code2 == 0 and ort_reply["tokens"] == torch_reply["tokens"]
    for reply in (ort_reply, torch_reply):  # timings: a decode step per new token after the first
        t = reply["timing"]
        assert t["prefill_tokens"] > 1 and t["prefill_ms"] > 0 and t["decode_steps"] == len(reply["tokens"]) - 1
        assert t["decode_step_ms"] > 0 and t["decode_tokens_per_s"] > 0
    code, out, err = run(["generate", tmp_path / "m.onnx", "--prompt", "Hello", "--max-new-tokens", "8"], capsys)
    assert code == 0 and out.strip() == ort_reply["text"].strip()  # stdout: the reply only
    assert "prefill" in err and "tokens/s" in err  # the timings go to stderr


def _one_line_exit_2(args, capsys, message):
    capsys.readouterr()  # drop what fixtures printed
    code, out, err = run(args, capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and message in err, err


def test_bad_export_input(tiny_artifact, tmp_path, capsys):
    _one_line_exit_2(["export", tiny_artifact, "--out", tmp_path / "missing" / "m.onnx"], capsys, "does not exist")
    _one_line_exit_2(["export", tmp_path, "--out", tmp_path / "m.onnx"], capsys, "not a quantized artifact")
    newer = tmp_path / "newer"
    shutil.copytree(tiny_artifact, newer)
    schema = json.loads((newer / "transforms.json").read_text())
    (newer / "transforms.json").write_text(json.dumps({**schema, "version": 99}))
    _one_line_exit_2(["export", newer, "--out", tmp_path / "m.onnx"], capsys, "schema version 99")
    other_k = tmp_path / "other_k"  # built with another Hadamard construction than this build's
    shutil.copytree(tiny_artifact, other_k)
    rotations = [{**r, "hadamard_k": 999} if r["site"] == "down_proj_input" else r for r in schema["rotations"]]
    (other_k / "transforms.json").write_text(json.dumps({**schema, "rotations": rotations}))
    _one_line_exit_2(["export", other_k, "--out", tmp_path / "m.onnx"], capsys, "was built with K = 999")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_artifact, broken)
    config = json.loads((broken / "config.json").read_text())
    config["biases"]["down"] = True  # promises a tensor the weights file lacks
    (broken / "config.json").write_text(json.dumps(config))
    _one_line_exit_2(["export", broken, "--out", tmp_path / "m.onnx"], capsys, "lacks tensor")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "newer", "other_k"]  # nothing half-written


def test_bad_onnx_input(tiny_artifact, tiny_onnx, tmp_path, capsys):
    data = tiny_onnx.read_bytes()
    (tmp_path / "truncated.onnx").write_bytes(data[: len(data) // 3])
    _one_line_exit_2(["generate", tmp_path / "truncated.onnx", "--prompt", "x"], capsys, "not a readable ONNX")
    _one_line_exit_2(["verify", tiny_artifact, tmp_path / "truncated.onnx"], capsys, "not a readable ONNX")
    edited = onnx.load(str(tiny_onnx))
    del edited.metadata_props[:]
    onnx.save(edited, str(tmp_path / "edited.onnx"))
    _one_line_exit_2(["verify", tiny_artifact, tmp_path / "edited.onnx"], capsys, "not written by infoquant-export")
    _one_line_exit_2(["generate", tiny_onnx.with_suffix(".trt.onnx"), "--prompt", "x"], capsys, "TensorRT variant")
    edited = onnx.load(str(tiny_onnx))
    edited.graph.node[5].input[0] = "no_such_tensor"  # hand-edited graph
    onnx.save(edited, str(tmp_path / "graph.onnx"))
    _one_line_exit_2(["generate", tmp_path / "graph.onnx", "--prompt", "x"], capsys, "cannot load")


@pytest.mark.parametrize("flag", [{}, {"kv_bits": 8}])
def test_verify_mismatched_artifact(tiny_onnx, tmp_path, capsys, flag):
    from tests.export.conftest import make_artifact

    other = make_artifact(tmp_path, "llama", **flag)  # same shape, different random weights
    _one_line_exit_2(["verify", other, tiny_onnx, "--json", tmp_path / "r.json"], capsys, "was not exported from")
    assert not (tmp_path / "r.json").exists()
