"""ONNX export of a tiny W4A4KV4 model: structure, ORT parity, an independent ONNX implementation, cache."""

import numpy as np
import onnx
import pytest
import torch

from infoquant_export.artifact import load_artifact
from infoquant_export.eval.generate import greedy_generate
from infoquant_export.export.exporter import export_onnx
from infoquant_export.runtime.ort_decoder import OrtDecoder, ort_greedy_generate
from tests.export.conftest import make_artifact
from tests.helpers import sqnr_db

IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))


def test_graph_structure(tiny_onnx):
    model = onnx.load(str(tiny_onnx))
    assert model.opset_import[0].version >= 21
    custom = [n for n in model.graph.node if n.domain == "infoquant"]
    kinds = {n.op_type for n in custom}
    assert kinds == {"QLinear", "Hadamard", "KVQuantize", "KVDequantize"}
    for node in custom:
        attrs = {a.name: a for a in node.attribute}
        assert attrs["plugin_namespace"].s == b"infoquant" and attrs["plugin_version"].s == b"1"
    # 2 layers: 4 QLinear, 2 Hadamard (q, k) + 1 (down), 2 KVQuantize, 2 KVDequantize per layer
    assert len(custom) == 2 * (4 + 3 + 2 + 2)
    weights = {i.name: i for i in model.graph.initializer}
    assert weights["layers.0.qkv.weight"].data_type == onnx.TensorProto.INT4
    assert weights["layers.0.qkv.weight"].dims == [64 + 32 + 32, 64]
    # no dense Hadamard initializer: no square float matrix at all
    floats = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    assert not [i for i in floats if len(i.dims) == 2 and i.dims[0] == i.dims[1]]
    qdq = {n.op_type for f in model.functions for n in f.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= qdq
    meta = {p.key: p.value for p in model.metadata_props}
    assert '"a_bits": 4' in meta["infoquant.quant_config"] and "R4" in meta["infoquant.transform_schema"]
    cache_in = [i for i in model.graph.input if i.name.startswith("past.0.key")]
    codes = next(i for i in cache_in if i.name.endswith("codes"))
    assert codes.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert codes.type.tensor_type.shape.dim[3].dim_value == 8  # head_dim 16, two 4-bit codes per byte


def test_trt_variant_has_no_function_bodies(tiny_onnx):
    trt = onnx.load(str(tiny_onnx.with_suffix(".trt.onnx")))
    assert len(trt.functions) == 0
    onnx.checker.check_model(trt, full_check=True)
    meta = {p.key: p.value for p in trt.metadata_props}
    assert meta["infoquant.variant"] == "trt-plugins"


def test_ort_matches_fake_quant(tiny_artifact, tiny_onnx):
    model = load_artifact(tiny_artifact).model
    with torch.no_grad():
        ref, present = model(IDS)
    logits, cache, _ = OrtDecoder(tiny_onnx)(IDS.numpy())
    # measured: inf dB (bit-exact; integer GEMMs and float64 reductions make the order of summation irrelevant)
    assert sqnr_db(ref, torch.from_numpy(logits)) > 100
    assert torch.equal(ref.argmax(-1), torch.from_numpy(logits).argmax(-1))
    # the 4-bit cache decodes to exactly the torch cache values
    from infoquant_export.quant.primitives import unpack_uint4

    codes = unpack_uint4(torch.from_numpy(cache["past.1.value_codes"])).float()
    decoded = (codes - torch.from_numpy(cache["past.1.value_zero"]).float()) * torch.from_numpy(
        cache["past.1.value_scale"])
    assert torch.equal(decoded, present[1][1])


def test_reference_evaluator_agrees_with_onnxruntime(tiny_onnx):
    """Two implementations of the ONNX spec, neither ours: onnx.reference (after onnx's own function inliner,
    which resolves overloads) and ONNX Runtime."""
    from onnx import inliner
    from onnx.reference import ReferenceEvaluator

    decoder = OrtDecoder(tiny_onnx)
    ids = IDS[:1, :12].numpy()
    logits, cache, _ = decoder(ids)
    feeds = {"input_ids": ids, "attention_mask": np.ones((1, 12), np.int64), "position_ids": np.arange(12)[None],
             **decoder.empty_cache(1)}
    evaluator = ReferenceEvaluator(inliner.inline_local_functions(onnx.load(str(tiny_onnx))))
    names = [o.name for o in decoder.session.get_outputs()]
    ref = dict(zip(names, evaluator.run(names, feeds), strict=True))
    # measured: max |diff| 0 .. 1e-6
    assert np.abs(ref["logits"] - logits).max() < 1e-4
    mismatched = sum(int((ref[k.replace("past.", "present.")] != v).sum()) for k, v in cache.items())
    total = sum(v.size for v in cache.values())
    assert mismatched / total < 0.01  # measured: ~0.005 (codes one step apart at rounding ties of float64 math)


def test_prefill_then_decode_equals_full_prefill(tiny_onnx, tiny_artifact):
    decoder = OrtDecoder(tiny_onnx)
    full, _, _ = decoder(IDS.numpy())
    logits, cache, _ = decoder(IDS[:, :10].numpy())
    steps = [logits]
    for t in range(10, 24):
        logits, cache, _ = decoder(IDS[:, t:t + 1].numpy(), cache)
        steps.append(logits)
    stepped = np.concatenate(steps, axis=1)
    assert np.abs(stepped - full).max() < 1e-5  # measured: 0 (bit-exact)
    assert cache["past.0.key_codes"].shape == (2, 2, 24, 8)
    model = load_artifact(tiny_artifact).model
    with torch.no_grad():
        ref, _ = model(IDS)
    assert torch.equal(torch.from_numpy(full), ref)  # measured: bit-exact


def test_folded_weights_same_outputs(tiny_onnx):
    """``fold_weights`` (the default: the weights' DequantizeLinear folded into float initializers at session
    creation) gives the unfolded session's logits and cache bit for bit, prefill and decode."""
    folded, unfolded = OrtDecoder(tiny_onnx), OrtDecoder(tiny_onnx, fold_weights=False)
    assert folded.fold_weights and not unfolded.fold_weights  # auto: a tiny model is folded
    a, cache_a, _ = folded(IDS[:, :10].numpy())
    b, cache_b, _ = unfolded(IDS[:, :10].numpy())
    a2, cache_a, _ = folded(IDS[:, 10:11].numpy(), cache_a)
    b2, cache_b, _ = unfolded(IDS[:, 10:11].numpy(), cache_b)
    assert np.array_equal(a, b) and np.array_equal(a2, b2)  # measured: identical
    assert all(np.array_equal(cache_a[k], cache_b[k]) for k in cache_a)


def test_fold_weights_auto_threshold():
    """Auto folding: the demo model's float32 linear weights (0.4 GB) fit a quarter of a 24 GB machine,
    LLaMA-2-7B's (26 GB) do not."""
    from infoquant_export.runtime.ort_decoder import FOLD_MEMORY_FRACTION, linear_weight_count

    demo = {"hidden_size": 576, "intermediate_size": 1536, "num_layers": 30, "num_heads": 9, "num_kv_heads": 3,
            "head_dim": 64}
    llama7b = {"hidden_size": 4096, "intermediate_size": 11008, "num_layers": 32, "num_heads": 32,
               "num_kv_heads": 32, "head_dim": 128}
    assert linear_weight_count(llama7b) == 6_476_005_376  # 32 x (4 x 4096^2 + 3 x 4096 x 11008)
    budget = FOLD_MEMORY_FRACTION * 24 * 2**30
    assert 4 * linear_weight_count(demo) <= budget < 4 * linear_weight_count(llama7b)


def test_greedy_generation_matches_torch(tiny_artifact, tiny_onnx):
    model = load_artifact(tiny_artifact).model
    prompt = IDS[:1, :6]
    expected = greedy_generate(model, prompt, 64, stop=set())
    got = ort_greedy_generate(OrtDecoder(tiny_onnx), prompt.numpy(), 64, stop=set())
    assert len(got) == 64 and got == expected


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_biases_and_sliding_window(family, tmp_path):
    """q/k/v biases (Qwen2) and a 16-token sliding window (Mistral) survive export."""
    artifact = make_artifact(tmp_path, family)
    export_onnx(artifact, tmp_path / "m.onnx")
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, _ = load_artifact(artifact).model(ids)
    logits, _, _ = OrtDecoder(tmp_path / "m.onnx")(ids.numpy())
    assert sqnr_db(ref, torch.from_numpy(logits)) > 100  # measured: inf


@pytest.mark.parametrize("bits", [{"kv_bits": 8}, {"kv_bits": 16, "a_bits": 8}])
def test_other_widths(bits, tmp_path):
    artifact = make_artifact(tmp_path, "llama", **bits)
    export_onnx(artifact, tmp_path / "m.onnx")
    with torch.no_grad():
        ref, _ = load_artifact(artifact).model(IDS)
    logits, _, _ = OrtDecoder(tmp_path / "m.onnx")(IDS.numpy())
    assert sqnr_db(ref, torch.from_numpy(logits)) > 100  # measured: inf


def test_williamson_down_proj_hadamard(tmp_path):
    """Intermediate 688 = 172 x 4: the online down_proj Hadamard's K step is the Williamson block (a 172 x 172
    float64 constant in the graph); ONNX Runtime matches the fake-quant model."""
    artifact = make_artifact(tmp_path, "llama", model={"intermediate": 688})
    assert load_artifact(artifact).schema.find("down_proj_input").size == 688
    export_onnx(artifact, tmp_path / "m.onnx")
    graph = onnx.load(tmp_path / "m.onnx")
    shapes = {tuple(i.dims) for f in graph.functions for n in f.node if n.op_type == "Constant"
              for a in n.attribute if a.name == "value" for i in [a.t]}
    shapes |= {tuple(i.dims) for i in graph.graph.initializer}
    assert (172, 172) in shapes
    with torch.no_grad():
        ref, _ = load_artifact(artifact).model(IDS)
    logits, _, _ = OrtDecoder(tmp_path / "m.onnx")(IDS.numpy())
    assert sqnr_db(ref, torch.from_numpy(logits)) > 100  # measured: inf


def test_external_data(tiny_artifact, tmp_path):
    result = export_onnx(tiny_artifact, tmp_path / "m.onnx", external_data=True)
    assert result.external_data and (tmp_path / "m.onnx.data").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    logits, _, _ = OrtDecoder(tmp_path / "m.onnx")(IDS.numpy())
    inline, _, _ = OrtDecoder(tmp_path / "m.onnx")(IDS.numpy())
    assert np.array_equal(logits, inline)
