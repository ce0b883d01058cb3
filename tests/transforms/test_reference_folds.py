"""infoquant-reference folds: embedding mean-centring and float16 weight rounding (hand-computed)."""

from __future__ import annotations

import torch

from infoquant_export.models.model import CausalLM, ModelConfig
from infoquant_export.transforms.rotate import apply_transforms, center_embedding, hadamard_schema, round_weights

CFG = ModelConfig("llama", vocab_size=2, hidden_size=4, intermediate_size=12, num_layers=1, num_heads=1,
                  num_kv_heads=1, head_dim=4, rms_norm_eps=1e-5)


def _model() -> CausalLM:
    model = CausalLM(CFG, torch.ones(2))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def test_embedding_rows_are_mean_centred():
    model = _model()
    with torch.no_grad():
        model.embed.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 3.0, 1.0]]))
        head = model.lm_head.weight.clone()
    center_embedding(model)
    # row means 3 and 1
    assert model.embed.weight.tolist() == [[-2.0, -1.0, 0.0, 3.0], [-1.0, -1.0, 2.0, 0.0]]
    assert torch.equal(model.lm_head.weight, head)  # the LM head is not centred


def test_weights_rounded_to_float16_after_each_fold():
    model = _model()
    with torch.no_grad():
        model.layers[0].q.weight[0, 0] = 1.0 + 2.0 ** -12  # between float16 neighbours 1 and 1 + 2^-10
    round_weights(model)
    assert model.layers[0].q.weight[0, 0].item() == 1.0
    apply_transforms(model, hadamard_schema(4, 4, 12), round_to=torch.float16)
    for p in model.parameters():
        assert torch.equal(p, p.half().float())
