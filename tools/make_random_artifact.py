"""Write a random-weight W4A4KV4 Hadamard artifact of a given LLaMA shape (for export scale tests).

    python tools/make_random_artifact.py --shape tinyllama --out /tmp/tinyllama-random

Codes are uniform in [-8, 7] with per-channel scales 0.01; no tokenizer. Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from infoquant_export.artifact import FORMAT, FORMAT_VERSION
from infoquant_export.config import QuantConfig
from infoquant_export.fsutil import atomic_output_dir
from infoquant_export.models.model import LINEAR_ROLES, ModelConfig
from infoquant_export.quant.primitives import pack_int4
from infoquant_export.transforms.rotate import hadamard_schema

SHAPES = {
    "tinyllama": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
                      num_kv_heads=4, head_dim=64),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                         num_kv_heads=3, head_dim=64),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    cfg = ModelConfig(family="llama", rms_norm_eps=1e-5, **SHAPES[args.shape])
    h, d = cfg.hidden_size, cfg.head_dim
    gen = torch.Generator().manual_seed(args.seed)
    outs = {"q": cfg.num_heads * d, "k": cfg.num_kv_heads * d, "v": cfg.num_kv_heads * d, "o": h,
            "gate": cfg.intermediate_size, "up": cfg.intermediate_size, "down": h}
    ins = {"q": h, "k": h, "v": h, "o": cfg.num_heads * d, "gate": h, "up": h, "down": cfg.intermediate_size}
    tensors = {"embed.weight": torch.randn(cfg.vocab_size, h, generator=gen) * 0.02,
               "lm_head.weight": torch.randn(cfg.vocab_size, h, generator=gen) * 0.02,
               "norm": torch.ones(h), "inv_freq": 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))}
    weight_bits = {}
    for i in range(cfg.num_layers):
        tensors[f"layers.{i}.input_norm"] = torch.ones(h)
        tensors[f"layers.{i}.post_norm"] = torch.ones(h)
        for role in LINEAR_ROLES:
            codes = torch.randint(-8, 8, (outs[role], ins[role]), generator=gen, dtype=torch.int8)
            tensors[f"layers.{i}.{role}.qweight"] = pack_int4(codes)
            tensors[f"layers.{i}.{role}.scale"] = torch.full((outs[role], 1), 0.01)
            weight_bits[f"layers.{i}.{role}"] = 4
    quant = QuantConfig(rotation="hadamard", weights="rtn")
    schema = hadamard_schema(h, d, cfg.intermediate_size)
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "infoquant_export_version": "random",
              "model": cfg.to_dict(), "quant": quant.to_dict(), "source": {"kind": "random", "shape": args.shape},
              "biases": dict.fromkeys(LINEAR_ROLES, False), "weight_bits": weight_bits}
    with atomic_output_dir(Path(args.out)) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": FORMAT})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "transforms.json").write_text(schema.to_json())
    print(json.dumps({"out": args.out, "shape": args.shape,
                      "params": sum(v.numel() * (2 if k.endswith("qweight") else 1) for k, v in tensors.items())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
