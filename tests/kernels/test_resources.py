"""Occupancy arithmetic of ``kernels.resources`` against the CUDA occupancy calculator's results."""

from __future__ import annotations

from infoquant_export.kernels.resources import resident_warps


def test_resident_warps():
    # 255 registers -> 256 per thread, 8192 per warp: 8 warps per 64K registers = two 4-warp blocks
    assert resident_warps(90, 255, 44 * 1024, 4) == 8
    # 64 registers, 8 warps, 2 KB shared: 32 warps by registers (4 blocks), within 64 warps and the shared memory
    assert resident_warps(90, 64, 2048, 8) == 32
    # 48 warps at most on sm_86 / sm_89, whatever the registers
    assert resident_warps(89, 32, 1024, 8) == 48
    # shared memory limits: 96 KB blocks -> one per sm_89 SM (100 KB), two per sm_90 SM (228 KB)
    assert resident_warps(89, 128, 96 * 1024, 4) == 4 and resident_warps(90, 128, 96 * 1024, 4) == 8
    # over the per-block limit (99 KB on sm_89): does not launch
    assert resident_warps(89, 100, 120 * 1024, 8) == 0
