"""The AOT specialisations (infoquant_export/kernels/aot.py) are the ones Triton's JIT compiles on a GPU.

Every figure compiled on the CPU (registers, occupancy, SASS loops, instruction counts in BENCHMARKS.md) is only
the GPU's if the spec declares what the JIT derives from the real launch: which pointers and integers are multiples
of 16 (vector loads and stores), which integers equal 1 (folded constants), the constexprs and launch options.
Each spec of ``default_specs``, the variants BENCHMARKS.md quotes and the one-token ``*_decode`` specs are compared
here with the launch their wrapper makes at that shape (recorded, not run).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch

pytest.importorskip("triton")

from infoquant_export.kernels import aot, attention, linear, rows  # noqa: E402
from infoquant_export.kernels.attention import kv4_decode_attention  # noqa: E402
from infoquant_export.kernels.kv import KVCache4, quantize_kv, rope_rows  # noqa: E402
from infoquant_export.kernels.linear import (  # noqa: E402
    GEMM_WGMMA_PERSISTENT_TILES,
    GEMM_WGMMA_TILES,
    PackedWeight,
    gemm_candidates,
    gemm_config,
    gemm_tables,
    w4a4_linear,
)
from infoquant_export.kernels.rows import SWIGLU, PackedRows, rmsnorm_prologue  # noqa: E402

TOKENS = 2048  # the prefill rows the row specs stand for (an integer the JIT marks divisible by 16)
# constexprs set from the device: FAST_DIV and WORDS (inline PTX) are off in the interpreter, K_DOT follows the cc
CC_DEPENDENT = ("K_DOT", "FAST_DIV", "WORDS")
JIT_OPTIONS = {"num_warps": 4, "num_stages": 3, "enable_fp_fusion": True}  # Triton's CUDAOptions defaults


def _x(n: int, dtype: torch.dtype = torch.float16, tokens: int = TOKENS) -> torch.Tensor:
    return torch.empty(tokens, n, dtype=dtype)


def _heads(tokens: int = TOKENS, heads: int = 32, dim: int = 128) -> torch.Tensor:
    return torch.empty(1, tokens, heads, dim, dtype=torch.float16)


def _rope(tokens: int = TOKENS, dim: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty(tokens, dim), torch.empty(tokens, dim)


def _cache(capacity: int = 4096, heads: int = 32, dim: int = 128) -> KVCache4:
    return KVCache4.empty(1, heads, capacity, dim, "cpu")


def _operands(m: int, planes: bool = False) -> tuple[PackedRows, PackedWeight]:
    """Activation and weight operands of a 4096 x 4096 layer for ``m`` rows (packed, or both as int8 planes)."""
    act = PackedRows(torch.empty(m, 4096 if planes else 2048, dtype=torch.int8 if planes else torch.uint8),
                     torch.empty(m), torch.empty(m, dtype=torch.uint8), planes=planes)
    weight = PackedWeight(torch.empty(4096, 2048, dtype=torch.uint8), torch.empty(4096),
                          torch.empty(4096, dtype=torch.int32),
                          planes=torch.empty(4096, 4096, dtype=torch.int8) if planes else None)
    return act, weight


def _gemm(m: int) -> None:
    w4a4_linear(*_operands(m), residual=torch.empty(m, 4096, dtype=torch.float16), out_dtype=torch.float16,
                config=gemm_config(m, 2048, 90))


def _gemm_planes(m: int) -> None:
    cfg = {**gemm_candidates(m, 2048, gemm_tables(90)[1])[0], "W_PLANES": 1, "SWAP": 0}
    w4a4_linear(*_operands(m, planes=True), residual=torch.empty(m, 4096, dtype=torch.float16),
                out_dtype=torch.float16, config=cfg)


def _gemm_splitk() -> None:
    w4a4_linear(*_operands(1), out_dtype=torch.float16,
                config={"BM": 16, "BN": 32, "BK2": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 4, "SPLITS": 4})


def _decode(group: int, dim: int, kernel: str = "tc", block_t: int | None = None, warps: int | None = None,
            stages: int | None = None) -> None:
    kv_heads, capacity = 8, 4096
    k, v = _cache(capacity, kv_heads, dim), _cache(capacity, kv_heads, dim)
    q = torch.empty(1, kv_heads * group, dim, dtype=torch.float16)
    kv4_decode_attention(q, k, v, torch.full((1,), capacity, dtype=torch.int32), capacity, splits=8,
                         check_lengths=False, kernel=kernel, block_t=block_t, num_warps=warps, num_stages=stages)


# spec name -> (module, kernel, the wrapper call that launches it); the chunked 11008 path launches three kernels
LAUNCHES: dict[str, tuple[str, str, Callable[[], object]]] = {
    "w4a4_gemm_m1_k4096": ("gemm", "w4a4_gemm_kernel", lambda: _gemm(1)),
    "w4a4_gemm_m64_k4096": ("gemm", "w4a4_gemm_kernel", lambda: _gemm(64)),
    "w4a4_gemm_m2048_k4096": ("gemm", "w4a4_gemm_kernel", lambda: _gemm(2048)),
    "quantize_4096": ("quantize", "hadamard_quantize_kernel", lambda: rows.quantize_rows(_x(4096))),
    "hadamard_quantize_4096": ("quantize", "hadamard_quantize_kernel",
                               lambda: rows.quantize_rows(_x(4096), hadamard_blocks=1)),
    "hadamard_quantize_1536_k12": ("quantize", "hadamard_quantize_kernel",
                                   lambda: rows.quantize_rows(_x(1536, torch.float32), hadamard_blocks=1)),
    "kv_hadamard_quantize_32x128": ("quantize", "hadamard_quantize_kernel",
                                    lambda: quantize_kv(_heads(), _cache(), 0, 1.0, rotate=True)),
    "rmsnorm_quantize_4096": ("quantize", "hadamard_quantize_kernel",
                              lambda: rows.quantize_rows(_x(4096), prologue=rmsnorm_prologue(torch.ones(4096), 1e-5))),
    "rope_hadamard_q_32x128": ("quantize", "hadamard_quantize_kernel",
                               lambda: rope_rows(_heads(), *_rope(), rotate=True)),
    "kv_rope_hadamard_quantize_32x128": ("quantize", "hadamard_quantize_kernel",
                                         lambda: quantize_kv(_heads(), _cache(), 0, 1.0, rotate=True, rope=_rope())),
    "swiglu_hadamard_quantize_1536_k12": ("quantize", "hadamard_quantize_kernel",
                                          lambda: rows.quantize_rows(_x(3072), hadamard_blocks=1, prologue=SWIGLU)),
    "swiglu_fwht_11008_172x64": ("quantize", "quantize_rows_chunked_kernel",
                                 lambda: rows.quantize_rows(_x(22016), hadamard_blocks=1, prologue=SWIGLU)),
    "hadamard_k_step_172x64": ("quantize", "hadamard_k_step_kernel",
                               lambda: rows.quantize_rows(_x(22016), hadamard_blocks=1, prologue=SWIGLU)),
    "scale_quantize_11008": ("quantize", "quantize_rows_chunked_kernel",
                             lambda: rows.quantize_rows(_x(22016), hadamard_blocks=1, prologue=SWIGLU)),
    "kv4_decode_g1_d128": ("attention", "kv4_decode_partial_kernel", lambda: _decode(1, 128)),
    "kv4_decode_g3_d64": ("attention", "kv4_decode_partial_kernel", lambda: _decode(3, 64)),
}
# the performance variants whose compiled figures BENCHMARKS.md quotes (aot.variant_specs)
VARIANT_LAUNCHES: dict[str, tuple[str, str, Callable[[], object]]] = {
    "w4a4_gemm_v2_planes_m2048": ("gemm", "w4a4_gemm_v2_kernel", lambda: _gemm_planes(2048)),
    "w4a4_gemm_v2_planes_m256": ("gemm", "w4a4_gemm_v2_kernel", lambda: _gemm_planes(256)),
    "w4a4_gemm_splitk_m1_k4096": ("gemm", "w4a4_gemm_splitk_kernel", _gemm_splitk),
    "hadamard_quantize_chunked_43x256_1024": ("quantize", "quantize_rows_chunked_kernel",
                                              lambda: rows.quantize_rows_variant(_x(11008), 4, 1.0, None, 43,
                                                                                 chunk=1024, num_warps=4)),
    "swiglu_fwht_11008_172x64_decode": ("quantize", "quantize_rows_chunked_kernel",
                                        lambda: rows.quantize_rows(_x(22016, tokens=1), hadamard_blocks=1,
                                                                   prologue=SWIGLU)),
    "scale_quantize_11008_decode": ("quantize", "hadamard_quantize_kernel",
                                    lambda: rows.quantize_rows(_x(22016, tokens=1), hadamard_blocks=1,
                                                               prologue=SWIGLU)),
    "rmsnorm_quantize_4096_decode": ("quantize", "hadamard_quantize_kernel",
                                     lambda: rows.quantize_rows(_x(4096, tokens=1),
                                                                prologue=rmsnorm_prologue(torch.ones(4096), 1e-5))),
    "rope_hadamard_q_32x128_decode": ("quantize", "hadamard_quantize_kernel",
                                      lambda: rope_rows(_heads(1), *_rope(1), rotate=True)),
    "kv_rope_hadamard_quantize_32x128_decode": (
        "quantize", "hadamard_quantize_kernel",
        lambda: quantize_kv(_heads(1), _cache(), torch.zeros(1, dtype=torch.int32), 1.0, rotate=True, rope=_rope(1))),
    **{f"quantize_chunked_1024_s{s}": ("quantize", "quantize_rows_chunked_kernel",
                                       lambda s=s: rows.quantize_rows_variant(_x(11008), chunk=1024, num_warps=4,
                                                                              stages=s)) for s in (1, 2, 3)},
    **{name: ("attention", "kv4_decode_partial_cc_kernel",
              lambda k=k, bt=bt, w=w, s=st: _decode(1, 128, k, bt, w, s))
       for name, k, bt, w, st in (("kv4_decode_cc_g1_d128_bt64_w4", "cc", 64, 4, 1),
                                  ("kv4_decode_cc_g1_d128_bt64_w4_s3", "cc", 64, 4, 3),
                                  ("kv4_decode_ccs_g1_d128_bt64_w4_s1", "ccs", 64, 4, 1),
                                  ("kv4_decode_ccs_g1_d128_bt64_w4_s3", "ccs", 64, 4, 3),
                                  ("kv4_decode_ccs_g1_d128_bt32_w4_s1", "ccs", 32, 4, 1))},
}
# the last launch of the 11008 path (the quantize; the first is the FWHT pass)
LAUNCH_INDEX = {"scale_quantize_11008": -1, "scale_quantize_11008_decode": -1}


def recorded_spec(name: str) -> aot.KernelSpec:
    """The JIT's specialisation of the launch ``LAUNCHES[name]`` makes."""
    module, kernel, call = {**LAUNCHES, **VARIANT_LAUNCHES}[name]
    with aot.recorded_launches(module) as launches:
        call()
    mine = [launch for launch in launches if launch.kernel == kernel]
    assert mine, f"{name}: the wrapper launched no {kernel}"
    return aot.jit_spec(name, mine[LAUNCH_INDEX.get(name, 0)])


def spec_differences(spec: aot.KernelSpec, jit: aot.KernelSpec) -> dict[str, object]:
    """What the hand-written ``spec`` declares differently from the JIT's ``jit`` (empty when they agree)."""
    out: dict[str, object] = {}
    types = {k: (spec.types.get(k), v) for k, v in jit.types.items() if spec.types.get(k) != v}
    consts = {k: (spec.constexprs.get(k), v) for k, v in jit.constexprs.items()
              if k not in CC_DEPENDENT and spec.constexprs.get(k) != v}
    divisible = (set(spec.divisible) & set(jit.types)) ^ set(jit.divisible)
    aot_options, jit_options = {**aot.COMPILE_DEFAULTS, **spec.options}, {**JIT_OPTIONS, **jit.options}
    options = {k: (aot_options[k], v) for k, v in jit_options.items() if aot_options.get(k) != v}
    for key, value in (("types", types), ("constexprs", consts), ("divisible", sorted(divisible)),
                       ("options", options)):
        if value:
            out[key] = value
    return out


def test_every_default_spec_has_a_launch():
    assert sorted(LAUNCHES) == sorted(s.name for s in aot.default_specs(90))


@pytest.mark.parametrize("name", sorted(LAUNCHES))
def test_spec_is_what_the_jit_compiles(name):
    spec = next(s for s in aot.default_specs(90) if s.name == name)
    assert spec_differences(spec, recorded_spec(name)) == {}


@pytest.mark.parametrize("name", sorted(VARIANT_LAUNCHES))
def test_variant_spec_is_what_the_jit_compiles(name):
    spec = next(s for s in aot.variant_specs(90) if s.name == name)
    assert spec_differences(spec, recorded_spec(name)) == {}


@pytest.mark.parametrize("tile,persistent", [(t, False) for t in GEMM_WGMMA_TILES]
                         + [(t, True) for t in GEMM_WGMMA_PERSISTENT_TILES])
def test_wgmma_spec_is_what_the_jit_compiles(tile, persistent, monkeypatch):
    """The Gluon GEMM's launch (``WGMMA`` config: descriptors with their shared layouts, the accumulator layout),
    recorded as on an sm_90 GPU: the wrapper refuses the interpreter, so the test says it is not in one."""
    monkeypatch.setattr(linear, "interpreted", lambda: False)
    monkeypatch.setattr(linear, "device_cc", lambda device: 90)
    keys = ("BM", "BN", "BK2", "GROUP_M", "num_warps", "num_stages")
    cfg = {**dict(zip(keys, tile, strict=True)), "W_PLANES": 1, "SWAP": 0, "WGMMA": 1, "PERSISTENT": int(persistent)}
    with aot.recorded_launches("gemm_wgmma") as launches:
        w4a4_linear(*_operands(TOKENS, planes=True), residual=torch.empty(TOKENS, 4096, dtype=torch.float16),
                    out_dtype=torch.float16, config=cfg)
    assert len(launches) == 1
    name = "w4a4_gemm_wgmma_{}planes_{}x{}x{}_w{}_s{}".format("persistent_" if persistent else "", *tile[:3],
                                                               *tile[4:])
    spec = next(s for s in aot.variant_specs(90) if s.name == name)
    assert spec_differences(spec, aot.jit_spec(name, launches[0])) == {}


@pytest.mark.parametrize("n", [4096, 8192])
def test_gluon_quantize_spec_is_what_the_jit_compiles(n, monkeypatch):
    """The Gluon Hadamard + quantize launch (``quantize_rows_variant(..., gluon=True)``), recorded as on a GPU."""
    monkeypatch.setattr(rows, "interpreted", lambda: False)
    monkeypatch.setattr(rows, "device_cc", lambda device: 90)
    with aot.recorded_launches("quantize_gluon") as launches:
        rows.quantize_rows_variant(_x(n), 4, 0.9, None, 1, gluon=True)
    assert len(launches) == 1
    name = f"hadamard_quantize_{n}_gluon"
    spec = next(s for s in aot.variant_specs(90) if s.name == name)
    assert spec_differences(spec, aot.jit_spec(name, launches[0])) == {}


@pytest.mark.parametrize("name", [s.name for s in aot.decode_mma_specs()])
def test_mma_decode_spec_is_what_the_jit_compiles(name, monkeypatch):
    """The Gluon decode attention's launch (``kernel="mma"``: its layouts as constexprs), recorded as on a GPU."""
    monkeypatch.setattr(attention, "interpreted", lambda: False)
    monkeypatch.setattr(attention, "device_cc", lambda device: 90)
    group, dim, block_t, warps, stages = (int(n or 1) for n in re.fullmatch(
        r"kv4_decode_mma_g(\d+)_d(\d+)_bt(\d+)_w(\d+)(?:_s(\d))?", name).groups())
    with aot.recorded_launches("attention_mma", "attention") as launches:
        _decode(group, dim, "mma", block_t, warps, stages)
    mine = [launch for launch in launches if launch.module == "attention_mma"]
    assert len(mine) == 1 and len(launches) == 2  # the partials, then the combine kernel
    spec = next(s for s in aot.variant_specs(90) if s.name == name)
    assert spec_differences(spec, aot.jit_spec(name, mine[0])) == {}
