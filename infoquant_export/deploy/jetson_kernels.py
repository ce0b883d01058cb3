"""Compile the Triton kernels for Jetson Orin (sm_87) to PTX + cubin: ``python -m infoquant_export.deploy.jetson_kernels
OUT [TARGET]``. Runs in its own process because compilation needs ``TRITON_INTERPRET=0``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # before the kernels are imported: compile, do not interpret


def compile_target(out: Path, target: str = "sm_87") -> dict:
    from infoquant_export.kernels.aot import TARGETS, compile_spec, default_specs

    (out / target).mkdir(parents=True)
    entries = {}
    for spec in default_specs(TARGETS[target]):
        res = compile_spec(spec, TARGETS[target])
        (out / target / f"{spec.name}.ptx").write_text(res["ptx"])
        (out / target / f"{spec.name}.cubin").write_bytes(res["cubin"])
        entries[spec.name] = {"mma": res["mma"], "shared_bytes": res["shared_bytes"],
                              "cubin_bytes": len(res["cubin"]), "sha256": res["sha256"]}
    manifest = {"targets": {target: entries}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


if __name__ == "__main__":
    compile_target(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "sm_87")
