"""Ahead-of-time compilation of the kernels to PTX and cubin for every target, on a machine without a GPU.

``triton.compile`` with a ``GPUTarget`` needs no device (Triton bundles ptxas). Each :class:`KernelSpec` is one
specialisation the runtime launches (the same tile configs as ``ops.gemm_config`` / ``ops.row_tile``). Run in a
process with ``TRITON_INTERPRET=0`` (the interpreter's kernels cannot be compiled): ``tools/compile_kernels.py``.
"""

from __future__ import annotations

import hashlib
import inspect
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from infoquant_export.kernels import interpreted, kernel_module
from infoquant_export.kernels.attention import decode_tile
from infoquant_export.kernels.k_step import K_STEP_TILE
from infoquant_export.kernels.linear import (
    GEMM_TMA_TILES,
    GEMM_WGMMA_PERSISTENT_TILES,
    GEMM_WGMMA_TILES,
    gemm_candidates,
    gemm_config,
    gemm_tables,
)
from infoquant_export.kernels.resources import hot_loop, mma_loop, ptxas_resources, resident_warps
from infoquant_export.kernels.rows import (
    FAST_DIV,
    FEW_ROWS_WARPS,
    PRE_NONE,
    PRE_RMSNORM,
    PRE_ROPE,
    PRE_SCALE,
    PRE_SWIGLU,
    _inv_sqrt,
    fwht_split,
    k_dot,
    row_tile,
    row_warps,
)

COMPILE_DEFAULTS = {"num_warps": 4, "num_stages": 3, "enable_fp_fusion": False}  # a spec's options override them
TARGETS = {"sm_80": 80, "sm_86": 86, "sm_87": 87, "sm_89": 89, "sm_90": 90}  # A100, RTX 30, Orin, RTX 40, H100


@dataclass(frozen=True)
class KernelSpec:
    """One compiled specialisation: kernel, argument types, constexpr values and launch options."""

    name: str
    module: str
    kernel: str
    types: dict[str, str]                      # runtime argument -> Triton type ("*u8", "i32", "fp32", ...)
    constexprs: dict[str, Any]
    divisible: tuple[str, ...] = ()            # arguments known to be multiples of 16 (pointers, strides)
    options: dict[str, int] = field(default_factory=dict)


# The GEMM arguments the JIT marks divisible by 16 at run time on LLaMA shapes (torch allocations are 16-byte
# aligned; M = 2048, N and K multiples of 16): the AOT specialisations declare the same, so their code, registers
# and spills are the ones a GPU runs (arguments a kernel lacks are ignored).
_RUNTIME_DIVISIBLE = ("a_ptr", "a_scale_ptr", "a_zero_ptr", "w_ptr", "w_scale_ptr", "w_rowsum_ptr", "bias_ptr",
                      "res_ptr", "y_ptr", "M", "N", "K2", "stride_am", "stride_ap", "stride_wn", "stride_wp",
                      "stride_rm", "stride_ym")


def _gemm(name: str, m: int, k: int, out: str, cc: int = 90, cfg: dict[str, int] | None = None) -> KernelSpec:
    """A ``w4a4_gemm_kernel`` specialisation: the default tile on ``cc`` (or ``cfg``)."""
    cfg = dict(cfg or gemm_config(m, k // 2, cc))
    opts = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    types = {"a_ptr": "*u8", "a_scale_ptr": "*fp32", "a_zero_ptr": "*u8", "w_ptr": "*u8", "w_scale_ptr": "*fp32",
             "w_rowsum_ptr": "*i32", "bias_ptr": "*fp32", "res_ptr": f"*{out}", "y_ptr": f"*{out}", "M": "i32",
             "N": "i32", "K2": "i32", "stride_am": "i32", "stride_wn": "i32", "stride_rm": "i32", "stride_ym": "i32"}
    consts = {"HAS_BIAS": False, "HAS_RES": True, "WORDS": True, **cfg}
    if m == 1:  # the JIT turns an integer argument equal to 1 into a constant
        del types["M"]
        consts["M"] = 1
    return KernelSpec(name, "gemm", "w4a4_gemm_kernel", types, consts, _RUNTIME_DIVISIBLE, opts)


def _gemm_v2(name: str, m: int, k: int, out: str, a_planes: bool, w_planes: bool, swap: bool,
             tile: int = 0, cc: int = 90, cfg: dict[str, int] | None = None) -> KernelSpec:
    """A ``w4a4_gemm_v2_kernel`` variant with the ``tile``-th plane tile of its M bucket on ``cc`` (or ``cfg``)."""
    cfg = dict(cfg or gemm_candidates(m, k // 2, gemm_tables(cc)[1])[tile])
    opts = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    types = {"a_ptr": "*i8" if a_planes else "*u8", "a_scale_ptr": "*fp32", "a_zero_ptr": "*u8",
             "w_ptr": "*i8" if w_planes else "*u8", "w_scale_ptr": "*fp32", "w_rowsum_ptr": "*i32",
             "bias_ptr": "*fp32", "res_ptr": f"*{out}", "y_ptr": f"*{out}", "M": "i32", "N": "i32", "K2": "i32",
             "stride_am": "i32", "stride_ap": "i32", "stride_wn": "i32", "stride_wp": "i32", "stride_rm": "i32",
             "stride_ym": "i32"}
    return KernelSpec(name, "gemm", "w4a4_gemm_v2_kernel", types,
                      {"HAS_BIAS": False, "HAS_RES": True, "WORDS": True, "A_PLANES": a_planes, "W_PLANES": w_planes,
                       "SWAP": swap,
                       **cfg},
                      _RUNTIME_DIVISIBLE, opts)


def gemm_tma_spec(name: str, tile: dict[str, int], out: str, a_planes: bool, w_planes: bool) -> KernelSpec:
    """A ``w4a4_gemm_tma_kernel`` specialisation for one tile config (``BM BN BK2 GROUP_M num_warps num_stages``)."""
    cfg = dict(tile)
    opts = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    a_t, w_t = ("i8" if a_planes else "u8"), ("i8" if w_planes else "u8")
    types = {"a_desc": f"tensordesc<{a_t}[{cfg['BM']}, {cfg['BK2']}]>", "a_scale_ptr": "*fp32", "a_zero_ptr": "*u8",
             "w_desc": f"tensordesc<{w_t}[{cfg['BN']}, {cfg['BK2']}]>", "w_scale_ptr": "*fp32",
             "w_rowsum_ptr": "*i32", "bias_ptr": "*fp32", "res_desc": f"tensordesc<{out}[{cfg['BM']}, {cfg['BN']}]>",
             "y_desc": f"tensordesc<{out}[{cfg['BM']}, {cfg['BN']}]>", "M": "i32", "N": "i32", "K2": "i32"}
    return KernelSpec(name, "gemm", "w4a4_gemm_tma_kernel", types,
                      {"HAS_BIAS": False, "HAS_RES": True, "WORDS": True, "A_PLANES": a_planes,
                       "W_PLANES": w_planes, "PERSISTENT": False, "NUM_SMS": 1, **cfg},
                      _RUNTIME_DIVISIBLE, opts)


def gemm_wgmma_spec(name: str, tile: tuple[int, ...], out: str = "fp16", persistent: bool = False) -> KernelSpec:
    """A ``gemm_wgmma.w4a4_gemm_wgmma_kernel`` specialisation (Gluon, sm_90; int8 planes of both operands) for a
    tile ``(BM, BN, BK2, GROUP_M, num_warps, stages)`` in the other GEMMs' terms: a K step reads ``2 * BK2`` int8
    columns of each operand's planes."""
    from triton.experimental.gluon import language as gl

    bm, bn, bk2, group_m, warps, stages = tile
    layout = {rows: gl.NVMMASharedLayout.get_default_for([rows, 2 * bk2], gl.int8) for rows in (bm, bn)}
    out_layout = gl.NVMMASharedLayout.get_default_for([bm, bn], gl.float16 if out == "fp16" else gl.float32)
    types = {"a_desc": f"tensordesc<i8[{bm}, {2 * bk2}],{layout[bm]}>", "a_scale_ptr": "*fp32", "a_zero_ptr": "*u8",
             "w_desc": f"tensordesc<i8[{bn}, {2 * bk2}],{layout[bn]}>", "w_scale_ptr": "*fp32",
             "w_rowsum_ptr": "*i32", "bias_ptr": "*fp32", "res_desc": f"tensordesc<{out}[{bm}, {bn}],{out_layout}>",
             "y_desc": f"tensordesc<{out}[{bm}, {bn}],{out_layout}>", "M": "i32", "N": "i32", "K": "i32"}
    consts = {"HAS_BIAS": False, "HAS_RES": True, "GROUP_M": group_m, "STAGES": stages,
              "ACC_LAYOUT": kernel_module("gemm_wgmma").mma_layout(bm, bn, warps),
              **({"NUM_PROGRAMS": 132} if persistent else {})}  # an H100 / H200's SMs
    kernel = "w4a4_gemm_wgmma_persistent_kernel" if persistent else "w4a4_gemm_wgmma_kernel"
    return KernelSpec(name, "gemm_wgmma", kernel, types, consts,
                      ("a_scale_ptr", "a_zero_ptr", "w_scale_ptr", "w_rowsum_ptr", "bias_ptr", "M", "N", "K"),
                      {"num_warps": warps})


def gemm_wgmma_specs() -> list[KernelSpec]:
    """Every ``GEMM_WGMMA_TILES`` tile and the persistent kernel's ``GEMM_WGMMA_PERSISTENT_TILES``, fp16 out (sm_90
    only: wgmma and TMA)."""
    return [gemm_wgmma_spec("w4a4_gemm_wgmma_planes_{}x{}x{}_w{}_s{}".format(*t[:3], *t[4:]), t)
            for t in GEMM_WGMMA_TILES] + \
        [gemm_wgmma_spec("w4a4_gemm_wgmma_persistent_planes_{}x{}x{}_w{}_s{}".format(*t[:3], *t[4:]), t,
                         persistent=True) for t in GEMM_WGMMA_PERSISTENT_TILES]


def quantize_gluon_spec(name: str, n: int, x: str = "fp16") -> KernelSpec:
    """A ``quantize_gluon.hadamard_quantize_gluon_kernel`` specialisation: rows of ``n`` values (one Hadamard block),
    n / 1024 warps, as ``quantize_rows_variant(..., gluon=True)`` launches it for 2048 rows."""
    warps = n // 1024
    row, lanes, warps_l, bytes_l = kernel_module("quantize_gluon").row_layouts(warps)
    types = {"x_ptr": f"*{x}", "stride_xr": "i32", "codes_ptr": "*u8", "stride_cr": "i32", "scale_ptr": "*fp32",
             "zero_ptr": "*u8", "inv_sqrt": "fp32", "clip": "fp32", "clip_min": "fp32"}
    consts = {"W": warps, "LOG2W": warps.bit_length() - 1, "FAST_DIV": FAST_DIV, "ROW": row, "LANES": lanes,
              "WARPS": warps_l, "BYTES": bytes_l}
    return KernelSpec(name, "quantize_gluon", "hadamard_quantize_gluon_kernel", types, consts,
                      ("x_ptr", "stride_xr", "codes_ptr", "stride_cr", "scale_ptr", "zero_ptr"), {"num_warps": warps})


# What the JIT marks divisible by 16 in a row-kernel launch of 2048 prefill tokens (the AOT row specs' shape): every
# pointer, the row / code / scale strides, 2048 rows, position 0 and the first row 0 (a KV cache of 4096 positions
# adds t_cap). tests/kernels/test_aot_specs.py checks each spec against its wrapper's recorded launch.
_ROWS_DIVISIBLE = ("x_ptr", "hk_ptr", "scratch_ptr", "codes_ptr", "scale_ptr", "zero_ptr", "y_ptr", "pos_ptr",
                   "aux_ptr", "aux2_ptr", "stride_xr", "stride_yr", "seq_len", "pos0", "stride_cb", "stride_ct",
                   "stride_cj", "stride_sb", "stride_st", "stride_sj", "up_offset", "row0")


def _rows(name: str, n: int, blocks: int, rotate: bool, per_block: bool, x: str, pre: int = PRE_NONE,
          quant: bool = True, cc: int = 90, decode: bool = False, row_scale: float = 1.0) -> KernelSpec:
    """A ``hadamard_quantize_kernel`` specialisation for ``cc`` at 2048 prefill tokens; ``pre``: its prologue
    (RMSNorm: float64 eps operand). The wrappers pass the scale tensor (quantizing) or the output (not) for the
    pointers a launch does not use; a quantized row's scale has stride 1 over tokens (a constant to the JIT).
    ``decode``: one token of a served decode step instead (a sequence length of 1, ``rows.FEW_ROWS_WARPS`` warps,
    the KV cache position read from device memory)."""
    tile = row_tile(n, blocks, rotate)
    unused = "*fp32" if quant else f"*{x}"
    types = {"x_ptr": f"*{x}", "stride_xr": "i32", "hk_ptr": "*fp32" if tile.k > 1 else unused,
             "scratch_ptr": "*fp32", "inv_sqrt": "fp32", "codes_ptr": "*u8" if quant else unused, "scale_ptr": unused,
             "zero_ptr": "*u8" if quant else unused, "y_ptr": unused if quant else f"*{x}", "stride_yr": "i32",
             "seq_len": "i32", "pos0": "i32", "pos_ptr": "*i32", "t_cap": "i32",
             "stride_cb": "i32", "stride_ct": "i32", "stride_cj": "i32", "stride_sb": "i32", "stride_st": "i32",
             "stride_sj": "i32", "clip": "fp32", "clip_min": "fp32",
             "aux_ptr": "*fp32", "aux2_ptr": "*fp64" if pre == PRE_RMSNORM else "*fp32", "up_offset": "i32",
             "row0": "i32"}
    consts = {**tile.constexprs(), "QUANT": quant, "PER_BLOCK": per_block, "BITS": 4, "PLANES": False,
              "PRE": pre, "ROUND": pre in (PRE_RMSNORM, PRE_SWIGLU) or (pre == PRE_ROPE and not quant),
              "ROW_SCALE": row_scale, "POS_PTR": decode and per_block, "K_DOT": k_dot(cc), "SLICED": False,
              "FAST_DIV": FAST_DIV, "FWHT_SPLIT": fwht_split(quant)}
    for arg in ("stride_st",) * quant + ("seq_len",) * decode:  # integers equal to 1: constants to the JIT
        del types[arg]
        consts[arg] = 1
    divisible = _ROWS_DIVISIBLE + (("t_cap",) if per_block else ())
    return KernelSpec(name, "quantize", "hadamard_quantize_kernel", types, consts, divisible,
                      {"num_warps": FEW_ROWS_WARPS if decode else row_warps(tile.elements)})


def _chunked(name: str, chunk: int, pre: int = PRE_NONE, rot_p: int = 0, quant: bool = True, x: str = "fp16",
             row_scale: float = 1.0, stages: int = 1, chunk_grid: bool = False) -> KernelSpec:
    """A ``quantize_rows_chunked_kernel`` specialisation (``quant=False``: float32 out; ``chunk_grid``: a program
    per chunk, as for the few rows of a decode step)."""
    types = {"x_ptr": f"*{x}", "stride_xr": "i32", "codes_ptr": "*u8" if quant else "*fp32", "stride_cr": "i32",
             "scale_ptr": "*fp32", "zero_ptr": "*u8" if quant else "*fp32", "n": "i32", "clip": "fp32",
             "clip_min": "fp32", "up_offset": "i32", "aux_ptr": "*fp32"}
    return KernelSpec(name, "quantize", "quantize_rows_chunked_kernel", types,
                      {"CH": chunk, "PLANES": False, "PRE": pre, "ROUND": pre == PRE_SWIGLU, "ROW_SCALE": row_scale,
                       "ROT_P": rot_p, "LOG2P": max(rot_p, 1).bit_length() - 1,
                       "ROT_SCALE": rot_p ** -0.5 if rot_p and quant else 1.0, "QUANT": quant, "STAGES": stages,
                       "FAST_DIV": FAST_DIV, "CHUNK_GRID": chunk_grid},
                      # n: the JIT marks 4096 / 11008 / 14336 divisible by 16 at run time (vector loads under the mask)
                      ("x_ptr", "codes_ptr", "scale_ptr", "zero_ptr", "aux_ptr", "stride_xr", "stride_cr", "n",
                       "up_offset"), {"num_warps": 4})


def k_step_spec(name: str, k: int, p: int) -> KernelSpec:
    """The ``hadamard_k_step_kernel`` of a K x p Hadamard with ``ops.K_STEP_TILE``."""
    ba, bk, bc, warps = K_STEP_TILE
    return KernelSpec(name, "quantize", "hadamard_k_step_kernel",
                      {"y_ptr": "*fp32", "out_ptr": "*fp32", "ht_ptr": "*fp32", "n_cols": "i32", "out_scale": "fp32"},
                      {"K": k, "P": p, "LOG2P": p.bit_length() - 1, "KB": -(-k // bk) * bk, "BA": ba, "BK": bk,
                       "BC": bc, "SCALE": False},
                      ("y_ptr", "out_ptr", "ht_ptr", "n_cols"), {"num_warps": warps})  # n_cols: rows x p


def _decode(name: str, group: int, head_dim: int) -> KernelSpec:
    gp, bt = decode_tile(group)
    types = {"q_ptr": "*fp16", "stride_qb": "i32", "stride_qh": "i32", "kc_ptr": "*u8", "ks_ptr": "*fp32",
             "kz_ptr": "*u8", "vc_ptr": "*u8", "vs_ptr": "*fp32", "vz_ptr": "*u8", "stride_cb": "i32",
             "stride_ch": "i32", "stride_ct": "i32", "stride_sb": "i32", "stride_sh": "i32", "len_ptr": "*i32",
             "part_o_ptr": "*fp32", "part_m_ptr": "*fp32", "part_l_ptr": "*fp32", "num_kv_heads": "i32",
             "chunk": "i32", "max_len": "i32", "qk_scale": "fp32"}
    return KernelSpec(name, "attention", "kv4_decode_partial_kernel", types,
                      {"G": group, "GP": gp, "D": head_dim, "BT": bt, "SPLITS": 8, "DOT": 1},
                      # what the JIT sees at run time: every pointer and cache stride a multiple of 16 (capacity % 16),
                      # the split's chunk of tokens and max_len (a context of 4096)
                      ("q_ptr", "kc_ptr", "ks_ptr", "kz_ptr", "vc_ptr", "vs_ptr", "vz_ptr", "len_ptr", "part_o_ptr",
                       "part_m_ptr", "part_l_ptr", "stride_qb", "stride_qh", "stride_cb", "stride_ch", "stride_ct",
                       "stride_sb", "stride_sh", "chunk", "max_len"),
                      {"num_warps": 4, "enable_fp_fusion": True})  # as ops launches it (float attention, FMAs)


def decode_cc_spec(name: str, group: int, head_dim: int, block_t: int, num_warps: int,
                   stages: int = 1, slots: bool = False) -> KernelSpec:
    """A ``kv4_decode_partial_cc_kernel`` specialisation (float16 q, 8 splits, ``stages`` in its token loop,
    ``slots``: a running max per token slot)."""
    base = _decode(name, group, head_dim)
    return KernelSpec(name, "attention", "kv4_decode_partial_cc_kernel", {**base.types, "magic_bits": "i32"},
                      {"G": group, "D": head_dim, "BT": block_t, "SPLITS": 8, "STAGES": stages, "SLOTS": slots},
                      (*base.divisible, "magic_bits"),  # the float 2^23 (0x4B000000)
                      {"num_warps": num_warps, "num_stages": stages, "enable_fp_fusion": True})


def decode_mma_spec(name: str, group: int, head_dim: int, block_t: int, num_warps: int,
                    prefetch: bool = False) -> KernelSpec:
    """A ``attention_mma.kv4_decode_partial_mma_kernel`` specialisation (Gluon; float16 q, 8 splits, ``block_t``
    tokens per warp and step, ``prefetch``: 2 stages), as ``kv4_decode_attention(..., kernel="mma")`` launches it."""
    base = _decode(name, group, head_dim)
    layouts = kernel_module("attention_mma").decode_mma_layouts(num_warps, head_dim)
    return KernelSpec(name, "attention_mma", "kv4_decode_partial_mma_kernel", base.types,
                      {"G": group, "D": head_dim, "BTW": block_t, "SPLITS": 8, "PREFETCH": prefetch, **layouts},
                      base.divisible,
                      {"num_warps": num_warps, "enable_fp_fusion": True})


def decode_mma_specs() -> list[KernelSpec]:
    """The mma decode kernel's specialisations: LLaMA-2-7B heads (G = 1, D = 128) at 16 / 32 / 64 tokens per warp
    (16 / 32 also with 2 stages), a GQA group of 4 (LLaMA-3-8B) and the demo model's heads (G = 3, D = 64)."""
    return [*(decode_mma_spec(f"kv4_decode_mma_g1_d128_bt{bt}_w4", 1, 128, bt, 4) for bt in (16, 32, 64)),
            *(decode_mma_spec(f"kv4_decode_mma_g1_d128_bt{bt}_w4_s2", 1, 128, bt, 4, True) for bt in (16, 32)),
            decode_mma_spec("kv4_decode_mma_g4_d128_bt32_w4", 4, 128, 32, 4),
            decode_mma_spec("kv4_decode_mma_g3_d64_bt32_w4", 3, 64, 32, 4)]


def default_specs(cc: int = 90) -> list[KernelSpec]:
    """The specialisations of LLaMA-2-7B (hidden 4096, intermediate 11008, 32 heads of 128) and the demo model that
    the runtime launches by default on compute capability ``cc``."""
    return [
        _gemm("w4a4_gemm_m1_k4096", 1, 4096, "fp16", cc),
        _gemm("w4a4_gemm_m64_k4096", 64, 4096, "fp16", cc),
        _gemm("w4a4_gemm_m2048_k4096", 2048, 4096, "fp16", cc),
        _rows("quantize_4096", 4096, 1, False, False, "fp16", cc=cc),
        _rows("hadamard_quantize_4096", 4096, 1, True, False, "fp16", cc=cc),
        _rows("hadamard_quantize_1536_k12", 1536, 1, True, False, "fp32", cc=cc),
        _rows("kv_hadamard_quantize_32x128", 4096, 32, True, True, "fp16", cc=cc),
        # the decoder's fused prologues (kernels/model.py): norm + quantize, q RoPE + Hadamard, K RoPE + Hadamard +
        # cache quantize, SwiGLU + Hadamard + quantize (the demo model's 1536 = 12 x 128)
        _rows("rmsnorm_quantize_4096", 4096, 1, False, False, "fp16", PRE_RMSNORM, cc=cc),
        _rows("rope_hadamard_q_32x128", 4096, 32, True, False, "fp16", PRE_ROPE, quant=False, cc=cc),
        _rows("kv_rope_hadamard_quantize_32x128", 4096, 32, True, True, "fp16", PRE_ROPE, cc=cc),
        _rows("swiglu_hadamard_quantize_1536_k12", 1536, 1, True, False, "fp16", PRE_SWIGLU, cc=cc),
        # LLaMA-2-7B's down_proj input, 11008 = 172 x 64: SwiGLU + FWHT (float32 out), the float64 K step, the
        # chunked quantize of the float32 rows with the 1/sqrt(n) scale
        _chunked("swiglu_fwht_11008_172x64", 1024, PRE_SWIGLU, 64, quant=False),
        k_step_spec("hadamard_k_step_172x64", 172, 64),
        _chunked("scale_quantize_11008", 1024, PRE_SCALE, x="fp32", row_scale=_inv_sqrt(11008)),
        _decode("kv4_decode_g1_d128", 1, 128),
        _decode("kv4_decode_g3_d64", 3, 64),
    ]


def gemm_tma_persistent_specs(sms: int = 132) -> list[KernelSpec]:
    """The persistent tensor-descriptor GEMM variants of ``tools/bench_kernels.py`` (``PERSISTENT``, one program per
    SM of an H100 / H200 (132), M = 2048 tiles)."""
    keys = ("BM", "BN", "BK2", "GROUP_M", "num_warps", "num_stages")
    specs = []
    for layout, planes, t in (("planes", True, (128, 256, 64, 8, 8, 2)), ("planes", True, (128, 128, 64, 8, 8, 4)),
                              ("packed", False, (128, 256, 64, 8, 8, 3)), ("packed", False, (128, 128, 128, 8, 8, 3))):
        spec = gemm_tma_spec("w4a4_gemm_tma_persistent_{}_{}x{}x{}_w{}_s{}".format(layout, *t[:3], *t[4:]),
                             dict(zip(keys, t, strict=True)), "fp16", planes, planes)
        specs.append(KernelSpec(spec.name, spec.module, spec.kernel, spec.types,
                                {**spec.constexprs, "PERSISTENT": True, "NUM_SMS": sms}, spec.divisible, spec.options))
    return specs


def gemm_tma_specs() -> list[KernelSpec]:
    """Every ``GEMM_TMA_TILES`` tile with each operand layout (packed / activation planes / both planes), fp16 out."""
    keys = ("BM", "BN", "BK2", "GROUP_M", "num_warps", "num_stages")
    specs = []
    for t in dict.fromkeys(t for tiles in GEMM_TMA_TILES.values() for t in tiles):  # each tile once, in order
        tile = dict(zip(keys, t, strict=True))
        for layout, a_planes, w_planes in (("packed", False, False), ("aplanes", True, False), ("planes", True, True)):
            name = "w4a4_gemm_tma_{}_{}x{}x{}_w{}_s{}".format(layout, *t[:3], *t[4:])
            specs.append(gemm_tma_spec(name, tile, "fp16", a_planes, w_planes))
    return specs


def tile_specs(cc: int) -> list[KernelSpec]:
    """Every GEMM tile ``ops`` may launch on ``cc`` (``gemm_tables``; on sm_90 also ``GEMM_TMA_TILES``), packed and
    plane operands, K = 4096, fp16 out: the static check that each fits the target (``--tiles``)."""
    keys = ("BM", "BN", "BK2", "GROUP_M", "num_warps", "num_stages")
    packed, planes = gemm_tables(cc)
    specs = []
    for layout, tables in (("packed", packed), ("planes", planes)):
        for t in dict.fromkeys(t for tiles in tables.values() for t in tiles):
            name = "w4a4_gemm_tile_{}_{}x{}x{}_w{}_s{}".format(layout, *t[:3], *t[4:])
            cfg = dict(zip(keys, t, strict=True))
            specs.append(_gemm(name, 2048, 4096, "fp16", cc, cfg) if layout == "packed" else
                         _gemm_v2(name, 2048, 4096, "fp16", True, True, False, cc=cc, cfg=cfg))
    return specs + (gemm_tma_specs() if cc == 90 else [])


def variant_specs(cc: int = 90) -> list[KernelSpec]:
    """The performance variants (``tools/bench_kernels.py --sections variants``) at LLaMA-2-7B prefill shapes:
    the GEMM operand layouts, the planar and chunked activation quantization, the TMA GEMM (sm_90), the CUDA-core
    and the mma.sync (Gluon) decode attention."""
    planes = _rows("hadamard_quantize_4096_planes", 4096, 1, True, False, "fp16", cc=cc)
    return [
        _gemm_v2("w4a4_gemm_v2_aplanes_swap_m2048", 2048, 4096, "fp16", True, False, True, cc=cc),
        _gemm_v2("w4a4_gemm_v2_wplanes_m2048", 2048, 4096, "fp16", False, True, False, cc=cc),
        _gemm_v2("w4a4_gemm_v2_planes_m2048", 2048, 4096, "fp16", True, True, False, cc=cc),
        _gemm_v2("w4a4_gemm_v2_planes_m256", 256, 4096, "fp16", True, True, False, cc=cc),
        KernelSpec(planes.name, planes.module, planes.kernel, {**planes.types, "codes_ptr": "*i8"},
                   {**planes.constexprs, "PLANES": True}, planes.divisible, planes.options),
        # the fused K step (float64 tl.dot on sm_80 / sm_90) at other models' down_proj inputs: LLaMA-3-8B's
        # 14336 = 28 x 512 and TinyLlama's 5632 = 44 x 128 (with SwiGLU / without)
        _rows("swiglu_hadamard_quantize_14336_k28", 14336, 1, True, False, "fp16", PRE_SWIGLU, cc=cc),
        _rows("hadamard_quantize_5632_k44", 5632, 1, True, False, "fp16", cc=cc),
        _chunked("quantize_chunked_2048", 2048),
        # the FWHT's stages laid out by hand (Gluon): 4096 and 8192 values in one Hadamard block
        quantize_gluon_spec("hadamard_quantize_4096_gluon", 4096),
        quantize_gluon_spec("hadamard_quantize_8192_gluon", 8192),
        # a served decode step's row kernels (one token; rows.FEW_ROWS): 16 warps per row, the 11008 FWHT pass a
        # program per chunk, the 11008 quantize as one row tile
        _chunked("swiglu_fwht_11008_172x64_decode", 1024, PRE_SWIGLU, 64, quant=False, chunk_grid=True),
        _rows("scale_quantize_11008_decode", 11008, 1, False, False, "fp32", PRE_SCALE, cc=cc, decode=True,
              row_scale=_inv_sqrt(11008)),
        _rows("rmsnorm_quantize_4096_decode", 4096, 1, False, False, "fp16", PRE_RMSNORM, cc=cc, decode=True),
        _rows("rope_hadamard_q_32x128_decode", 4096, 32, True, False, "fp16", PRE_ROPE, quant=False, cc=cc,
              decode=True),
        _rows("kv_rope_hadamard_quantize_32x128_decode", 4096, 32, True, True, "fp16", PRE_ROPE, cc=cc,
              decode=True),
        _chunked("hadamard_quantize_chunked_43x256_1024", 1024, rot_p=256),
        *(_chunked(f"quantize_chunked_1024_s{s}", 1024, stages=s) for s in (1, 2, 3)),
        _chunked("hadamard_quantize_chunked_43x256_1024_s2", 1024, rot_p=256, stages=2),
        *(gemm_tma_specs() + gemm_tma_persistent_specs() + gemm_wgmma_specs() if cc == 90 else []),
        KernelSpec("w4a4_gemm_splitk_m1_k4096", "gemm", "w4a4_gemm_splitk_kernel",
                   {"a_ptr": "*u8", "w_ptr": "*u8", "part_ptr": "*i32", "N": "i32", "K2": "i32",
                    "k_chunk": "i32", "stride_am": "i32", "stride_wn": "i32"},
                   {"BM": 16, "BN": 32, "BK2": 128, "GROUP_M": 1, "WORDS": True, "M": 1},  # M = 1: a constant
                   (*_RUNTIME_DIVISIBLE, "part_ptr", "k_chunk"),  # k_chunk: a multiple of BK2
                   {"num_warps": 4, "num_stages": 4, "enable_fp_fusion": True}),  # integer only
        *(decode_cc_spec(f"kv4_decode_cc_g1_d128_bt{bt}_w{w}", 1, 128, bt, w) for bt in (32, 64, 128) for w in (4, 8)),
        *(decode_cc_spec(f"kv4_decode_cc_g1_d128_bt{bt}_w{w}_s{s}", 1, 128, bt, w, s)
          for bt, w, s in ((64, 4, 2), (64, 4, 3), (32, 8, 3), (32, 4, 3))),
        *(decode_cc_spec(f"kv4_decode_ccs_g1_d128_bt{bt}_w{w}_s{s}", 1, 128, bt, w, s, slots=True)
          for bt, w, s in ((64, 4, 1), (64, 4, 3), (32, 4, 1), (64, 8, 1), (32, 8, 1), (32, 8, 3))),
        *decode_mma_specs(),  # the decode attention with the cache dequantized into mma.sync operands (Gluon)
    ]


def compile_spec(spec: KernelSpec, cc: int) -> dict[str, Any]:
    """Compile one spec for compute capability ``cc``; returns ptx, LLVM IR, cubin and the MMA instructions used."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.experimental.gluon._runtime import GluonASTSource

    if interpreted():
        raise RuntimeError("compile kernels in a process with TRITON_INTERPRET=0 (tools/compile_kernels.py)")
    fn = getattr(kernel_module(spec.module), spec.kernel)
    signature = {a: spec.types.get(a, "constexpr") for a in fn.arg_names}
    missing = [a for a, t in signature.items() if t == "constexpr" and a not in spec.constexprs]
    if missing:
        raise ValueError(f"{spec.name}: no type or constexpr for {missing}")
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in spec.divisible if a in fn.arg_names}
    source = GluonASTSource if fn.is_gluon() else ASTSource
    src = source(fn, signature, constexprs=dict(spec.constexprs), attrs=attrs)
    options = {**COMPILE_DEFAULTS, **spec.options}
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
    ptx = compiled.asm["ptx"]
    mma = sorted(set(re.findall(r"\b((?:wgmma\.mma_async|mma\.sync)\.[\w.]+)", ptx)))
    resources = ptxas_resources(ptx, cc)
    return {"ptx": ptx, "llir": compiled.asm["llir"], "cubin": compiled.asm["cubin"], "mma": mma,
            "tma_loads": ptx.count("cp.async.bulk.tensor"),
            "mma_waits": sorted({int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)}),
            "mma_loop": mma_loop(compiled.asm["cubin"]), "hot_loop": hot_loop(compiled.asm["cubin"]),
            "shared_bytes": compiled.metadata.shared, "sha256": hashlib.sha256(compiled.asm["cubin"]).hexdigest(),
            **resources, "resident_warps": resident_warps(cc, resources["registers"], compiled.metadata.shared,
                                                          options["num_warps"])}


@dataclass(frozen=True)
class Launch:
    """One kernel launch as a wrapper makes it: ``infoquant_kernels.<module>.<kernel>[grid](*args, **kwargs)``."""

    module: str
    kernel: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@contextmanager
def recorded_launches(*modules: str) -> Iterator[list[Launch]]:
    """Inside the block, launches of every kernel of ``infoquant_kernels.<module>`` are appended to the yielded
    list instead of run (their outputs stay unwritten): what the wrappers pass at a shape, without executing it."""
    launches: list[Launch] = []
    patched = []

    class _Recorder:
        def __init__(self, module: str, kernel: str) -> None:
            self.where = (module, kernel)

        def __getitem__(self, grid: Any) -> Any:
            return lambda *args, **kwargs: launches.append(Launch(*self.where, args, kwargs))

    for module in modules:
        mod = kernel_module(module)
        for kernel, fn in list(vars(mod).items()):
            if hasattr(fn, "arg_names") and hasattr(fn, "fn"):  # a jit function (compiled or interpreted)
                patched.append((mod, kernel, fn))
                setattr(mod, kernel, _Recorder(module, kernel))
    try:
        yield launches
    finally:
        for mod, kernel, fn in patched:
            setattr(mod, kernel, fn)


def jit_spec(name: str, launch: Launch) -> KernelSpec:
    """The specialisation Triton's JIT compiles for ``launch`` on a CUDA device, by Triton's own rules
    (``native_specialize_impl``): an integer equal to 1 becomes a constant, pointers (16-byte aligned data) and
    integers that are multiples of 16 are marked divisible, other values keep their type. ``num_stages`` is left
    to the compiler's default unless the launch passes it."""
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import native_specialize_impl

    module, kernel = launch.module, launch.kernel
    fn = getattr(kernel_module(module), kernel).fn
    signature = inspect.signature(fn)
    params = signature.parameters
    bound = signature.bind(*launch.args, **{k: v for k, v in launch.kwargs.items() if k in params})
    bound.apply_defaults()
    types: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    divisible: list[str] = []
    for arg, value in bound.arguments.items():
        if "constexpr" in str(params[arg].annotation):
            constexprs[arg] = value
            continue
        kind, attr = native_specialize_impl(CUDABackend, value, False, True, True)
        if kind == "constexpr":
            constexprs[arg] = attr
            continue
        types[arg] = kind
        if attr == "D":
            divisible.append(arg)
    options = {k: v for k, v in launch.kwargs.items() if k not in params}
    return KernelSpec(name, module, kernel, types, constexprs, tuple(divisible), options)


def hadamard_aot_spec(size: int, num_blocks: int) -> KernelSpec:
    """The AOT-plugin Hadamard kernel for ``size`` = ``num_blocks`` power-of-two blocks (float32 in and out)."""
    from infoquant_export.kernels.rows import _inv_sqrt
    from infoquant_export.transforms.hadamard import hadamard_factors

    p = size // num_blocks
    k, _ = hadamard_factors(p)
    if k != 1 or num_blocks & (num_blocks - 1):
        raise ValueError(f"the AOT Hadamard kernel covers power-of-two blocks only (size {size}, {num_blocks} blocks)")
    return KernelSpec(f"hadamard_aot_n{size}b{num_blocks}", "aot_kernels", "hadamard_rows_aot_kernel",
                      {"x_ptr": "*fp32", "y_ptr": "*fp32"},
                      {"NB": num_blocks, "P": p, "LOG2P": p.bit_length() - 1, "INV_SQRT": _inv_sqrt(p)},
                      ("x_ptr", "y_ptr"), {"num_warps": 4 if size <= 4096 else 8})


def strip_unused_params(ptx: str) -> tuple[str, int]:
    """Drop trailing ``.entry`` parameters the body never reads (Triton >= 3.3 appends global- and profile-scratch
    pointers; TensorRT's AOT launcher passes only inputs, scalars and outputs). Returns (PTX, params dropped)."""
    head = re.search(r"(\.entry\s+\w+\s*\()(.*?)(\))", ptx, re.S)
    if head is None:
        raise ValueError("no .entry in the PTX")
    params = [p.strip() for p in head.group(2).split(",") if p.strip()]
    keep = list(params)
    while keep and ptx.count(keep[-1].split()[-1]) == 1:  # declared only
        keep.pop()
    body = ",\n\t".join(keep)
    return ptx[:head.start(2)] + "\n\t" + body + "\n" + ptx[head.end(2):], len(params) - len(keep)


def hadamard_rows_ptx(size: int, num_blocks: int, cc: int = 89) -> tuple[str, str, int, int]:
    """(kernel name, PTX with TensorRT's parameter list, num_warps, shared bytes) of :func:`hadamard_aot_spec`."""
    spec = hadamard_aot_spec(size, num_blocks)
    out = compile_spec(spec, cc)
    ptx, _ = strip_unused_params(out["ptx"])
    name = re.search(r"\.entry\s+(\w+)", ptx).group(1)  # type: ignore[union-attr]
    return name, ptx, spec.options["num_warps"], out["shared_bytes"]
