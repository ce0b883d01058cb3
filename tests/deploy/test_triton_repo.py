"""Repository generation without a server: layout, the ModelConfig schema, the tensorrt_plan model, bad input."""

import pytest

from infoquant_export.cli import main
from infoquant_export.deploy.pbtxt import parse_config


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}"))


def test_layout_and_schema(tiny_deploy_onnx, tmp_path):
    out = tmp_path / "repo"
    assert main(["triton-repo", str(tiny_deploy_onnx.parent), "--out", str(out), "--instances", "3"]) == 0
    config = parse_config((out / "infoquant_llm" / "config.pbtxt").read_text())
    assert config.backend == "python" and config.model_transaction_policy.decoupled
    assert [i.name for i in config.input] == ["text_input", "max_tokens", "stream"]
    assert [o.name for o in config.output] == ["text_output", "output_ids"]
    assert config.instance_group[0].count == 3
    version = out / "infoquant_llm" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["model.onnx", "model.py"]
    assert (version / "model.onnx").read_bytes() == tiny_deploy_onnx.read_bytes()
    assert not (out / "infoquant_llm_trt").exists()


def test_tensorrt_plan_model(tiny_deploy_onnx, tmp_path):
    plans = {}
    for sm in ("87", "89"):
        plans[sm] = tmp_path / f"engine{sm}.plan"
        plans[sm].write_bytes(b"plan bytes " + sm.encode())
    out = tmp_path / "repo"
    assert main(["triton-repo", str(tiny_deploy_onnx), "--out", str(out), "--plan", f"sm87={plans['87']}",
                 "--plan", f"sm_89={plans['89']}"]) == 0
    config = parse_config((out / "infoquant_llm_trt" / "config.pbtxt").read_text())
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 0
    assert dict(config.cc_model_filenames) == {"8.7": "model_sm87.plan", "8.9": "model_sm89.plan"}
    inputs = {i.name: i for i in config.input}
    outputs = {o.name for o in config.output}
    # tiny model: 2 layers x (K, V) x (codes, scale, zero) = 12 cache tensors each way
    assert sum(n.startswith("past.") for n in inputs) == 12 and sum(n.startswith("present.") for n in outputs) == 12
    assert {"input_ids", "attention_mask", "position_ids"} <= set(inputs) and "logits" in outputs
    assert list(inputs["input_ids"].dims) == [-1, -1]
    for sm in ("87", "89"):
        assert (out / "infoquant_llm_trt" / "1" / f"model_sm{sm}.plan").read_bytes() == plans[sm].read_bytes()
        assert (out / "infoquant_llm" / "1" / "plans" / f"model_sm{sm}.plan").is_file()


def test_bad_input_one_line_exit_2_nothing_written(tiny_deploy_onnx, tmp_path, capsys):
    existing = tmp_path / "exists"
    existing.mkdir()
    assert main(["triton-repo", str(tiny_deploy_onnx), "--out", str(existing)]) == 2
    assert "already exists" in capsys.readouterr().err
    empty = tmp_path / "artifact-without-onnx"
    empty.mkdir()
    out = tmp_path / "repo"
    assert main(["triton-repo", str(empty), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "has no ONNX file" in err and "infoquant-export export" in err and err.count("\n") == 1
    extra = tmp_path / "extra.pbtxt"
    extra.write_text("dynamic_batching { max_queue_delay: 5 }\n")  # no such field in the schema
    assert main(["triton-repo", str(tiny_deploy_onnx), "--out", str(out), "--config-extra", str(extra)]) == 2
    err = capsys.readouterr().err
    assert "rejected by Triton's ModelConfig schema" in err and err.count("\n") == 1
    assert main(["triton-repo", str(tiny_deploy_onnx), "--out", str(out), "--dynamic-batching"]) == 2
    assert "max-batch-size" in capsys.readouterr().err
    assert main(["triton-repo", str(tiny_deploy_onnx), "--out", str(out), "--plan", "sm89=/nonexistent.plan"]) == 2
    assert not out.exists() and _siblings(out) == []


def test_config_extra_accepted(tiny_deploy_onnx, tmp_path):
    extra = tmp_path / "extra.pbtxt"
    extra.write_text('parameters { key: "note" value { string_value: "mine" } }\nresponse_cache { enable: false }\n')
    out = tmp_path / "repo"
    assert main(["triton-repo", str(tiny_deploy_onnx), "--out", str(out), "--config-extra", str(extra)]) == 0
    config = parse_config((out / "infoquant_llm" / "config.pbtxt").read_text())
    assert config.parameters["note"].string_value == "mine"


def test_trt_variant_is_refused(tiny_deploy_onnx, tmp_path, capsys):
    trt = tiny_deploy_onnx.with_name("model.trt.onnx")
    assert trt.is_file()
    assert main(["triton-repo", str(trt), "--out", str(tmp_path / "r")]) == 2
    assert "TensorRT variant" in capsys.readouterr().err


@pytest.mark.parametrize("text", ['name: "m"', 'name: "m" backend: "python" max_batch_size: "x"',
                                  'name: "m" backend: "python" instance_group [ { count: 0 } ]'])
def test_schema_rejects(text):
    from infoquant_export.errors import UserError

    with pytest.raises(UserError):
        parse_config(text)
