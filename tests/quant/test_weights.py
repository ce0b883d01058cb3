"""Weight quantizers judged by the SQNR of a layer's output on correlated inputs."""

from __future__ import annotations

import torch

from infoquant_export.quant.primitives import signed_range
from infoquant_export.quant.weights import HessianAccumulator, gptq, mse_clip_scale, rtn
from tests.helpers import sqnr_db


def _layer(out_features: int = 96, in_features: int = 128, rows: int = 2048):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(out_features, in_features, generator=g)
    w[:, :4] *= 6  # heavy-tailed columns, as in real LLM weights
    mix = torch.randn(in_features, in_features, generator=g) / in_features ** 0.5
    x = torch.randn(rows, in_features, generator=g) @ (torch.eye(in_features) + 2 * mix)  # correlated inputs
    return w, x


def test_rtn_codes_and_scale():
    w, _ = _layer()
    qw = rtn(w, 4)
    qmin, qmax = signed_range(4)
    assert qw.codes.dtype == torch.int8 and int(qw.codes.min()) >= qmin and int(qw.codes.max()) <= qmax
    assert torch.equal(qw.dequantize(), qw.codes.float() * qw.scale)


def test_mse_clip_search_beats_absmax():
    w, x = _layer()
    plain = rtn(w, 4, clip_search=False).dequantize()
    searched = rtn(w, 4, clip_search=True).dequantize()
    ref = x @ w.T
    assert sqnr_db(ref, x @ searched.T) > sqnr_db(ref, x @ plain.T) + 0.8  # measured 12.8 vs 11.5 dB
    assert torch.all(mse_clip_scale(w, 4) <= mse_clip_scale(w, 4, search=False))


def test_gptq_beats_rtn_on_layer_output():
    w, x = _layer()
    acc = HessianAccumulator(w.shape[1])
    for chunk in x.split(512):
        acc.add(chunk)
    exact = 2 * x.double().T @ x.double() / len(x)
    assert torch.allclose(acc.h, exact, rtol=1e-4, atol=1e-4)  # float32 products, float64 accumulation
    ref = x @ w.T
    rtn_sqnr = sqnr_db(ref, x @ rtn(w, 4).dequantize().T)
    gptq_w = gptq(w, acc.h, 4)
    gptq_sqnr = sqnr_db(ref, x @ gptq_w.dequantize().T)
    assert gptq_sqnr > rtn_sqnr + 2.0  # measured 15.9 vs 12.8 dB
    assert int(gptq_w.codes.min()) >= -8 and int(gptq_w.codes.max()) <= 7


def test_gptq_dead_inputs_get_zero_weight():
    w, x = _layer()
    x[:, 5] = 0
    acc = HessianAccumulator(w.shape[1])
    acc.add(x)
    assert torch.all(gptq(w, acc.h, 4).codes[:, 5] == 0)
