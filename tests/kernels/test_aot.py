"""Ahead-of-time compilation (infoquant_export/kernels/aot.py, tools/compile_kernels.py): PTX and cubin for sm_80-90
on a machine without a GPU, with the int8 tensor-core instructions the GEMM is designed for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[2]
SPECS = ["w4a4_gemm_m2048_k4096", "w4a4_gemm_m1_k4096", "hadamard_quantize_4096"]


def compile_kernels(tmp_path: Path, out: Path, targets: str, specs: list[str] = SPECS,
                    variants: bool = False) -> subprocess.CompletedProcess:
    """The tool in a fresh process. TRITON_INTERPRET=1 is inherited on purpose (this test process sets it when there
    is no GPU): the tool must switch it off itself. A private Triton cache makes it really compile. ``variants``:
    the specs may name performance variants (``--variants``)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "TRITON_CACHE_DIR": str(tmp_path / "triton-cache")}
    return subprocess.run([sys.executable, str(REPO / "tools" / "compile_kernels.py"), "--out", str(out),
                           "--targets", targets, *(["--variants"] if variants else []), "--only", ",".join(specs)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_compile_sm90_and_sm80(tmp_path):
    out = tmp_path / "kernels"
    proc = compile_kernels(tmp_path, out, "sm_90,sm_80")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert json.loads(proc.stdout) == manifest
    assert sorted(manifest["targets"]) == ["sm_80", "sm_90"]
    for target in ("sm_80", "sm_90"):
        assert sorted(manifest["targets"][target]) == sorted(SPECS)
        for spec in SPECS:
            ptx = (out / target / f"{spec}.ptx").read_text()
            cubin = (out / target / f"{spec}.cubin").read_bytes()
            entry = manifest["targets"][target][spec]
            assert f".target {target}" in ptx  # sm_90 may be sm_90a
            assert cubin[:4] == b"\x7fELF" and len(cubin) == entry["cubin_bytes"] > 0
    sm90 = (out / "sm_90" / "w4a4_gemm_m2048_k4096.ptx").read_text()
    sm80 = (out / "sm_80" / "w4a4_gemm_m2048_k4096.ptx").read_text()
    # Hopper: warpgroup MMA on int8 operands with an int32 accumulator (the nibbles are unpacked to int8)
    assert "wgmma.mma_async" in sm90 and ".s32.s8.s8" in sm90
    assert "mma.sync" not in sm90
    assert all(m.startswith("wgmma.mma_async") and ".s32.s8.s8" in m
               for m in manifest["targets"]["sm_90"]["w4a4_gemm_m2048_k4096"]["mma"])
    # Ampere: IMMA m16n8k32 on int8
    assert "wgmma" not in sm80
    assert "mma.sync.aligned.m16n8k32.row.col.satfinite.s32.s8.s8.s32" in sm80
    # no float MMA anywhere in the GEMMs, and none in the quantize kernel
    for target in ("sm_80", "sm_90"):
        for spec in SPECS:
            mma = manifest["targets"][target][spec]["mma"]
            assert all(".s8.s8" in m for m in mma)
        assert manifest["targets"][target]["hadamard_quantize_4096"]["mma"] == []
        assert manifest["targets"][target]["w4a4_gemm_m1_k4096"]["mma"]  # the M=1 GEMM uses tensor cores too
    # the Hadamard(4096) + quantize kernel as the JIT specialises it, with its FWHT in one pass (rows.FWHT_TWO_PASS):
    # measured sm_90 63 registers / 32 resident warps (two passes: 80 / 24)
    assert manifest["targets"]["sm_90"]["hadamard_quantize_4096"]["resident_warps"] >= 32
    assert manifest["targets"]["sm_90"]["hadamard_quantize_4096"]["registers"] <= 72
    # the nibbles are unpacked four bytes per instruction (inline PTX), not byte by byte: no PRMT in the main loop, and
    # a short loop. Measured instructions per K step (bytes -> words): sm_90 M=2048 1353 -> 334, M=1 675 -> 160;
    # sm_80 M=2048 523, M=1 172.
    for target, limits in (("sm_90", {"w4a4_gemm_m2048_k4096": 450, "w4a4_gemm_m1_k4096": 250}),
                           ("sm_80", {"w4a4_gemm_m2048_k4096": 700, "w4a4_gemm_m1_k4096": 250})):
        for spec, limit in limits.items():
            loop = manifest["targets"][target][spec]["mma_loop"]
            assert loop["prmt"] == 0 and loop["instructions"] < limit, (target, spec, loop)
            assert "0x0F0F0F0F" in (out / target / f"{spec}.ptx").read_text()


def test_quantize_divides_without_div_rn(tmp_path):
    """The compiled quantize kernels divide by the row's scale with ``common.div_by`` (a multiply and two FMAs,
    exact: tests/kernels/test_div_by.py), not ``div.rn.f32`` per element (a reciprocal on the special-function
    unit, four FMAs and a slow-path branch): on sm_80 and sm_90 few MUFU and no divergent region are left."""
    sys.path.insert(0, str(REPO))
    from infoquant_export.kernels.resources import sass_opcodes

    out = tmp_path / "kernels"
    specs = ["quantize_4096", "hadamard_quantize_4096", "rmsnorm_quantize_4096"]
    proc = compile_kernels(tmp_path, out, "sm_80,sm_90", specs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for target in ("sm_80", "sm_90"):
        for spec in specs:
            ops = sass_opcodes((out / target / f"{spec}.cubin").read_bytes())
            # measured sm_90 / sm_80: MUFU 5 / 5 / 10, BSSY 1 / 1-2 / 1 (the reductions' regions); with div.rn per
            # element MUFU 36 / 36 / 41 and BSSY 36 each. Static counts on sm_90 784 / 1464 / 1264 instructions
            # against 1064 / 1736 / 1536 (the specs as the JIT compiles them: tests/kernels/test_aot_specs.py)
            assert ops["MUFU"] <= 12 and ops["BSSY"] <= 3, (target, spec, ops["MUFU"], ops["BSSY"])
            assert "fma.rn.f32" in (out / target / f"{spec}.ptx").read_text(), (target, spec)


def test_gluon_fwht_keeps_stages_in_registers(tmp_path):
    """The Gluon Hadamard + quantize kernel (``quantize_gluon``: every FWHT stage along an axis each thread holds in
    its registers, two layout conversions between) issues fewer warp-instructions per 4096 row than the ``tl`` row
    kernel, with fewer block barriers and shuffles, and the same FADDs (the butterflies themselves)."""
    sys.path.insert(0, str(REPO))
    from infoquant_export.kernels.resources import sass_opcodes

    out = tmp_path / "kernels"
    proc = compile_kernels(tmp_path, out, "sm_90", ["hadamard_quantize_4096", "hadamard_quantize_4096_gluon"],
                           variants=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    entries = json.loads(proc.stdout)["targets"]["sm_90"]
    tl_ops = sass_opcodes((out / "sm_90" / "hadamard_quantize_4096.cubin").read_bytes())
    gl_ops = sass_opcodes((out / "sm_90" / "hadamard_quantize_4096_gluon.cubin").read_bytes())
    # measured (4 warps each): 1184 against 1464 instructions per thread; BAR 9 / 28, SHFL 14 / 46, FSEL 0 / 96,
    # FADD 454 / 454; 56 / 63 registers, 36 / 32 resident warps
    assert sum(gl_ops.values()) < 0.85 * sum(tl_ops.values()), (sum(gl_ops.values()), sum(tl_ops.values()))
    assert gl_ops["BAR"] < tl_ops["BAR"] // 2 and gl_ops["SHFL"] < tl_ops["SHFL"] // 2, (gl_ops, tl_ops)
    assert gl_ops["FADD"] == tl_ops["FADD"], (gl_ops["FADD"], tl_ops["FADD"])
    gl_entry = entries["hadamard_quantize_4096_gluon"]
    assert gl_entry["spill_store_bytes"] == 0
    assert gl_entry["resident_warps"] >= entries["hadamard_quantize_4096"]["resident_warps"]


def test_mma_decode_keeps_the_cache_in_registers(tmp_path):
    """The Gluon decode attention (``attention_mma``) unpacks the 4-bit cache into the float16 mma.sync operands in
    the registers of the threads that loaded it: m16n8k16 MMAs, no shared memory, barrier or spill in its token
    loop (its layout conversions are asserted trivial at compile time), and far fewer instructions per cached code
    than the CUDA-core kernel ``ccs`` (per thread and loop iteration; codes per warp and iteration: mma BTW x D x 2,
    ccs BT x D x 2 / warps). With 2 stages (the next step's loads in registers, its token indices clamped) the
    16-token step keeps as many resident warps."""
    out = tmp_path / "kernels"
    mma = {"kv4_decode_mma_g1_d128_bt32_w4": (128, 32), "kv4_decode_mma_g3_d64_bt32_w4": (64, 32),
           "kv4_decode_mma_g1_d128_bt16_w4_s2": (128, 16)}
    proc = compile_kernels(tmp_path, out, "sm_86,sm_90", [*mma, "kv4_decode_ccs_g1_d128_bt64_w4_s1"], variants=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    targets = json.loads(proc.stdout)["targets"]
    # measured lane-instructions per code, sm_90 / sm_86: ccs 4.69 / 5.70 (600 / 729 per thread); mma D = 128
    # 2.57 / 2.56 (657 / 656), D = 64 (the demo model's heads, G = 3) 3.42 / 3.28, 2 stages 16 tokens 3.27 / 3.27
    # (418; 128 / 127 registers, 16 resident warps on both)
    limits = {"kv4_decode_mma_g1_d128_bt32_w4": 0.7, "kv4_decode_mma_g3_d64_bt32_w4": 0.8,
              "kv4_decode_mma_g1_d128_bt16_w4_s2": 0.8}
    for target, entries in targets.items():
        ccs = entries["kv4_decode_ccs_g1_d128_bt64_w4_s1"]
        ccs_per_code = ccs["hot_loop"]["instructions"] * 32 / (64 * 128 * 2 / 4)
        for name, (d, bt) in mma.items():
            e = entries[name]
            loop = e["mma_loop"]
            assert e["mma"] == ["mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"], (target, name, e["mma"])
            # scores: (BTW / 8) n-tiles x (D / 16) k-chunks; values: (D / 16) m-tiles x (BTW / 16) k-chunks
            assert loop["mma"] == bt // 8 * d // 16 + d // 16 * bt // 16, (target, name, loop)
            assert loop["shared"] == 0 and loop["local"] == 0, (target, name, loop)
            # measured: 0 bytes, except 16 for D = 64 on sm_90 (in the masked last step, after the loop)
            assert e["spill_store_bytes"] <= 16, (target, name, e)
            per_code = loop["instructions"] * 32 / (bt * d * 2)
            assert per_code < limits[name] * ccs_per_code, (target, name, per_code, ccs_per_code)
            assert e["resident_warps"] >= (16 if bt == 16 else 12), (target, name, e["resident_warps"])


ASM_OPERANDS = """
import json, re, sys
from infoquant_export.kernels import aot
spec = next(s for s in aot.decode_mma_specs() if s.name == sys.argv[1])
llir = aot.compile_spec(spec, 90)["llir"]
calls = [line[line.rindex('"(') + 2:] for line in llir.splitlines() if "asm" in line and "lop3.b32" in line]
print(json.dumps([re.findall(r"(i32|<2 x half>) (%\\w+)", c) for c in calls]))
"""


def test_mma_decode_asm_gets_one_word_or_a_token_pair(tmp_path):
    """The unpacking asm is not element-wise: element j of its pack is nibble PI[j] of the pack's word (K), or of
    word A / B alternately (V: two tokens). That holds if Triton hands each asm call the consecutive registers of its
    layout (``KW4``: the 8 elements of one word; ``VW4``: a token pair x 8 elements), which the compiled LLVM IR
    shows: every K call gets one word value 8 times and one (1024 + z, -(64 + z)) pair value 4 times each; every V
    call gets two word values alternating, and one pair value per z operand group."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "triton-cache")}
    proc = subprocess.run([sys.executable, "-c", ASM_OPERANDS, "kv4_decode_mma_g1_d128_bt32_w4"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = json.loads(proc.stdout)
    k_calls = [c for c in calls if len(c) == 16]
    v_calls = [c for c in calls if len(c) == 32]
    # a masked and an unmasked step: (32 tokens / 8) x (128 / 32) words per thread for K, 8 token pairs for V
    assert len(k_calls) == 2 * 16 and len(v_calls) == 2 * 8 and len(calls) == len(k_calls) + len(v_calls)
    for c in k_calls:
        assert [t for t, _ in c] == ["i32"] * 8 + ["<2 x half>"] * 8
        assert len({v for _, v in c[:8]}) == len({v for _, v in c[8:12]}) == len({v for _, v in c[12:]}) == 1
    for c in v_calls:
        assert [t for t, _ in c] == ["i32"] * 16 + ["<2 x half>"] * 16
        a, b = c[0][1], c[1][1]
        assert a != b and [v for _, v in c[:16]] == [a, b] * 8
        assert len({v for _, v in c[16:24]}) == len({v for _, v in c[24:]}) == 1


def test_k_step_float64_tensor_cores(tmp_path):
    """The 11008 = 172 x 64 Hadamard's K step is a float64 GEMM, and so is the row kernel's fused K step (1536 =
    12 x 128): DMMA on sm_80 / sm_90 (float64 tensor cores), none on sm_89; no spills anywhere. The FWHT before
    the K-step kernel (chunked, float32 out) is small: measured 44-72 registers (it was 248-250 as a 16384-value
    row tile)."""
    out = tmp_path / "kernels"
    specs = ["hadamard_k_step_172x64", "swiglu_fwht_11008_172x64", "hadamard_quantize_1536_k12"]
    proc = compile_kernels(tmp_path, out, "sm_80,sm_89,sm_90", specs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    targets = json.loads(proc.stdout)["targets"]
    for spec in ("hadamard_k_step_172x64", "hadamard_quantize_1536_k12"):  # the fused K step of 12 x 128 too
        assert targets["sm_90"][spec]["mma"] == ["mma.sync.aligned.m16n8k16.row.col.f64.f64.f64.f64"]
        assert targets["sm_80"][spec]["mma"] == ["mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64"]
        assert targets["sm_89"][spec]["mma"] == []
    for target, entries in targets.items():
        for name, e in entries.items():
            assert e["spill_store_bytes"] == 0 and e["resident_warps"] >= 12, (target, name, e)  # measured 12-40
        assert entries["swiglu_fwht_11008_172x64"]["registers"] <= 96, target  # measured 44-72


def test_loops_pipelined_by_stages(tmp_path):
    """The CUDA-core decode kernel's token loop and the chunked quantize kernel's chunk loops ask Triton for
    ``STAGES`` themselves (a loop without a dot is not pipelined by the launch's num_stages): with STAGES=3 their
    loads reach shared memory by cp.async (LDGSTS in the loop, fewer loads into registers), with STAGES=1 not at
    all, and the pipelining costs no occupancy. sm_90 and sm_86 (an RTX target, where TensorRT-RTX runs). Also the
    decode kernel's per-slot softmax (``SLOTS``): no barrier left in its loop."""
    out = tmp_path / "kernels"
    pairs = [("kv4_decode_cc_g1_d128_bt64_w4", "kv4_decode_cc_g1_d128_bt64_w4_s3"),
             ("quantize_chunked_1024_s1", "quantize_chunked_1024_s3")]
    slots = "kv4_decode_ccs_g1_d128_bt64_w4_s1"
    proc = compile_kernels(tmp_path, out, "sm_90,sm_86", [*(n for p in pairs for n in p), slots], variants=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for target, entries in json.loads(proc.stdout)["targets"].items():
        for flat_name, piped_name in pairs:
            flat, piped = entries[flat_name], entries[piped_name]
            # measured sm_90 / sm_86: decode LDGSTS 0 -> 8, LDG 12 -> 4 (the uint8 zero points stay LDG), 635 -> 671
            # and 756 -> 792 instructions per iteration, 168 registers, 12 resident warps both; quantize LDGSTS
            # 0 -> 1, LDG 4 -> 0, 131 -> 115 and 130 -> 123 instructions, 48 resident warps both
            assert flat["hot_loop"]["ldgsts"] == 0 and piped["hot_loop"]["ldgsts"] >= 1, (target, flat, piped)
            assert piped["hot_loop"]["ldg"] < flat["hot_loop"]["ldg"], (target, flat, piped)
            assert piped["resident_warps"] == flat["resident_warps"] >= 12, (target, flat, piped)
            assert piped["hot_loop"]["instructions"] < 1.15 * flat["hot_loop"]["instructions"], (target, flat, piped)
        # the per-slot running max ("ccs") leaves the token loop without block-wide reductions: measured barriers
        # 6 -> 0 and instructions 635 -> 600 (sm_90), 756 -> 729 (sm_86), registers and resident warps unchanged
        flat, slot = entries["kv4_decode_cc_g1_d128_bt64_w4"], entries[slots]
        assert flat["hot_loop"]["bar"] > 0 and slot["hot_loop"]["bar"] == 0, (target, flat, slot)
        assert slot["hot_loop"]["instructions"] < flat["hot_loop"]["instructions"], (target, flat, slot)
        assert slot["resident_warps"] == flat["resident_warps"], (target, flat, slot)


def test_persistent_tma_gemm_fits_sm90(tmp_path):
    """The persistent tensor-descriptor GEMM variants (one program per SM looping over the tiles, the loop flattened
    so that the next tile's loads overlap this tile's epilogue) compile for sm_90 with warpgroup int8 MMAs, no
    spills, and shared memory within the 227 KB a block may use (flattening multi-buffers the epilogue tiles too:
    128 x 256 planes at 3 stages would need 272 KB, so that tile runs 2)."""
    sys.path.insert(0, str(REPO))
    from infoquant_export.kernels.aot import gemm_tma_persistent_specs

    names = [s.name for s in gemm_tma_persistent_specs()]
    proc = compile_kernels(tmp_path, tmp_path / "k", "sm_90", names, variants=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    entries = json.loads(proc.stdout)["targets"]["sm_90"]
    assert sorted(entries) == sorted(names)
    for name, e in entries.items():
        assert all(m.startswith("wgmma.mma_async") and ".s32.s8.s8" in m for m in e["mma"]) and e["mma"], name
        # measured: 182-247 registers, no spills, 128-224 KB shared, 8 resident warps, 10-20 TMA copies
        assert e["spill_store_bytes"] == 0 and e["resident_warps"] == 8 and e["tma_loads"] >= 3, (name, e)


def test_wgmma_gemm_keeps_int8_mmas_in_flight(tmp_path):
    """Triton 3.6 ends every K step of an int8 ``tl.dot`` loop by draining the tensor cores (its pipeliner keeps
    only float32 accumulators in flight): each wait in the tensor-descriptor kernel's loop is ``DEPBAR.LE gsb0, 0``.
    The Gluon kernel waits for ``<= 1`` group instead, so the next K step's int8 MMAs queue behind the running ones
    (ptxas did not serialize them again: that needs one path to the zeroed accumulator, no guarded prologue)."""
    sys.path.insert(0, str(REPO))
    from infoquant_export.kernels.aot import gemm_wgmma_specs

    names = [s.name for s in gemm_wgmma_specs()]
    tma = "w4a4_gemm_tma_planes_128x256x64_w8_s4"
    proc = compile_kernels(tmp_path, tmp_path / "k", "sm_90", [*names, tma], variants=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    entries = json.loads(proc.stdout)["targets"]["sm_90"]
    # measured: the tensor-descriptor kernel's loop waits [0, 0] (one per dot), ptx wait_group [0]
    assert entries[tma]["mma_loop"]["mma_waits"] and set(entries[tma]["mma_loop"]["mma_waits"]) == {0}, entries[tma]
    for name in names:
        e = entries[name]
        assert all(m.startswith("wgmma.mma_async") and ".s32.s8.s8" in m for m in e["mma"]) and e["mma"], name
        # measured: loop waits [1] (ptx wait_group [0, 1]: 0 after the loop), 82-177 instructions per K step,
        # 142-255 registers, 4-8 resident warps
        assert e["mma_loop"]["mma_waits"] == [1] and e["mma_waits"] == [0, 1], (name, e["mma_loop"])
        assert e["resident_warps"] >= 4 and e["mma_loop"]["local"] == 0, (name, e)
        # measured: no spills, but 92 bytes in 128 x 256's epilogue (the residual tile next to 128 accumulators)
        # and 500 / 588 bytes in the persistent kernels' per-tile epilogues (none in the K loop: local == 0)
        limit = 600 if "persistent" in name else 96 if "128x256" in name else 0
        assert e["spill_store_bytes"] <= limit, (name, e)
    assert entries["w4a4_gemm_wgmma_planes_128x128x64_w4_s3"]["resident_warps"] == 8  # two programs per SM


def test_unknown_target_exits_2_without_output(tmp_path):
    out = tmp_path / "kernels"
    proc = compile_kernels(tmp_path, out, "sm_90,sm_70")
    assert proc.returncode == 2
    assert "unknown target(s) ['sm_70']" in proc.stderr and "sm_80" in proc.stderr
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no partial output directory beside it either


def test_gemm_tiles_fit_every_target(tmp_path):
    """Every GEMM tile the runtime may launch (``ops.gemm_tables`` per target, ``GEMM_TMA_TILES`` on sm_90), packed
    and plane operands, compiled by ptxas for each target: it launches there (shared memory within the block limit)
    and, on sm_80-89 and for the TMA kernel, holds everything in registers (no spills). The sm_90 pointer tiles were
    timed on H100 / H200 and keep their measured spills (e.g. 256x128x128: 255 registers + 140 bytes)."""
    sys.path.insert(0, str(REPO))
    from infoquant_export.kernels.aot import TARGETS, gemm_tma_specs

    env = {**os.environ, "TRITON_INTERPRET": "1", "TRITON_CACHE_DIR": str(tmp_path / "triton-cache")}
    groups = [["sm_80", "sm_86", "sm_87"], ["sm_89", "sm_90"]]  # two processes, two cores
    procs = [subprocess.Popen([sys.executable, str(REPO / "tools" / "compile_kernels.py"), "--out",
                               str(tmp_path / f"k{i}"), "--targets", ",".join(g), "--tiles"], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i, g in enumerate(groups)]
    for proc in procs:
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
    targets = {}
    for i in range(len(groups)):
        targets.update(json.loads((tmp_path / f"k{i}" / "manifest.json").read_text())["targets"])
    assert sorted(targets) == sorted(TARGETS)
    tma = {s.name for s in gemm_tma_specs()}
    for target, entries in targets.items():
        tiles = {n: e for n, e in entries.items() if n.startswith("w4a4_gemm_tile_") or n in tma}
        assert len(tiles) >= 15, target  # measured 15 (sm_80-89), 37 (sm_90: 16 pointer + 21 TMA)
        for name, e in tiles.items():
            assert e["resident_warps"] > 0, (target, name, e)  # launches: shared memory <= the block limit
            assert e["mma"] and all(".s32.s8.s8" in m for m in e["mma"]), (target, name)  # int8 tensor cores
            if target != "sm_90" or name in tma:
                assert e["spill_store_bytes"] == 0, (target, name, e)  # measured 0 everywhere
        if target == "sm_90":
            for name in tma:
                e = entries[name]
                assert e["tma_loads"] >= 3, (name, e)  # operand tiles and the output through TMA (measured 8-22)
                if "_16x" not in name:  # 64+ rows: warpgroup MMA (16-row tiles use mma.sync m16n8k32)
                    assert all(m.startswith("wgmma.mma_async") for m in e["mma"]), name
            # the default M = 2048 pointer tile spills on sm_90 (measured 140 bytes): the figures are real
            assert entries["w4a4_gemm_m2048_k4096"]["spill_store_bytes"] > 0
        else:
            assert all(e["tma_loads"] == 0 for e in tiles.values())
