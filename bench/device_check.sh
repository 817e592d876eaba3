#!/usr/bin/env bash
# The one script for a lent GPU (see README, "Measuring on a GPU"): builds the CPU + CUDA op
# library in place, runs the GPU tests, compute-sanitizer memcheck over the small GPU tests,
# then every benchmark; tables land in bench/results/ (and, packed, in $OUT when the caller sets it:
# results.tgz, the log and the built library, so that a second call can skip the build), a
# summary prints last.
# Each step has its own time limit so that one slow step cannot eat the whole lease; one
# command may run 10 minutes at most there, so the work comes in two parts (on an H200: kernels
# ~4 min, e2e ~3.5 min, the build included).
# Usage (repository root, on the GPU machine): bash bench/device_check.sh [kernels|e2e|all] [--quick]
#   kernels: build, the whole test suite (the Triton launchers then run compiled on the GPU), the
#   per-op benchmarks, memcheck;  e2e: build, bench_e2e.  SQUEEZE_SKIP_BUILD=1 keeps a library
#   built by an earlier call (squeeze_ops/_C*.so) instead of building again; BENCHES="decode:100 ..."
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
  step build 150 python3 setup.py -q build_ext --inplace
fi
if [ "$part" != e2e ]; then
  # xdist when present: the suite's Triton variants then compile on several cores at once.
  workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 12")
  step tests 170 python3 -m pytest -v --tb=short -rfE $workers -p no:cacheprovider tests
  for b in ${BENCHES:-add_rmsnorm_cossim:40 layer_budgets:40 decode:100 prefill:60}; do
    step "bench_${b%:*}" "${b#*:}" python3 -m "bench.bench_${b%:*}" $quick
  done
  step memcheck 40 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
    python3 -m pytest -q -x -m cuda -k "not long and not compile and not graph and not e2e" -p no:cacheprovider tests
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
