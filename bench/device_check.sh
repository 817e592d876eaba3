#!/usr/bin/env bash
# The one script for a lent GPU (see README, "Measuring on a GPU"): builds the CPU + CUDA op
# library in place, runs the GPU tests, compute-sanitizer memcheck over the small GPU tests,
# then every benchmark; tables land in bench/results/ and in $OUT, a summary prints last.
# Each step has its own time limit so that one slow step cannot eat the whole lease; one
# command may run 10 minutes at most there, so the work comes in two parts of ~8 minutes.
# Usage (repository root, on the GPU machine): bash bench/device_check.sh [kernels|e2e|all] [--quick]
#   kernels: build, GPU tests, memcheck, the per-op benchmarks;  e2e: build, bench_e2e
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-bench/results/device} PYTHONUNBUFFERED=1
export SQUEEZE_BUILD=cuda TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
mkdir -p "$OUT"
part=${1:-kernels}
quick=${2:-}
log=$OUT/device_check.log
status=()
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  status+=("$(printf '| %s | %s | %ss |' "$name" "$([ "$rc" = 0 ] && echo ok || echo "FAILED (rc $rc)")" $((SECONDS - t0)))")
}
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$log"
step build 180 python3 setup.py -q build_ext --inplace
if [ "$part" != e2e ]; then
  step gpu-tests 120 python3 -m pytest -q -m cuda -p no:cacheprovider tests
  step memcheck 60 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
    python3 -m pytest -q -x -m cuda -k "not long and not compile and not graph and not e2e" -p no:cacheprovider tests
  for b in bench_add_rmsnorm_cossim bench_layer_budgets bench_decode bench_prefill; do
    step "$b" 60 python3 -m "bench.$b" $quick
  done
fi
if [ "$part" != kernels ]; then
  step bench_e2e 300 python3 -m bench.bench_e2e --time-limit 240 $quick
fi
echo
echo "| step | result | time |"
echo "|---|---|---|"
printf '%s\n' "${status[@]}"
for f in "$OUT"/*.md; do echo; cat "$f"; done
