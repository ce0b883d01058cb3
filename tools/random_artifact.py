"""Write a random-weight W4A4KV4 artifact of a real LLaMA shape (no download, no calibration): for engine-build
and export benchmarks at sizes the demo model does not reach.

    python tools/random_artifact.py --shape tinyllama --layers 22 --out DIR     (TinyLlama-1.1B shape)

Shapes: llama2-7b, tinyllama, smollm2-135m (``infoquant_export.kernels.random_model``). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from infoquant_export.artifact import save_artifact
from infoquant_export.config import QuantConfig
from infoquant_export.fsutil import atomic_output_dir
from infoquant_export.kernels.random_model import SHAPES, random_w4a4kv4_model
from infoquant_export.models.model import LINEAR_ROLES
from infoquant_export.quant.weights import QuantizedWeight
from infoquant_export.transforms.rotate import hadamard_schema


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama")
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    start = time.perf_counter()
    with torch.no_grad():
        model = random_w4a4kv4_model(args.shape, args.layers, "cpu", args.seed)
        cfg = model.cfg
        weights = {f"layers.{i}.{role}": QuantizedWeight(getattr(layer, f"codes_{role}").to(torch.int8),
                                                         getattr(layer, f"wscale_{role}")[:, None], 4)
                   for i, layer in enumerate(model.layers) for role in LINEAR_ROLES}
        with atomic_output_dir(args.out) as tmp:
            save_artifact(tmp, model, None, QuantConfig(rotation="hadamard", weights="rtn"),
                          hadamard_schema(cfg.hidden_size, cfg.head_dim, cfg.intermediate_size),
                          {"random": args.shape, "layers": args.layers, "seed": args.seed}, weights)
    print(json.dumps({"out": args.out, "shape": args.shape, "layers": args.layers,
                      "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
