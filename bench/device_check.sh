#!/usr/bin/env bash
# The one script for a lent GPU (see README, "Measuring on a GPU"): builds the CPU + CUDA op
# library in place, runs the whole test suite (tests/ops, tests/engine, tests/models, tests/research,
# tests/bench: the Triton launchers then run compiled on the GPU), compute-sanitizer memcheck over the
# small GPU tests, then the benchmarks; tables land in bench/results/device/ (and, packed, in $OUT
# when the caller sets it: results.tgz, the log and the built library, so that a second call can skip
# the build), a summary prints last.
# Each step has its own time limit so that one slow step cannot eat the whole lease. A session has
# 15 minutes of device time (a cold start included) and one command may run 10 minutes, so the work
# comes in two calls, each under 10 minutes at its limits: `kernels` (<= 8.5 min: build 100 s, tests
# 150 s, per-op benchmarks 210 s of which decode 120 s (each shape compiles ~14 kernel variants: the
# shapes not started by its --time-limit are listed as left out), memcheck 40 s) then `e2e` (<= 5 min,
# with SQUEEZE_SKIP_BUILD=1 on the same warm machine).
# Usage (repository root, on the GPU machine): bash bench/device_check.sh [kernels|e2e|all] [--quick]
#   kernels: build, the test suite, the per-op benchmarks (decode, prefill, add_rmsnorm_cossim,
#   layer_budgets, launch), memcheck;  e2e: build, bench_e2e.  SQUEEZE_SKIP_BUILD=1 keeps a library
#   built by an earlier call (squeeze_ops/_C*.so) instead of building again; BENCHES="decode:120 ..."
#   picks the per-op benchmarks of `kernels` and their time limits in seconds.
set -uo pipefail
cd "$(dirname "$0")/.."
RET=${OUT:-}
export OUT=bench/results/device PYTHONUNBUFFERED=1
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
  local verdict=ok
  [ "$rc" = 0 ] || verdict="FAILED (rc $rc)"
  status+=("$(printf '| %s | %s | %ss |' "$name" "$verdict" $((SECONDS - t0)))")
}
python3 -c "import torch, triton
print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$log"
if [ "${SQUEEZE_SKIP_BUILD:-0}" = 1 ] && ls squeeze_ops/_C*.so >/dev/null 2>&1; then
  echo "=== build skipped: $(ls squeeze_ops/_C*.so)" | tee -a "$log"
else
  step build 100 python3 setup.py -q build_ext --inplace
fi
if [ "$part" != e2e ]; then
  # xdist when present: the suite's Triton variants then compile on several cores at once.
  workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 12")
  step tests 150 python3 -m pytest -q --tb=short -rfE $workers -p no:cacheprovider \
    tests/ops tests/engine tests/models tests/research tests/bench
  for b in ${BENCHES:-decode:120 prefill:45 add_rmsnorm_cossim:15 layer_budgets:15 launch:15}; do
    name=${b%:*} limit=${b#*:}
    case $name in
      decode) extra="--time-limit $((limit - 25))" ;;  # shapes not started by then are listed as left out
      launch) extra="--device cuda" ;;
      *) extra="" ;;
    esac
    step "bench_$name" "$limit" python3 -m "bench.bench_$name" $extra $quick
  done
  # Without PyTorch's caching allocator a write past a tensor is reported (docs/DEVICE.md).
  step memcheck 40 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
    python3 -m pytest -q -x -m cuda -k "not long and not compile and not graph and not e2e" -p no:cacheprovider \
    tests/ops
fi
if [ "$part" != kernels ]; then
  step bench_e2e 300 python3 -m bench.bench_e2e --time-limit 240 $quick
fi
echo
echo "| step | result | time |"
echo "|---|---|---|"
printf '%s\n' "${status[@]}"
if [ -n "$RET" ]; then
  tar czf "$RET/results.tgz" -C bench/results device && cp "$log" "$RET/" && cp squeeze_ops/_C*.so "$RET/"
fi
for f in "$OUT"/*.md; do echo; cat "$f"; done
