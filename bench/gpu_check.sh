#!/usr/bin/env bash
# The GPU check: on a machine with a GPU, torch and nvcc (no network needed),
#   1. build fusedloss for the local GPU,
#   2. run the CUDA tests (every test parametrized over devices, on "cuda"),
#   3. run compute-sanitizer memcheck and racecheck on a small workload,
#   4. benchmark every loss against torch eager and torch.compile at its GPU
#      size, with a device copy timed in the same run,
# writing everything into OUTDIR and printing a summary last.
#
#   bench/gpu_check.sh OUTDIR            (about 8 minutes on an H100)
#
# OUTDIR holds at most 8 files: summary.txt, env.txt, build.log, tests.log,
# sanitizer.log, bench.csv, bench.json, bench.png.
# Environment: PYTHON (default python3), SKIP_BUILD=1, SKIP_TESTS=1,
# SKIP_SANITIZER=1, SKIP_BENCH=1, PYTEST_K (a pytest -k expression to run a
# subset of the CUDA tests), FUSEDLOSS_GIT_SHA (recorded in the CSV when the
# tree has no .git).
set -uo pipefail

if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
  [ $# -lt 1 ] && exit 2 || exit 0
fi
OUTDIR=$1
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
SUMMARY="$OUTDIR/summary.txt"
: > "$SUMMARY"
status=0

say() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$SUMMARY"; }
step() {  # step NAME LOGFILE COMMAND...: run, time, record pass/fail
  local name=$1 logf=$2
  shift 2
  local t0=$SECONDS
  "$@" >> "$logf" 2>&1
  local rc=$?
  say "$(printf '%-12s %-5s %4ds  %s' "$name" "$([ $rc -eq 0 ] && echo ok || echo FAIL)" $((SECONDS - t0)) "$(basename "$logf")")"
  [ $rc -eq 0 ] || status=1
  return $rc
}

{
  echo "== nvidia-smi"; nvidia-smi 2>&1 || true
  echo "== torch"; "$PY" -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda); print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))" 2>&1
  echo "== nvcc"; nvcc --version 2>&1 || true
  echo "== compute-sanitizer"; command -v compute-sanitizer || echo "not found"
} > "$OUTDIR/env.txt"
export FUSEDLOSS_GIT_SHA=${FUSEDLOSS_GIT_SHA:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
say "GPU check of fusedloss $FUSEDLOSS_GIT_SHA on $("$PY" -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null)"

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  unset TORCH_CUDA_ARCH_LIST  # setup.py picks the visible GPU's architecture
  step build "$OUTDIR/build.log" env FUSEDLOSS_CUDA=1 "$PY" -m pip install --no-build-isolation --no-index --no-deps -v -e . \
    || { say "build failed: see build.log"; tail -30 "$OUTDIR/build.log"; exit 1; }
fi
"$PY" -m fusedloss info >> "$OUTDIR/env.txt" 2>&1

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  k_args=()
  [ -n "${PYTEST_K:-}" ] && k_args=(-k "$PYTEST_K")
  step tests "$OUTDIR/tests.log" "$PY" -m pytest -q -m cuda -p no:cacheprovider -rfE --tb=short "${k_args[@]}" tests
  grep -E "passed|failed" "$OUTDIR/tests.log" | tail -1 | tee -a "$SUMMARY"
fi

if [ "${SKIP_SANITIZER:-0}" != 1 ]; then
  if command -v compute-sanitizer > /dev/null; then
    for tool in memcheck racecheck; do
      echo "== compute-sanitizer --tool $tool" >> "$OUTDIR/sanitizer.log"
      step "$tool" "$OUTDIR/sanitizer.log" compute-sanitizer --tool "$tool" --error-exitcode 9 "$PY" bench/sanitizer_subset.py
    done
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|SANITIZER SUBSET|MISMATCH" "$OUTDIR/sanitizer.log" | tee -a "$SUMMARY"
  else
    say "compute-sanitizer not found: sanitizer step skipped"
  fi
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  step bench "$OUTDIR/summary.txt" "$PY" -m fusedloss bench --device cuda --quick \
    --csv "$OUTDIR/bench.csv" --json "$OUTDIR/bench.json" --plot "$OUTDIR/bench.png"
fi

say "done: $([ $status -eq 0 ] && echo 'all steps passed' || echo 'some steps FAILED')"
cat "$SUMMARY"
exit $status
