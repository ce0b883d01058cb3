"""Quantization primitives: grids, rounding ties, asymmetric per-token qparams, int4 packing."""

from __future__ import annotations

import itertools

import pytest
import torch

from infoquant_export.quant import primitives as P
from tests.helpers import sqnr_db


def test_int4_pack_roundtrip_every_pair():
    pairs = torch.tensor(list(itertools.product(range(-8, 8), repeat=2)), dtype=torch.int8)  # all 256 pairs
    packed = P.pack_int4(pairs)
    assert packed.dtype == torch.uint8 and packed.shape == (256, 1)
    assert sorted(packed.flatten().tolist()) == list(range(256))  # a bijection onto bytes
    assert torch.equal(P.unpack_int4(packed), pairs)
    assert P.pack_int4(torch.tensor([[1, -1]], dtype=torch.int8)).item() == 0xF1  # low nibble first


def test_uint4_pack_roundtrip_random_shapes():
    codes = torch.randint(0, 16, (3, 5, 64), dtype=torch.uint8)
    assert torch.equal(P.unpack_uint4(P.pack_uint4(codes)), codes)
    with pytest.raises(ValueError, match="odd"):
        P.pack_uint4(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="out of range"):
        P.pack_uint4(torch.tensor([16, 0]))


def test_weight_rounding_ties_to_even():
    # s = 1 exactly (max |w| = 7 with 4 bits): w/s hits exact .5 ties
    w = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 7.0, -7.0]])
    s = P.weight_scale(w, 4)
    assert s.item() == 1.0
    assert P.quantize_weight(w, s, 4).tolist() == [[0, 2, 2, 0, -2, -2, 7, -7]]


def test_weight_grid_is_true_int4():
    w = torch.randn(16, 64)
    s = P.weight_scale(w, 4, 0.5)  # clipped: codes saturate at both ends
    q = P.quantize_weight(w, s, 4)
    assert int(q.min()) == -8 and int(q.max()) == 7


def test_activation_qparams_definition():
    x = torch.tensor([[-5.0, 0.0, 10.0, 2.5, 3.5, -0.5]])  # range 15 -> s = 1 exactly, so x / s hits ties
    s, z = P.activation_qparams(x, 4, 1.0)
    assert s.item() == 1.0 and z.item() == 5.0
    q = P.quantize_activation(x, s, z, 4)
    assert q.tolist() == [[0, 5, 15, 7, 9, 5]]  # 2.5 -> 2, 3.5 -> 4, -0.5 -> -0 (ties to even), then + z
    positive = torch.tensor([[1.0, 2.0, 3.0]])  # range is extended to include 0
    _, z = P.activation_qparams(positive, 4)
    assert z.item() == 0.0
    zeros = torch.zeros(2, 8)
    assert torch.equal(P.fake_quantize_activation(zeros, 4), zeros)


def test_activation_zero_exact_and_error_bound():
    x = torch.randn(64, 256)
    x[:, 0] = 0.0
    xq = P.fake_quantize_activation(x, 4, 1.0)
    assert torch.all(xq[:, 0] == 0)
    s, _ = P.activation_qparams(x, 4, 1.0)
    assert torch.all((xq - x).abs() <= s / 2 + 1e-6)  # unclipped: error within half a step
    assert sqnr_db(x, xq) > 17  # measured 19.2 dB for Gaussian rows at 4 bits
    assert sqnr_db(x, P.fake_quantize_activation(x, 8, 1.0)) > 40  # measured 43.7 dB


def test_group_size_is_per_head():
    x = torch.randn(2, 3, 128)
    x[..., 64:] *= 100  # second head much larger
    xq = P.fake_quantize_activation(x, 4, 1.0, group_size=64)
    assert sqnr_db(x[..., :64], xq[..., :64]) > 17  # measured 20.6 dB; one range per row gives 0 dB here
    assert torch.equal(P.fake_quantize_activation(x, 16), x)
