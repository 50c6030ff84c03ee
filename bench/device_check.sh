#!/usr/bin/env bash
# bench/device_check.sh: the one script for a lent GPU machine (H100/H200, torch 2.11+cu130,
# Python 3.12, nvcc 13, no network, a fresh machine each time). Run from the repository root:
#
#     bash bench/device_check.sh
#
# Steps, each under its own `timeout`, the whole run inside DC_BUDGET seconds (default 465, so
# with start-up it stays under 8 minutes); a failing step is recorded and the next one runs:
#   env        nvidia-smi -L, driver, torch / CUDA / nvcc / compute-sanitizer versions
#   build      tasksieve._C for sm_90a, in place, no pip, no network
#              (TASKSIEVE_CUDA=1 TASKSIEVE_CUDA_ARCHS=9.0a MAX_JOBS=8 TASKSIEVE_NVCC_THREADS=4
#              python3 setup.py build_ext --inplace), then `python -m tasksieve.info`
#   tests      pytest -q -m "not slow and not gpusim" tests/   (CUDA variants run with a GPU)
#   simnative  the simulator suite's cases (tests/sim) on the real card: the runners in
#              csrc/sim/ built by `make sim-runners`, run natively (GPUSIM=native)
#   memcheck   compute-sanitizer memcheck on bench/sanitize_ops.py (every CUDA op, small awkward
#              shapes, in-place gather, invalid indices), torch's caching allocator off
#   racecheck  compute-sanitizer racecheck on the same script
#   vllm       the FlexPrefill vLLM plugin in vLLM's FlashAttention backend (bench/vllm_device_check.py);
#              reported as skipped when the machine has no vLLM
#   bench      python -m tasksieve.bench --quick --device cuda
# Last it prints the benchmark table and a summary table (step, status, seconds).
#
# Logs and results go to $OUT when set (the device tool brings back at most 8 files: build.log,
# tests.log, sanitize.log, bench.log, summary.md and the bench CSV/MD/PNG), else to
# bench/results/tmp/device_check/ (git-ignored).
#
# Knobs: PYTHON (default python3), DC_BUDGET (seconds), DC_SKIP="memcheck racecheck ..." (steps
# to skip), DC_BUILD=inplace|pip (pip: `pip install --no-build-isolation --no-deps --no-index -e .`),
# DC_SANITIZE_FILTER (e.g. "kns=tasksieve": check only kernels whose name holds that string).
set -u
set -o pipefail

cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
PY=${PYTHON:-python3}
OUTDIR=${OUT:-$ROOT/bench/results/tmp/device_check}
mkdir -p "$OUTDIR"
BUDGET=${DC_BUDGET:-465}
SKIP=" ${DC_SKIP:-} "
START=$(date +%s)

# No network, ever: pip may not look at an index, HF libraries stay offline.
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# The in-place build leaves tasksieve/_C.abi3.so under python/: import from there.
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"

SUMMARY_ROWS=""
FAILED=0

elapsed() { echo $(( $(date +%s) - START )); }

record() {  # step status seconds
  SUMMARY_ROWS="${SUMMARY_ROWS}| $1 | $2 | $3 |
"
}

# run_step NAME CAP RESERVE LOG CMD...: run CMD with timeout min(CAP, time left - RESERVE),
# append its output to LOG, show the last lines, record the status.
run_step() {
  local name=$1 cap=$2 reserve=$3 log=$4
  shift 4
  case "$SKIP" in *" $name "*) record "$name" "skipped (DC_SKIP)" 0; return 0 ;; esac
  local left=$(( BUDGET - $(elapsed) - reserve ))
  local t=$cap
  [ "$left" -lt "$t" ] && t=$left
  if [ "$t" -lt 15 ]; then
    record "$name" "skipped (no time left)" 0
    FAILED=1
    return 0
  fi
  echo "=== [$name] $(date -u +%H:%M:%S) timeout ${t}s: $*" | tee -a "$log"
  local s rc status
  s=$(date +%s)
  # bash -c so that the exported shell functions below run under timeout too.
  timeout --kill-after=10 "$t" bash -c '"$@"' _ "$@" >>"$log" 2>&1
  rc=$?
  local secs=$(( $(date +%s) - s ))
  case $rc in
    0) status="PASS" ;;
    124|137) status="TIMEOUT after ${t}s" ;;
    99) status="FAIL: sanitizer errors" ;;
    98) status="skipped (not installed here)"; rc=0 ;;
    *) status="FAIL (rc $rc)" ;;
  esac
  [ "$rc" -ne 0 ] && FAILED=1
  echo "--- [$name] $status in ${secs}s; last lines of $log:"
  tail -n 12 "$log" | cut -c1-300 | sed "s/^/    /"
  record "$name" "$status" "$secs"
  return 0
}

# ---- env ----------------------------------------------------------------------------------
env_info() {
  echo "date: $(date -u)"
  echo "uname: $(uname -srm)"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit \
      --format=csv
  else
    echo "nvidia-smi: not found"
  fi
  "$PY" -V
  "$PY" - <<'PYEOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu visible", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, "sm", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count,
          "L2 MiB", getattr(p, "L2_cache_size", 0) / 2**20, "mem GiB", round(p.total_memory / 2**30, 1))
PYEOF
  local nvcc
  nvcc=$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")
  "$nvcc" --version 2>&1 | tail -n 2 || echo "nvcc: not found"
  echo "compute-sanitizer: ${SANITIZER:-not found}"
  [ -n "${SANITIZER:-}" ] && "$SANITIZER" --version 2>&1 | tail -n 1
  "$PY" -c "import setuptools, ninja; print('setuptools', setuptools.__version__, 'ninja', ninja.__version__)" \
    2>&1 || echo "setuptools/ninja: import failed"
  git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "git: no commit info"
  # Exit status: 1 without a visible GPU (everything after will fail too).
  "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"
}

find_sanitizer() {
  local c
  for c in "$(command -v compute-sanitizer 2>/dev/null)" \
           "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
           /usr/local/cuda/bin/compute-sanitizer \
           /usr/local/cuda/compute-sanitizer/compute-sanitizer \
           /usr/local/cuda-*/bin/compute-sanitizer /opt/nvidia/*/compute-sanitizer/compute-sanitizer; do
    if [ -n "$c" ] && [ -x "$c" ]; then echo "$c"; return 0; fi
  done
  return 1
}
SANITIZER=$(find_sanitizer || true)

# ---- build --------------------------------------------------------------------------------
build() {
  export TASKSIEVE_CUDA=1 TASKSIEVE_CUDA_ARCHS="9.0a" MAX_JOBS=${DC_MAX_JOBS:-8} TASKSIEVE_NVCC_THREADS=4
  [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda
  if [ "${DC_BUILD:-inplace}" = "pip" ]; then
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . || return $?
  else
    "$PY" setup.py build_ext --inplace || return $?
  fi
  "$PY" -m tasksieve.info || return $?
  # Fail the step when an op lacks its CUDA kernel.
  "$PY" - <<'PYEOF'
import sys
from tasksieve import _ext
ops = _ext.op_names()
missing = [op for op in ops if not _ext.has_kernel(op, "CUDA")]
print(f"{len(ops) - len(missing)}/{len(ops)} ops have a CUDA kernel" + (f"; missing: {missing}" if missing else ""))
sys.exit(3 if (missing or not ops) else 0)
PYEOF
}

# ---- sanitizers ---------------------------------------------------------------------------
sanitize() {  # tool [extra args for sanitize_ops.py]
  local tool=$1
  shift
  if [ -z "${SANITIZER:-}" ]; then
    echo "compute-sanitizer not found (looked on PATH and under /usr/local/cuda*/bin)"
    return 127
  fi
  local filter=()
  [ -n "${DC_SANITIZE_FILTER:-}" ] && filter=(--kernel-name "$DC_SANITIZE_FILTER")
  # Every tensor its own cudaMalloc, so out-of-bounds accesses are not hidden by the pool.
  # --report-api-errors no: torch and the CUDA runtime probe APIs that fail on purpose (they
  # would count as errors); a failing launch of ours still raises in Python and fails the case.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --error-exitcode 99 \
    --report-api-errors no --print-limit 30 ${filter[@]+"${filter[@]}"} "$PY" bench/sanitize_ops.py "$@"
}

# ---- steps --------------------------------------------------------------------------------
export -f env_info build sanitize
export PY ROOT SANITIZER
echo "device_check: $(date -u), budget ${BUDGET}s, logs in $OUTDIR"
run_step env       30  440 "$OUTDIR/build.log"    env_info
run_step build     300 260 "$OUTDIR/build.log"    build
run_step tests     150 200 "$OUTDIR/tests.log"    "$PY" -m pytest -q -m "not slow and not gpusim" -p no:cacheprovider -rfE tests/
run_step simnative 60  170 "$OUTDIR/tests.log"    bash -c "make -j8 sim-runners && GPUSIM=native \"\$PY\" -m pytest -q -m gpusim -p no:cacheprovider -rfE tests/sim"
run_step memcheck  80  170 "$OUTDIR/sanitize.log" sanitize memcheck
run_step racecheck 50  150 "$OUTDIR/sanitize.log" sanitize racecheck --no-check
run_step vllm      120 220 "$OUTDIR/tests.log"    "$PY" bench/vllm_device_check.py
run_step bench     220 0   "$OUTDIR/bench.log"    "$PY" -m tasksieve.bench --quick --device cuda --out "$OUTDIR"

# ---- report -------------------------------------------------------------------------------
TOTAL=$(elapsed)
BENCH_MD=$(ls -t "$OUTDIR"/*_quick.md 2>/dev/null | head -n 1)
echo
echo "================ bench table (${BENCH_MD:-none}) ================"
if [ -n "$BENCH_MD" ]; then
  cat "$BENCH_MD"
else
  echo "(no benchmark table was written; see $OUTDIR/bench.log)"
fi
{
  echo "## device_check summary"
  echo
  echo "$(nvidia-smi -L 2>/dev/null | head -n 1 || echo 'no GPU') | $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "| step | status | seconds |"
  echo "|---|---|---|"
  printf "%s" "$SUMMARY_ROWS"
  echo "| total | $([ "$FAILED" -eq 0 ] && echo PASS || echo 'FAILED steps above') | $TOTAL |"
} > "$OUTDIR/summary.md"
echo
cat "$OUTDIR/summary.md"
echo "logs: $OUTDIR"
exit "$FAILED"
