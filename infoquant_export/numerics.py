"""Numerics profiles: which arithmetic the fake-quant model, the quantizers and the folds follow.

``infoquant-export`` (the default) is true W4A4KV4 with one definition for every backend (docs/numerics.md
sections 1-6). ``infoquant-reference`` reproduces the documented quirks of the InfoQuant reference code
(LLIKKE/InfoQuant @ 99657c5; docs/numerics.md section 7) for users who must match numbers published with it. The
profile is recorded in the artifact's quant config (``numerics``), so loading and eval rebuild the same model.
"""

from __future__ import annotations

from dataclasses import dataclass

from infoquant_export.errors import UserError


@dataclass(frozen=True)
class NumericsProfile:
    """Switches consulted by the model, the quantizers, the folds and the pipeline."""

    name: str
    weight_grid: str = "int"  # int: symmetric [-2^(b-1), 2^(b-1)-1]; reference: asym MSE scale, codes [-2^b, 2^b-1]
    quantize_v: bool = True  # False: the V cache stays in float (reference: K4/V16)
    o_proj_per_head_fp16: bool = False  # o_proj input per token and head, range without 0, float16 arithmetic
    separate_input_quantizers: bool = False  # q/k/v and gate/up each with their own quantizer (and LAC pair)
    center_embedding: bool = False  # embedding rows mean-centred (changes an RMSNorm model's function)
    fp16_rounding: bool = False  # float16 rounding after RMSNorm, of weights after load/fuse/each fold, down FWHT
    k_clip: float | None = None  # K cache clip (None: --kv-clip-ratio)
    lac_init: float | None = None  # LAC initial clip factor (None: --a-clip-ratio)
    exportable: bool = True  # has an ONNX mapping


PROFILES: dict[str, NumericsProfile] = {
    "infoquant-export": NumericsProfile("infoquant-export"),
    "infoquant-reference": NumericsProfile(
        "infoquant-reference", weight_grid="reference", quantize_v=False, o_proj_per_head_fp16=True,
        separate_input_quantizers=True, center_embedding=True, fp16_rounding=True, k_clip=0.9, lac_init=0.95,
        exportable=False),
}
DEFAULT = "infoquant-export"


def get_profile(name: str) -> NumericsProfile:
    """The profile called ``name``; a UserError naming the valid ones otherwise."""
    if name not in PROFILES:
        raise UserError(f"invalid --numerics {name!r}", f"use one of {', '.join(PROFILES)}")
    return PROFILES[name]
