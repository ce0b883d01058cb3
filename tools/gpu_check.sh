#!/usr/bin/env bash
# The GPU checks of the kernels, as one script for a lent GPU machine (no network, no install of this package):
#   bash tools/gpu_check.sh OUTDIR        (SECTIONS=gemm,quantize,... selects benchmark sections)
# Runs `pytest -m gpu tests/gpu` and tools/bench_kernels.py; writes pytest.txt, bench.json, bench.log to OUTDIR.
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
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -m gpu tests/gpu -q -s -p no:cacheprovider 2>&1 | tail -60 > "$OUT/pytest.txt"
tail -25 "$OUT/pytest.txt"
timeout "${BENCH_TIMEOUT:-300}" python3 tools/bench_kernels.py --sections "${SECTIONS:-gemm,sweep,quantize,attention,e2e}" \
  --out "$OUT/bench.json" > "$OUT/bench.log" 2>&1
echo "bench rc=$?"
tail -c 1500 "$OUT/bench.log"
