"""Time engine builds (TensorRT-RTX on the CPU works: no GPU needed) and report plan sizes, as JSON.

    python tools/bench_trt_build.py MODEL.onnx [--sm 89] [--runs 3] [--precision fp32]

Each run is a fresh process (``infoquant-export build --json``), so import and plugin registration are included in
``total_s`` and the builder's own time is ``build_s``; medians over the runs; peak RSS from the child's rusage.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("onnx")
    p.add_argument("--sm", default="89")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--precision", default="fp32")
    args = p.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-trt-") as tmp:
        for i in range(args.runs):
            plan = Path(tmp) / f"run{i}.plan"
            start = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "infoquant_export.cli", args.onnx, "--engine", str(plan),
                                  "--sm", args.sm, "--precision", args.precision, "--json"],
                                 capture_output=True, text=True, check=True)
            wall = time.perf_counter() - start
            result = json.loads(out.stdout.strip().splitlines()[-1])
            runs.append({"wall_s": round(wall, 2), "build_s": result["build_seconds"],
                         "plan_mb": result["plan_mb"], "plugin_layers": sum(result["plugin_layers"].values())})
            plan.unlink()
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"onnx": args.onnx, "sm": args.sm, "precision": args.precision, "runs": runs,
                      "median_build_s": statistics.median(r["build_s"] for r in runs),
                      "median_wall_s": statistics.median(r["wall_s"] for r in runs),
                      "plan_mb": runs[0]["plan_mb"], "plugin_layers": runs[0]["plugin_layers"],
                      "peak_rss_mb": round(peak)}))


if __name__ == "__main__":
    main()
