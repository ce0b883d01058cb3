"""Write plugin test cases (plugin-side inputs + ONNX Runtime's outputs of the same node) for the GPU tests.

    python tools/plugin_cases.py MODEL.onnx [MODEL2.onnx ...] --out DIR [--rows 6] [--seed 0]

Runs here (ONNX Runtime on the CPU); the GPU machine, which has no ONNX Runtime, reads DIR through
``INFOQUANT_PLUGIN_CASES=DIR pytest -m gpu tests/gpu/test_plugins_gpu.py``. Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx

from infoquant_export.trt.node_reference import plugin_cases


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("onnx", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--rows", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = []
    rng = np.random.default_rng(args.seed)
    for m, path in enumerate(args.onnx):
        model = onnx.load(path)
        for half in (False, True):
            for rows in (1, args.rows, 37):  # decode, a small batch, an odd prefill
                for i, case in enumerate(plugin_cases(model, rng, rows=rows, half=half)):
                    name = f"m{m}-{'h' if half else 'f'}{rows}-{i:02d}-{case.op_type}.npz"
                    case.save(out / name)
                    summary.append({"file": name, "model": Path(path).name, "node": case.node_name,
                                    "inputs": [list(a.shape) for a, _ in case.inputs]})
    print(json.dumps({"cases": len(summary), "out": str(out), "files": summary[:4]}))


if __name__ == "__main__":
    main()
