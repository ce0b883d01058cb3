"""Perplexity table of the demo model: FP, Hadamard+RTN, Hadamard+GPTQ, PSOT+GPTQ, PSOT+LAC+GPTQ (W4A4KV4).

Runs each configuration through the CLI (``quantize`` then ``eval --json``) one after another and prints one JSON
object with the perplexity on the held-out evaluation split, the quantize wall time and its per-stage seconds.
Usage: python tools/bench_psot_table.py --out-root /tmp/bench [--preset cpu] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CLI = [sys.executable, "-m", "infoquant_export.cli"]
CONFIGS = {
    "hadamard-rtn": ["--rotation", "hadamard", "--weights", "rtn"],
    "hadamard-gptq": ["--rotation", "hadamard", "--weights", "gptq"],
    "psot-gptq": ["--rotation", "psot", "--weights", "gptq"],
    "psot-lac-gptq": ["--rotation", "psot", "--lac", "--weights", "gptq"],
}


def run_json(args: list[str]) -> dict:
    out = subprocess.run(args, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-root", required=True)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--only", nargs="*", default=None)
    p.add_argument("--eval-windows", type=int, default=None, help="limit evaluation windows (default: all)")
    args = p.parse_args()
    root = Path(args.out_root)
    root.mkdir(parents=True, exist_ok=True)
    limit = ["--max-windows", str(args.eval_windows)] if args.eval_windows else []
    rows = {}
    if not args.only or "fp" in args.only:
        rows["fp"] = {"ppl": run_json([*CLI, "eval", "--model", "demo", "--json", *limit])["ppl"]}
    for name, flags in CONFIGS.items():
        if args.only and name not in args.only:
            continue
        out = root / name
        start = time.perf_counter()
        if not out.exists():
            summary = subprocess.run([*CLI, "quantize", "--model", "demo", "--preset", args.preset, *flags,
                                      "--out", str(out)], check=True, capture_output=True, text=True).stdout
            quantize = json.loads(summary)
        else:
            quantize = {"note": "artifact existed; not re-quantized"}
        wall = time.perf_counter() - start
        ev = run_json([*CLI, "eval", str(out), "--json", *limit])
        rows[name] = {"ppl": ev["ppl"], "quantize_wall_s": round(wall, 1),
                      "stage_seconds": quantize.get("stage_seconds"), "psot_effect": quantize.get("psot_effect")}
        print(json.dumps({name: rows[name]}), file=sys.stderr, flush=True)
    print(json.dumps({"preset": args.preset, "eval_tokens": ev.get("tokens"), "corpus": ev.get("corpus"),
                      "rows": rows}))


if __name__ == "__main__":
    main()
