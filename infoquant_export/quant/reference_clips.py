"""Apply the InfoQuant reference code's LAC clips (``clip_parameters.pth``) under the infoquant-reference profile.

The reference has one quantizer per linear input (q, k, v, gate, up separately), a per-head o_proj quantizer and a
never-used V output quantizer; the infoquant-reference profile has the same layout (``SEPARATE_SITES``), so every
logit pair maps to one quantizer. The factors are ``0.5 * fp16(1 + fp16(sigmoid(fp16(c))))``, as the reference
computes them from its float16 logits.
"""

from __future__ import annotations

import torch

from infoquant_export.models.model import CausalLM
from infoquant_export.transforms.infoquant_import import reference_clip_factor

REFERENCE_CLIP_SITES = {
    "self_attn.q_proj.quantizer": "qkv_in", "self_attn.k_proj.quantizer": "k_in",
    "self_attn.v_proj.quantizer": "v_in", "self_attn.o_proj.quantizer": "o_in",
    "mlp.gate_proj.quantizer": "gate_up_in", "mlp.up_proj.quantizer": "up_in", "mlp.down_proj.quantizer": "down_in",
}
UNUSED_CLIPS = ("self_attn.v_proj.out_quantizer",)  # configured by the reference but never applied (V unquantized)


def apply_reference_clips(model: CausalLM, clips: dict[int, dict[str, torch.Tensor]]) -> dict[str, int]:
    """Set the clip factors of every quantizer named in ``clips`` ({layer: {name: logits}}, validated by the
    importer); quantizers without an entry keep their static clip. Returns counts (applied / ignored pairs)."""
    applied = ignored = 0
    for index, entries in clips.items():
        layer = model.layers[index]
        for prefix, site in REFERENCE_CLIP_SITES.items():
            if f"{prefix}.clip_factor_a_max" not in entries:
                continue
            q = getattr(layer, site)
            pair = [reference_clip_factor(entries[f"{prefix}.clip_factor_a_{end}"]).reshape(-1)
                    for end in ("max", "min")]
            if q.groups == 1 and pair[0].numel() != 1:
                raise ValueError(f"{prefix}: {pair[0].numel()} clip factors for a per-token quantizer")
            q.set_clips(torch.stack(pair))
            applied += 1
        ignored += sum(f"{prefix}.clip_factor_a_max" in entries for prefix in UNUSED_CLIPS)
    return {"applied_pairs": applied, "ignored_pairs": ignored}
