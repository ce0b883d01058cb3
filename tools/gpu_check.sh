#!/usr/bin/env bash
# The GPU checks of the kernels, as one script for a lent GPU machine (no network, no install of this package):
#   bash tools/gpu_check.sh OUTDIR
# 1. `pytest -m gpu` on TESTS (default: tests/gpu without test_variants_gpu.py: the kernels, prologues, plugins;
#    the benchmark's variants check their own bits, `same_bits`) -> pytest.txt
#    (last 60 lines) and pytest-full.txt
# 2. tools/bench_kernels.py --sections SECTIONS, in that order (default: e2e,profile,variants -- the
#    LLaMA-2-7B-shaped end-to-end prefill / decode incl. the CUDA-graph step generate runs and the plane prefill;
#    GPU time per kernel of one prefill and one decode step; then each variant next to the default and the
#    FP16 / copy baselines in the order VARIANT_KINDS (default attention,quantize: the CUDA-core decode kernels
#    "cc" / "ccs" with their pipelined token loops, the pipelined chunked quantize), no variant started after
#    VARIANTS_BUDGET_S seconds)
#    -> bench.json (rewritten after each section), bench.log
# Time limits: TEST_TIMEOUT (default 270 s), BENCH_TIMEOUT (default 300 s), VARIANTS_BUDGET_S (default 120 s):
# at most ~10 min, one device call.
# Measured (H200, 2026-11-27): tests/gpu/test_kernels_gpu, test_plugins_gpu and test_prologues_gpu (50 tests) in
# ~220 s with their compiles; test_variants_gpu.py needs another ~4 min (the GEMM tile sweep ~60 s, the decode
# attention variants the rest), so it has a call of its own, with the GEMM variants (the persistent TMA GEMM):
#   TESTS=tests/gpu/test_variants_gpu.py SECTIONS=variants VARIANT_KINDS=gemm,k_step bash tools/gpu_check.sh OUT
# The Gluon kernels (the sm_90 GEMM's hand-written barriers: a mistake would hang rather than fail; the Hadamard +
# quantize with its FWHT laid out by hand; the decode attention with the cache unpacked into mma.sync operands by
# inline PTX) have tests of their own, to run first with a short limit (TESTS is split on spaces):
#   TESTS="tests/gpu/test_variants_gpu.py::test_wgmma_gemm_same_bits
#   tests/gpu/test_variants_gpu.py::test_gemm_variants_bias_residual_against_primitives
#   tests/gpu/test_variants_gpu.py::test_gluon_quantize_same_bits
#   tests/gpu/test_variants_gpu.py::test_decode_attention_mma_close_to_float64" TEST_TIMEOUT=240
#   SECTIONS=variants VARIANT_KINDS=attention,gemm,quantize VARIANTS_BUDGET_S=150 bash tools/gpu_check.sh OUT
# (the attention variants come first: "mma" at every tile against the default and SDPA at 4k / 32k, batch 1 / 16)
set -u
OUT=${1:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/plugins
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)" \
  | tee -a "$OUT/gpu.txt"
if ls .gpu_wheels/numpy-*.whl >/dev/null 2>&1; then  # triton 3.6's interpreter needs numpy < 2.4
  python3 -m pip install -q --no-deps --target /tmp/np .gpu_wheels/numpy-*.whl && export INFOQUANT_INTERPRETER_PYTHONPATH=/tmp/np
fi
if [ -d .gpu_cases ]; then  # plugin cases made on a CPU machine: python tools/plugin_cases.py M.onnx --out .gpu_cases
  export INFOQUANT_PLUGIN_CASES=$PWD/.gpu_cases
fi
start=$(date +%s)
# shellcheck disable=SC2086
# -v: one line per test as it finishes, kept in pytest-full.txt even if the time limit stops pytest
timeout "${TEST_TIMEOUT:-270}" python3 -m pytest -m gpu ${TESTS:-tests/gpu --ignore=tests/gpu/test_variants_gpu.py} -v -s -p no:cacheprovider --durations=8 2>&1 \
  | tee "$OUT/pytest-full.txt" | tail -60 > "$OUT/pytest.txt"
tail -25 "$OUT/pytest.txt"
echo "tests took $(( $(date +%s) - start )) s"
start=$(date +%s)
timeout "${BENCH_TIMEOUT:-300}" python3 tools/bench_kernels.py --sections "${SECTIONS:-e2e,profile,variants}" \
  --variants-budget-s "${VARIANTS_BUDGET_S:-120}" --variant-kinds "${VARIANT_KINDS:-attention,quantize}" \
  --out "$OUT/bench.json" > "$OUT/bench.log" 2>&1
echo "bench rc=$? took $(( $(date +%s) - start )) s"
tail -c 1500 "$OUT/bench.log"
