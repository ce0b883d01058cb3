"""Compile every kernel specialisation to PTX and cubin for sm_80/86/87/89/90 on a CPU machine.

    python tools/compile_kernels.py --out build/kernels [--targets sm_90,sm_87] [--only w4a4_gemm_m2048_k4096]
        [--variants]

Writes ``OUT/<target>/<spec>.ptx`` / ``.cubin`` and ``OUT/manifest.json``; prints the manifest (JSON): per target
and spec the MMA instructions in the PTX, shared memory, registers and spill bytes (ptxas -v), resident warps
per SM (occupancy), TMA copies in the PTX, the main loop's machine instructions (``mma_loop``: count, MMAs, PRMT /
LOP3 / SHF / IMAD, from the SASS), the largest innermost loop's (``hot_loop``: count, cp.async copies, loads, barriers,
float / integer ops), cubin size and sha256, compile seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # before the kernels are imported: compile, do not interpret

from infoquant_export.errors import UserError  # noqa: E402
from infoquant_export.fsutil import atomic_output_dir  # noqa: E402
from infoquant_export.kernels.aot import TARGETS, compile_spec, default_specs, tile_specs, variant_specs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="new output directory")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated, from " + ",".join(TARGETS))
    p.add_argument("--only", default=None, help="comma-separated spec names")
    p.add_argument("--variants", action="store_true", help="also the performance variants (aot.variant_specs)")
    p.add_argument("--tiles", action="store_true", help="also every GEMM tile the runtime may launch (aot.tile_specs)")
    args = p.parse_args(argv)
    try:
        targets = [t.strip() for t in args.targets.split(",") if t.strip()]
        unknown = [t for t in targets if t not in TARGETS]
        if unknown:
            raise UserError(f"unknown target(s) {unknown}", f"choose from {', '.join(TARGETS)}")
        wanted = set(args.only.split(",")) if args.only else None

        def specs_for(cc: int) -> list:
            specs = default_specs(cc) + (variant_specs(cc) if args.variants else []) + \
                (tile_specs(cc) if args.tiles else [])
            return [s for s in specs if wanted is None or s.name in wanted]

        if not any(specs_for(TARGETS[t]) for t in targets):
            raise UserError(f"no spec named {sorted(wanted or [])}", "see default_specs() in kernels/aot.py")
        manifest: dict = {"targets": {}}
        with atomic_output_dir(Path(args.out)) as tmp:
            for target in targets:
                (tmp / target).mkdir()
                entries = manifest["targets"][target] = {}
                for spec in specs_for(TARGETS[target]):
                    start = time.perf_counter()
                    res = compile_spec(spec, TARGETS[target])
                    (tmp / target / f"{spec.name}.ptx").write_text(res["ptx"])
                    (tmp / target / f"{spec.name}.cubin").write_bytes(res["cubin"])
                    entries[spec.name] = {"mma": res["mma"], "shared_bytes": res["shared_bytes"],
                                          "registers": res["registers"],
                                          "spill_store_bytes": res["spill_store_bytes"],
                                          "spill_load_bytes": res["spill_load_bytes"],
                                          "tma_loads": res["tma_loads"], "mma_waits": res["mma_waits"],
                                          "resident_warps": res["resident_warps"],
                                          "mma_loop": res["mma_loop"], "hot_loop": res["hot_loop"],
                                          "cubin_bytes": len(res["cubin"]), "sha256": res["sha256"],
                                          "seconds": round(time.perf_counter() - start, 2)}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(manifest, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
