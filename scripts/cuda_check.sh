#!/usr/bin/env bash
# GPU checks on one CUDA machine: the CUDA tests (kernels at ring size 1, multi-step rings as
# threads on the one GPU) and the single-GPU benchmark. Outputs go to $OUT (default
# outputs/cuda_check). Each part has its own time limit and a failure does not stop the rest.
#   bash scripts/cuda_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/cuda_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/env.txt"
timeout "${TEST_TIMEOUT:-240}" $PY -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_virtual_ring.py \
    2>&1 | tee "$OUT/tests.txt" | tail -60
timeout "${BENCH_TIMEOUT:-240}" $PY benchmarks/bench_cuda.py --out "$OUT/bench_cuda.json" ${BENCH_ARGS:-} \
    2>&1 | tee "$OUT/bench_cuda.txt" | tail -40
