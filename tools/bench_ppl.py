"""Perplexity / quantize-cost benchmark on the demo model: runs the CLI for each configuration, prints JSON.

Usage: python tools/bench_ppl.py [--model demo] [--max-windows 80] [--configs fp,w4a16-rtn,...] [--workdir DIR]
                                [--repeat N] [--no-eval]
Each configuration is `infoquant-export quantize ...` (timed, peak RSS) then `infoquant-export eval ... --json`,
each in its own process, so peak memory is per configuration.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CLI = [sys.executable, "-m", "infoquant_export.cli"]
W4A4KV4 = ["--w-bits", "4", "--a-bits", "4", "--kv-bits", "4"]
W4A16 = ["--w-bits", "4", "--a-bits", "16", "--kv-bits", "16"]
CONFIGS: dict[str, list[str] | None] = {
    "fp": None,
    "w4a16-rtn-noclip": [*W4A16, "--rotation", "none", "--weights", "rtn", "--no-clip-search"],
    "w4a16-rtn": [*W4A16, "--rotation", "none", "--weights", "rtn"],
    "w4a16-gptq": [*W4A16, "--rotation", "none", "--weights", "gptq"],
    "w4a4kv4-none-rtn": [*W4A4KV4, "--rotation", "none", "--weights", "rtn"],
    "w4a4kv4-none-gptq": [*W4A4KV4, "--rotation", "none", "--weights", "gptq"],
    "w4a4kv4-hadamard-rtn-noclip": [*W4A4KV4, "--rotation", "hadamard", "--weights", "rtn", "--no-clip-search"],
    "w4a4kv4-hadamard-rtn": [*W4A4KV4, "--rotation", "hadamard", "--weights", "rtn"],
    "w4a4kv4-hadamard-gptq": [*W4A4KV4, "--rotation", "hadamard", "--weights", "gptq"],
    "w16a4kv4-hadamard": ["--w-bits", "16", "--a-bits", "4", "--kv-bits", "4", "--rotation", "hadamard"],
}


def run_json(cmd: list[str]) -> dict:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--max-windows", type=int, default=80)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--workdir", default=None, help="keep artifacts here (default: a temp dir, removed)")
    parser.add_argument("--repeat", type=int, default=1, help="quantize N times; report median wall time and RSS")
    parser.add_argument("--no-eval", action="store_true", help="only time quantize")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="iq-bench-"))
    results = []
    for name in args.configs.split(","):
        flags = CONFIGS[name]
        entry: dict = {"config": name}
        target = ["--model", args.model]
        if flags is not None:
            out = work / name
            runs = []
            for _ in range(args.repeat):
                shutil.rmtree(out, ignore_errors=True)
                runs.append(run_json([*CLI, "quantize", "--model", args.model, *flags, "--out", str(out)]))
            entry.update(quantize_wall_s=statistics.median(r["wall_s"] for r in runs),
                         quantize_peak_rss_mb=statistics.median(r["peak_rss_mb"] for r in runs),
                         quantize_runs=[r["wall_s"] for r in runs],
                         command="infoquant-export quantize --model {} {}".format(args.model, " ".join(flags)))
            target = [str(out)]
        if args.no_eval:
            results.append(entry)
            print(json.dumps(entry), file=sys.stderr, flush=True)
            continue
        e = run_json([*CLI, "eval", *target, "--max-windows", str(args.max_windows), "--seq-len", str(args.seq_len),
                      "--json"])
        entry.update({k: e[k] for k in ("ppl", "tokens", "windows", "seq_len", "corpus")})
        results.append(entry)
        print(json.dumps(entry), file=sys.stderr, flush=True)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"date": datetime.date.today().isoformat(), "machine": platform.node(),
                      "cpu_count": __import__("os").cpu_count(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
