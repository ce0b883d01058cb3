"""What a compiled kernel costs on a target, read on a machine without a GPU: registers and spills (ptxas -v), the
machine code of its main loop (cuobjdump -sass), resident warps per SM (the CUDA occupancy limits). Triton's bundled
tools; used by ``aot.compile_spec`` and ``tools/compile_kernels.py``."""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections import Counter
from typing import Any


def _tool(name: str) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(90).path.rsplit("/", 1)[0] + "/" + name


# Per SM: (max resident warps, registers, shared memory, shared memory one block may use, max blocks) -- the CUDA
# occupancy tables of each compute capability
SM_LIMITS = {80: (64, 65536, 164 * 1024, 163 * 1024, 32), 86: (48, 65536, 100 * 1024, 99 * 1024, 16),
             87: (48, 65536, 164 * 1024, 163 * 1024, 16), 89: (48, 65536, 100 * 1024, 99 * 1024, 24),
             90: (64, 65536, 228 * 1024, 227 * 1024, 32)}


def resident_warps(cc: int, registers: int, shared_bytes: int, num_warps: int) -> int:
    """Warps of this kernel resident on one SM (occupancy), from its registers per thread (allocated per warp in
    units of 256), shared memory per block (+1 KB the driver reserves) and the SM's limits. Few resident warps
    means few loads in flight: a memory-bound kernel then waits on latency instead of bandwidth."""
    max_warps, regs, smem, block_smem, max_blocks = SM_LIMITS[cc]
    if shared_bytes > block_smem:
        return 0  # does not launch (OutOfResources)
    per_warp = -(-registers * 32 // 256) * 256
    blocks = min(max_blocks, max_warps // num_warps, regs // (per_warp * num_warps) if per_warp else max_blocks,
                 smem // (shared_bytes + 1024))
    return blocks * num_warps


def _sass(cubin: bytes, operands: bool = False) -> tuple[list[tuple], list[tuple[int, int]]]:
    """(address, opcode) -- with ``operands``, (address, opcode, operands) -- of every instruction and (address,
    target) of every backward branch in the cubin's SASS (the bundled cuobjdump): the loops."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    line = r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?"
    code = [(int(a, 16), op, args.strip()) if operands else (int(a, 16), op)
            for a, op, args in re.findall(line + r"([A-Z][A-Z0-9_.]*)([^;\n]*)", sass)]
    branches = [(int(a, 16), int(t, 16)) for a, t in re.findall(line + r"BRA\s+0x([0-9a-f]+)", sass)]
    return code, [(a, t) for a, t in branches if t < a]


def sass_opcodes(cubin: bytes) -> Counter:
    """How many times each SASS opcode (without modifiers) appears in the cubin: e.g. ``MUFU`` (the special-function
    unit: reciprocals of ``div.rn``, exponentials) or ``BSSY`` (a divergent region such as a slow path)."""
    return Counter(op.split(".")[0] for _, op in _sass(cubin)[0])


def _loop_ops(code: list[tuple[int, str]], start: int, end: int) -> Counter:
    return Counter(op.split(".")[0] for a, op in code if start <= a <= end)


def mma_loop(cubin: bytes) -> dict[str, Any] | None:
    """The machine code (SASS) of the kernel's main loop: the innermost backward branch whose body holds
    tensor-core instructions. Returns its instruction count, MMA instructions and the counts of the
    byte-shuffling / integer ops (PRMT, LOP3, SHF, IMAD) -- the cost of unpacking per K step -- or None.
    ``mma_waits``: the operand of each warpgroup-MMA wait in the loop (``WARPGROUP.DEPBAR.LE gsb0, N``: wait until
    at most N MMA groups are in flight): [0] when each K step drains the tensor cores, one 0 per MMA when ptxas
    serialized them, [1] when the next step's MMAs queue behind the running ones. ``local``: spill loads / stores
    (LDL / STL) in the loop; ``shared``: shared-memory loads / stores (LDS, STS, LDSM) and block barriers (BAR)."""
    full, loops = _sass(cubin, operands=True)
    code = [(a, op) for a, op, _ in full]
    best = None
    for addr, target in loops:
        ops = _loop_ops(code, target, addr)
        mma = sum(n for op, n in ops.items() if op in ("IGMMA", "HGMMA", "IMMA", "HMMA", "DMMA"))
        if mma and (best is None or sum(ops.values()) < best["instructions"]):
            waits = [int(m.group(1), 16) for a, op, args in full if target <= a <= addr and op == "WARPGROUP.DEPBAR.LE"
                     for m in [re.search(r"gsb0,\s*(0x[0-9a-f]+)", args)] if m]
            best = {"instructions": sum(ops.values()), "mma": mma, "mma_waits": waits,
                    "local": ops.get("LDL", 0) + ops.get("STL", 0),
                    "shared": sum(ops.get(op, 0) for op in ("LDS", "STS", "LDSM", "BAR")),
                    **{op.lower(): ops.get(op, 0) for op in ("PRMT", "LOP3", "SHF", "IMAD")}}
    return best


def hot_loop(cubin: bytes) -> dict[str, Any] | None:
    """The largest innermost loop of the SASS (no other loop inside it): what one iteration issues per thread.
    ``ldgsts``: asynchronous global -> shared copies (cp.async: a software-pipelined loop), ``ldg``: loads into
    registers (the thread waits for them in the iteration), ``bar``: block-wide barriers, ``fp32`` / ``int``: the
    FADD / FMUL / FFMA and LOP3 / IADD3 / SHF / IMAD / PRMT instructions. None without loops."""
    code, loops = _sass(cubin)
    inner = [(a, t) for a, t in loops if not any(t <= t2 and a2 <= a and (a2, t2) != (a, t) for a2, t2 in loops)]
    best = None
    for addr, target in inner:
        ops = _loop_ops(code, target, addr)
        if best is None or sum(ops.values()) > best["instructions"]:
            best = {"instructions": sum(ops.values()), "ldgsts": ops.get("LDGSTS", 0), "ldg": ops.get("LDG", 0),
                    "bar": ops.get("BAR", 0), "fp32": sum(ops.get(op, 0) for op in ("FADD", "FMUL", "FFMA")),
                    "int": sum(ops.get(op, 0) for op in ("LOP3", "IADD3", "SHF", "IMAD", "PRMT"))}
    return best


def ptxas_resources(ptx: str, cc: int) -> dict[str, int]:
    """Registers per thread, spill store / load bytes and stack frame of ``ptx`` assembled for ``cc`` by Triton's
    bundled ptxas (``-v``, the options Triton uses). 255 registers plus spills means the tile does not fit the
    register file: local-memory traffic in the kernel (a static fact, no GPU needed)."""
    from triton.backends.nvidia.compiler import get_ptxas

    arch = f"sm_{cc}a" if cc == 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as tmp:
        src = f"{tmp}/k.ptx"
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([get_ptxas(cc).path, "-v", f"--gpu-name={arch}", src, "-o", f"{tmp}/k.cubin"],
                             capture_output=True, text=True, check=True).stderr

    def grab(pattern: str) -> int:
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0

    return {"registers": grab(r"Used (\d+) registers"), "spill_store_bytes": grab(r"(\d+) bytes spill stores"),
            "spill_load_bytes": grab(r"(\d+) bytes spill loads"), "stack_bytes": grab(r"(\d+) bytes stack frame")}
