"""quantize --numerics infoquant-reference end to end on a tiny LLaMA: import of reference rotation files with
clip_parameters.pth applied, the expected folded model (float16 rounding, embedding centring), the profile recorded
and reproduced by loading, export refused; the default profile unchanged."""

from __future__ import annotations

import json

import pytest
import torch

from infoquant_export.artifact import load_artifact, read_manifest
from infoquant_export.cli import main
from infoquant_export.config import CalibrationConfig, LacConfig, QuantConfig
from infoquant_export.models.loading import load_model
from infoquant_export.pipeline import quantize
from infoquant_export.quant.reference_clips import REFERENCE_CLIP_SITES
from infoquant_export.transforms.infoquant_import import reference_clip_factor
from infoquant_export.transforms.rotate import center_embedding, fuse_norms, round_weights
from tests.helpers import save_tiny_model_dir
from tests.transforms.test_infoquant_import import clip_logits, write_reference

IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("ref") / "llama")


@pytest.fixture(scope="module")
def exp_dir(tmp_path_factory):
    """A reference run's exp dir: Q/<model>_layer_<i>_Q.pth (2 blocks) and clip_parameters.pth (fp16 logits)."""
    exp = tmp_path_factory.mktemp("exp")
    ref = write_reference(exp, model_name="llama")
    torch.save(clip_logits(), exp / "clip_parameters.pth")
    return exp, ref


@pytest.fixture(scope="module")
def ref_artifact(model_dir, exp_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "ref"
    code = main(["quantize", "--model", str(model_dir), "--rotation", f"infoquant:{exp_dir[0]}", "--weights", "rtn",
                 "--numerics", "infoquant-reference", "--out", str(out)])
    assert code == 0
    return out


def test_profile_is_recorded_with_its_defaults(ref_artifact, exp_dir):
    quant = json.loads((ref_artifact / "config.json").read_text())["quant"]
    assert quant["numerics"] == "infoquant-reference" and quant["kv_clip_ratio"] == 0.9  # K clip 0.9
    assert quant["clips_from"] == str(exp_dir[0] / "clip_parameters.pth")
    bits = json.loads((ref_artifact / "config.json").read_text())["weight_bits"]
    assert set(bits.values()) == {5}  # the reference's [-16, 15] codes, stored as int8
    report = json.loads((ref_artifact / "report" / "quantize.json").read_text())
    assert report["import"]["clip_counts"] == {"applied_pairs": 14, "ignored_pairs": 2}  # 7 quantizers x 2 layers


def test_imported_clips_are_applied_and_reload_bit_exact(ref_artifact, exp_dir, model_dir):
    art = load_artifact(ref_artifact)
    logits = clip_logits()
    for i, layer in enumerate(art.model.layers):
        for prefix, site in REFERENCE_CLIP_SITES.items():
            want = torch.stack([reference_clip_factor(logits[i][f"{prefix}.clip_factor_a_{e}"].float()).reshape(-1)
                                for e in ("max", "min")])
            got = getattr(layer, site).clip_tensor()
            assert torch.equal(got, want.reshape(got.shape)), (i, site)
        assert layer.o_in.clip_tensor().shape == (2, 4)  # one pair per attention head
        assert layer.v_cache.bits == 16 and layer.k_cache.clip == 0.9
    assert art.weights["layers.0.q"].codes.abs().max() > 8  # measured: 11 (5-bit grid)
    cfg = QuantConfig(weights="rtn", rotation=f"infoquant:{exp_dir[0]}", numerics="infoquant-reference",
                      kv_clip_ratio=0.9)
    fresh = quantize(str(model_dir), cfg, progress=False).model
    with torch.no_grad():
        assert torch.equal(art.model(IDS)[0], fresh(IDS)[0])  # loading reproduces the in-memory model
        default = load_model(str(model_dir)).model(IDS)[0]
        assert not torch.equal(art.model(IDS)[0], default)


def test_folded_model_has_float16_weights_and_centred_embedding(model_dir, exp_dir):
    _, ref = exp_dir
    cfg = QuantConfig(w_bits=16, a_bits=16, kv_bits=16, rotation=f"infoquant:{exp_dir[0]}",
                      numerics="infoquant-reference")
    model = quantize(str(model_dir), cfg, progress=False).model
    src = load_model(str(model_dir)).model  # the reference's order: fp16 load, centre, fp16, fuse, fp16, folds
    round_weights(src)
    center_embedding(src)
    round_weights(src)
    fuse_norms(src)
    round_weights(src)
    q1 = torch.block_diag(*ref["q1"][0].double())
    expect_embed = (src.embed.weight.double() @ q1).float().half().float()
    assert torch.equal(model.embed.weight, expect_embed)
    assert torch.equal(model.layers[0].q.weight, (src.layers[0].q.weight.double() @ q1).float().half().float())
    for p in model.parameters():
        assert torch.equal(p, p.half().float())
    e = src.embed.weight.double()
    assert e.mean(dim=-1).abs().max() < 1e-3  # rows mean-centred (then rounded to float16; measured: 2.9e-5)


def test_export_of_a_reference_artifact_is_refused(ref_artifact, tmp_path, capsys):
    code = main(["export", str(ref_artifact), "--out", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "infoquant-reference" in err[0] and "re-quantize" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_default_import_does_not_apply_the_clips(model_dir, exp_dir):
    cfg = QuantConfig(weights="rtn", rotation=f"infoquant:{exp_dir[0]}")
    result = quantize(str(model_dir), cfg, progress=False)
    assert "not applied" in result.report["import"]["clip_parameters"] and cfg.clips_from is None
    assert all(q.clips() == (0.9, 0.9) for layer in result.model.layers
               for q in (layer.qkv_in, layer.o_in, layer.gate_up_in, layer.down_in))


def test_default_profile_unchanged_and_old_artifacts_load_as_default(ref_artifact, tmp_path):
    assert QuantConfig().numerics == "infoquant-export" and QuantConfig().label() == "W4A4KV4-hadamard-gptq"
    old = tmp_path / "old"
    old.mkdir()
    for name in ("model.safetensors", "transforms.json"):
        (old / name).symlink_to(ref_artifact / name)
    config = json.loads((ref_artifact / "config.json").read_text())
    del config["quant"]["numerics"], config["quant"]["clips_from"]  # an artifact written before the profiles
    (old / "config.json").write_text(json.dumps(config))
    assert read_manifest(old).quant.numerics == "infoquant-export"
    config["quant"]["numerics"] = "fp8-future"
    (old / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="unknown to this build"):
        read_manifest(old)


@pytest.mark.parametrize("args, message", [
    (["--numerics", "nope"], "invalid choice"),
    (["--numerics", "infoquant-reference", "--w-bits", "8"], "does not fit"),
])
def test_bad_numerics_options(model_dir, tmp_path, capsys, args, message):
    try:
        code = main(["quantize", "--model", str(model_dir), "--out", str(tmp_path / "o"), *args])
    except SystemExit as exit_:  # argparse choices
        code = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and not (tmp_path / "o").exists()


def test_lac_under_the_profile_learns_per_head_o_proj_clips(model_dir):
    cfg = QuantConfig(weights="rtn", numerics="infoquant-reference", kv_clip_ratio=0.9,
                      calibration=CalibrationConfig(num_windows=4, seq_len=32),
                      lac=LacConfig(enabled=True, epochs=2, batch_size=2, lr=0.2, warmup_steps=0))
    result = quantize(str(model_dir), cfg, progress=False)
    o_clips = result.model.layers[0].o_in.clip_tensor()
    assert o_clips.shape == (2, 4) and len(set(o_clips[0].tolist())) > 1  # one learned pair per head
    sites = result.report["lac"][0]["clips"]
    assert set(sites) == {"qkv_in", "k_in", "v_in", "o_in", "gate_up_in", "up_in", "down_in"}
    for site in sites:  # stored like the reference: 0.5 * fp16(1 + fp16(sigmoid(fp16(c)))), i.e. float16 values
        clips = getattr(result.model.layers[1], site).clip_tensor()
        assert torch.equal(clips, clips.half().float()) and bool(((clips > 0.5) & (clips < 1.0)).all())


@pytest.mark.parametrize("args, kv_clip", [
    ([], 0.95), (["--numerics", "infoquant-reference"], 0.9),
    (["--numerics", "infoquant-reference", "--kv-clip-ratio", "0.95"], 0.95),
])
def test_kv_clip_default_follows_the_profile(monkeypatch, tmp_path, args, kv_clip):
    import infoquant_export.pipeline as pipeline

    seen: list[QuantConfig] = []
    monkeypatch.setattr(pipeline, "quantize_to_dir", lambda model, cfg, *a, **k: seen.append(cfg) or {})
    assert main(["quantize", "--model", "demo", "--out", str(tmp_path / "o"), *args]) == 0
    assert seen[0].kv_clip_ratio == kv_clip
