"""infoquant-reference numerics quirks, each against a hand-computed expectation (docs/numerics.md section 7)."""

from __future__ import annotations

import math

import pytest
import torch

from infoquant_export.models.model import ActQuantizer
from infoquant_export.quant.lac import clip_to_logit, initial_logits
from infoquant_export.quant.primitives import fake_quantize_activation
from infoquant_export.quant.reference_primitives import (
    fake_quantize_heads_fp16,
    fake_quantize_heads_ste,
    reference_weight_codes,
    reference_weight_range,
)
from infoquant_export.quant.weights import gptq, reference_mse_scale, rtn
from infoquant_export.transforms.infoquant_import import reference_clip_factor


def test_weight_grid_asymmetric_scale_symmetric_codes():
    w = torch.tensor([[1.0, -0.5], [-3.0, -1.0]])
    # row 0: range [min(-0.5, 0), max(1, 0)] = 1.5 -> s = 1.5 / 15 = 0.1; codes round(w / s) = [10, -5]
    # (10 is outside the INT4 grid [-8, 7]); row 1: range [-3, 0] -> s = 0.2, codes [-15, -5]
    qw = rtn(w, 4, clip_search=False, grid="reference")
    assert qw.scale.flatten().tolist() == pytest.approx([0.1, 0.2], abs=1e-8)
    assert qw.codes.tolist() == [[10, -5], [-15, -5]]
    assert qw.bits == 5 and qw.codes.dtype == torch.int8  # stored as 5-bit signed codes (int8), not packed INT4
    # the MSE search keeps these scales: shrink 1 reproduces both rows exactly (error 0), nothing is strictly better
    assert torch.equal(reference_mse_scale(w, 4), qw.scale)
    assert reference_weight_range(4) == (-16, 15)
    # codes clamp to [-16, 15] (reached by GPTQ's error-updated columns)
    assert reference_weight_codes(torch.tensor([[-2.0, 2.0]]), torch.tensor([[0.1]]), 4).tolist() == [[-16, 15]]


def test_weight_search_uses_the_asymmetric_error_and_shrinks():
    # one large positive outlier: the asymmetric search shrinks the range (p < 1) and the scale stays range / 15
    w = torch.tensor([[8.0, 1.0, 1.1, 0.9, 1.05, -0.2, 0.95, 1.02]])
    s_full = (8.0 + 0.2) / 15
    s = float(reference_mse_scale(w, 4))
    p = s / s_full  # the chosen shrink factor, on the grid 1 - i/100
    assert p < 1.0 and abs(p * 100 - round(p * 100)) < 1e-3  # measured: p = 0.97
    codes = rtn(w, 4, grid="reference").codes
    assert codes.max() > 7  # symmetric codes past the INT4 grid (measured: 15)


def test_gptq_on_the_reference_grid_stays_in_range():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=gen)
    x = torch.randn(256, 32, generator=gen)
    qw = gptq(w, 2.0 / 256 * x.T @ x, 4, grid="reference")
    assert qw.bits == 5 and -16 <= int(qw.codes.min()) and int(qw.codes.max()) <= 15
    assert int(qw.codes.abs().max()) > 8  # measured: 11 (uses the 5-bit grid)


def test_o_proj_input_per_head_range_without_zero_in_float16():
    # head 0 [1, 2, 3, 4]: xmin 1, xmax 4 (0 not included), s = fp16(3/15) = 0.199951171875,
    # z = round(fp16(-1/s)) = -5 (outside [0, 15]); x/s = 5.0012 -> fp16 5.0 -> q = 5 - 5 = 0 ... 20 - 5 = 15;
    # x_hat = fp16(s * (q - z)) = fp16(0.99976) = 1.0 (tie to even), 2.0, 3.0, fp16(3.99902) = 4.0 (tie to even)
    # head 1 [-0.75, 0.75, 0.25, 0]: s = fp16(0.1) = 0.0999755859375, z = round(fp16(7.5018)) = round(7.5) = 8;
    # 0.25/s = 2.5006 -> fp16 2.5 -> 2 (half to even) -> x_hat 2s = 0.199951171875; -0.75 -> q 0 -> -8s;
    # 0.75 -> 8 + 8 = 16 -> clamp 15 -> fp16(7s) = 0.69970703125
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, -0.75, 0.75, 0.25, 0.0]])
    out = fake_quantize_heads_fp16(x, 4, 1.0, 1.0, group_size=4)
    assert out.tolist() == [[1.0, 2.0, 3.0, 4.0, -0.7998046875, 0.69970703125, 0.199951171875, 0.0]]
    assert out.dtype == torch.float32
    # our default per-token quantizer (range includes 0, float32) gives other values for head 0
    assert fake_quantize_activation(x, 4, 1.0, group_size=4)[0, :4].tolist() != [1.0, 2.0, 3.0, 4.0]
    # per-head clips: head 1 clipped by 0.5 -> xmin -0.375, xmax 0.375, s = fp16(0.05) = 0.0499877929688
    out = fake_quantize_heads_fp16(x, 4, torch.tensor([1.0, 0.5]), torch.tensor([1.0, 0.5]), group_size=4)
    assert out[0, :4].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert out[0, 4].item() == pytest.approx(-8 * 0.0499877929688, abs=1e-4)  # clipped to z * s
    # the float32 training (STE) version has the same grid up to float16 rounding
    ste = fake_quantize_heads_ste(x, 4, 1.0, 1.0, group_size=4)
    assert torch.allclose(ste, fake_quantize_heads_fp16(x, 4, 1.0, 1.0, group_size=4), atol=2e-3)


def test_lac_init_factor_and_reference_clip_rounding():
    q = ActQuantizer(bits=4, clip=0.9)
    logits = initial_logits(q, 0.95)  # the reference starts at logit(0.9) = 2.1972, i.e. alpha 0.95
    assert logits.tolist() == pytest.approx([math.log(9.0), math.log(9.0)], abs=1e-6)
    assert float(0.5 * (1 + torch.sigmoid(logits[0]))) == pytest.approx(0.95, abs=1e-6)
    assert initial_logits(q, None).tolist() == pytest.approx([clip_to_logit(0.9)] * 2, abs=1e-6)  # ours: 0.9
    # fp16(2.1972) = 2.197265625, fp16(sigmoid) = 0.89990234375, fp16(1 + .) = 1.900390625 (tie to even), * 0.5
    assert reference_clip_factor(logits[:1]).item() == 0.9501953125
    heads = ActQuantizer(bits=4, clip=0.9)
    heads.groups = 3
    assert initial_logits(heads, 0.95).shape == (2, 3)
