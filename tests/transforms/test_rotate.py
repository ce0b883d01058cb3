"""Norm fusion and rotation folds preserve the function; the schema round-trips; quantization benefits."""

from __future__ import annotations

import copy

import pytest
import torch

from infoquant_export.config import QuantConfig
from infoquant_export.models.adapters import to_canonical
from infoquant_export.quant.calibrate import quantize_model
from infoquant_export.transforms.rotate import apply_transforms, fuse_norms, hadamard_schema
from infoquant_export.transforms.schema import TransformSchema
from tests.helpers import sqnr_db, tiny_hf_model

IDS = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("family,kwargs", [("llama", {}), ("llama", {"kv_heads": 4, "tie": True}),
                                           ("qwen2", {}), ("mistral", {})])
@pytest.mark.parametrize("blocks", [1, 2, 4])
def test_rotated_model_computes_the_same_function(family, kwargs, blocks):
    model = to_canonical(tiny_hf_model(family, **kwargs))
    ref, _ = model(IDS)
    apply_transforms(model, hadamard_schema(64, 16, 192, blocks, seed=7))
    out, _ = model(IDS)
    assert sqnr_db(ref, out) > 100  # measured 123-126 dB in float32
    assert torch.all(model.layers[0].input_norm == 1) and model.layers[0].down_rotation is not None


def test_fusion_alone_preserves_function():
    model = to_canonical(tiny_hf_model("llama"))
    ref, _ = model(IDS)
    fuse_norms(model)
    assert sqnr_db(ref, model(IDS)[0]) > 110  # measured 126.6 dB


def test_negative_control_missing_online_op_breaks_the_function():
    model = to_canonical(tiny_hf_model("llama"))
    ref, _ = model(IDS)
    apply_transforms(model, hadamard_schema(64, 16, 192))
    for layer in model.layers:
        layer.down_rotation = None  # folded into down_proj but not run online
    assert sqnr_db(ref, model(IDS)[0]) < 10  # measured -3.8 dB


def test_schema_json_roundtrip_and_validation():
    schema = hadamard_schema(576, 64, 1536, num_blocks=2, seed=3)
    again = TransformSchema.from_dict(__import__("json").loads(schema.to_json()))
    assert again == schema
    assert [r.mode for r in again.rotations] == ["offline", "offline", "online", "online"]
    assert again.find("residual").block_size == 288
    bad = schema.to_dict()
    bad["rotations"][2]["mode"] = "offline"
    with pytest.raises(ValueError, match="qk_post_rope is online"):
        TransformSchema.from_dict(bad)
    with pytest.raises(ValueError, match="version"):
        TransformSchema.from_dict({**schema.to_dict(), "version": 99})


def test_schema_records_hadamard_k_and_refuses_another_construction():
    """Version 3 records each Hadamard block's K; LLaMA-2-7B's 11008 is 172 x 64 (Williamson) in this build, 344 x
    32 (Paley only) in schema versions 1-2: such an artifact's folded down_proj would not match the online
    Hadamard, so it is refused; sizes whose K did not change (1536 = 12 x 128) still load from version 2."""
    data = hadamard_schema(4096, 128, 11008).to_dict()
    assert data["version"] == 3
    assert [r["hadamard_k"] for r in data["rotations"]] == [1, 1, 1, 172]
    TransformSchema.from_dict(data)
    data["rotations"][3]["hadamard_k"] = 344
    with pytest.raises(ValueError, match="11008 was built with K = 344 .schema v3., this build constructs K = 172"):
        TransformSchema.from_dict(data)
    with pytest.raises(ValueError, match="K = 344 .schema v2."):
        TransformSchema.from_dict(_as_version_2(data))
    demo = _as_version_2(hadamard_schema(576, 64, 1536).to_dict())
    assert TransformSchema.from_dict(demo).find("down_proj_input").size == 1536


def _as_version_2(data: dict) -> dict:
    """A schema dict as version 2 wrote it: no ``hadamard_k``."""
    rotations = [{k: v for k, v in r.items() if k != "hadamard_k"} for r in data["rotations"]]
    return {**data, "version": 2, "rotations": rotations}


def test_rotation_helps_w4a4kv4_with_outlier_channels():
    """Rotations spread the outlier channels, so A4KV4 quantization is much closer to full precision."""
    hf = tiny_hf_model("llama", hidden=128, intermediate=384)
    with torch.no_grad():
        hf.model.embed_tokens.weight[:, :3] *= 3  # outlier channels 36x the others
    base = to_canonical(hf)
    ref, _ = base(IDS)
    cfg = QuantConfig(w_bits=16, weights="rtn")  # A4KV4: where activation outliers hurt most
    plain = copy.deepcopy(base)
    quantize_model(plain, cfg, progress=False)
    rotated = copy.deepcopy(base)
    apply_transforms(rotated, hadamard_schema(128, 32, 384))
    quantize_model(rotated, cfg, progress=False)
    plain_db, rotated_db = sqnr_db(ref, plain(IDS)[0]), sqnr_db(ref, rotated(IDS)[0])
    assert rotated_db > plain_db + 3  # measured 12.0 vs 7.0 dB


@pytest.mark.parametrize("kind,blocks", [("randomized_hadamard", 1), ("randomized_hadamard", 4), ("identity", 1)])
def test_online_rotations_with_explicit_matrices(kind, blocks):
    """Online sites also run dense block matrices (the path learned rotations take) and stay function-preserving."""
    from infoquant_export.transforms.schema import Fold, Rotation

    model = to_canonical(tiny_hf_model("llama"))
    ref, _ = model(IDS)
    schema = TransformSchema(fused_norms=True, rotations=[
        Rotation("R4", kind, 192, "down_proj_input", "online", num_blocks=blocks, seed=5,
                 folds=[Fold("down", "input")]),
        Rotation("R3", kind, 16, "qk_post_rope", "online", seed=6),
    ])
    apply_transforms(model, schema)
    assert model.layers[1].down_rotation.matrix.shape == (blocks, 192 // blocks, 192 // blocks)
    assert sqnr_db(ref, model(IDS)[0]) > 100  # measured 124-127 dB
