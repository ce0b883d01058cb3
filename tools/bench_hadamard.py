"""CPU cost of the online Hadamard (``apply_hadamard``, the fake-quant model's and the exporter's definition) for
each construction of one size, timed side by side in one process.

    python tools/bench_hadamard.py [--n 11008] [--rows 2048] [--repeat 7]

For 11008 that is this build's Williamson 172 x 64 next to the Paley 344 x 32 of schema versions 1-2. Prints JSON:
per construction the median milliseconds over ``--repeat`` interleaved runs, the float64 multiply-adds of the
``H_K^T`` step per row (``K^2 * p``), and whether the result is orthogonal-equivalent (same row norms).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from infoquant_export.transforms import hadamard as hm


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=11008)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    factors = {"this build": hm.hadamard_factors(args.n), "paley only": hm.hadamard_factors(args.n, False)}
    x = torch.randn(args.rows, args.n, generator=torch.Generator().manual_seed(0))
    norms = x.double().norm(dim=1)
    times: dict[str, list[float]] = {name: [] for name in factors}
    rel_norm_err = {}
    for _ in range(args.repeat):  # interleaved: both constructions see the same machine load
        for name, (k, p) in factors.items():
            start = time.perf_counter()
            y = hm._apply_factored(x, 1, k, p)
            times[name].append((time.perf_counter() - start) * 1e3)
            rel_norm_err[name] = float(((y.double().norm(dim=1) - norms).abs() / norms).max())
    rows = {name: {"K": k, "p": p, "median_ms": statistics.median(times[name]), "runs_ms": times[name],
                   "k_step_float64_macs_per_row": k * k * p, "max_rel_row_norm_error": rel_norm_err[name]}
            for name, (k, p) in factors.items()}
    base = rows["paley only"]["median_ms"]
    print(json.dumps({"n": args.n, "rows": args.rows, "repeat": args.repeat, "threads": torch.get_num_threads(),
                      "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                      "constructions": rows,
                      "speedup_vs_paley_only": base / rows["this build"]["median_ms"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
