#!/usr/bin/env bash
# The whole GPU check of fne_fast in one call, for a fresh GPU machine: an H200 whose image has torch 2.11+cu130,
# Triton 3.6, Python 3.12, nvcc 13.0 and no package registry. Nothing is installed or downloaded: the extension is
# built in place against the torch that is there, and everything runs from this tree.
#
#   bash scripts/gpu_check.sh OUT              # on the GPU machine
#   bash scripts/gpu_check.sh --dry-run OUT    # each step in its CPU form (CI runs it: tests/test_gpu_check.py)
#
# Steps, written to OUT (at most 8 files, as the device tool brings back):
#   1. build      setup.py build_ext --inplace, CUDA kernel for this GPU's architecture   build.log
#   2. kernel     fne_fast and fne_fast.kernels import from the tree; ops.COMPILED_CUDA_KERNEL   build.log
#   3. resources  registers, spills, shared memory of the shipped Triton configs        resources.log
#                 (scripts/triton_resources.py under this machine's Triton)
#   4. tests      CUDA and Triton tests, and the conformance suite on the cuda and     tests.log
#                 triton backends (pytest-xdist where installed)
#   5. memcheck   compute-sanitizer memcheck with PyTorch's caching allocator off,      memcheck.log
#                 over scripts/check_cuda.py --case (multi-split chunks, both backends)
#   6. roofline   bench/bench_sample_negatives_gpu.py: ceilings, oracle checks, the     roofline.log, .json
#                 backends at the GPU target shapes, a bounded sweep (no torch.compile stage)
# OUT/summary.txt holds the versions and each step's status and seconds; the exit status is 1 if a step failed.
#
# Time: everything ends within GPU_CHECK_BUDGET_S (480 s by default). A step may take its cap, or less: what the
# budget leaves after reserving a floor for each later step; the roofline gets the rest and stops itself in time.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=1
  shift
fi
if [[ $# -ne 1 ]]; then
  echo "usage: bash scripts/gpu_check.sh [--dry-run] OUT" >&2
  exit 2
fi
mkdir -p "$1" && OUT=$(cd "$1" && pwd) || exit 2
SUMMARY=$OUT/summary.txt
PYTHON=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
SECONDS=0
STATUS=0
BUILD_OK=1
# The in-place build must win over any installed copy; the interpreter's own bin (ninja) on the PATH.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PATH="$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')"):$PATH"
export PATH

# Seconds reserved for each step while earlier ones run (a step may use its cap only from what is left above the
# floors of the steps after it).
FLOOR_KERNEL=10 FLOOR_RESOURCES=20 FLOOR_TESTS=60 FLOOR_MEMCHECK=60 FLOOR_ROOFLINE=60
AFTER_MEMCHECK=$FLOOR_ROOFLINE
AFTER_TESTS=$((FLOOR_MEMCHECK + AFTER_MEMCHECK))
AFTER_RESOURCES=$((FLOOR_TESTS + AFTER_TESTS))
AFTER_KERNEL=$((FLOOR_RESOURCES + AFTER_RESOURCES))
AFTER_BUILD=$((FLOOR_KERNEL + AFTER_KERNEL))

record() {  # record STEP STATUS SECONDS
  printf '%-10s %-34s %5ss\n' "$1" "$2" "$3" | tee -a "$SUMMARY"
}

limit_for() {  # limit_for CAP LATER_FLOORS: seconds a step may take now
  local left=$((BUDGET_S - SECONDS - $2))
  echo $(($1 < left ? $1 : left))
}

step() {  # step NAME CAP LATER_FLOORS LOG COMMAND...: runs COMMAND, its output appended to OUT/LOG
  local name=$1 cap=$2 later=$3 log=$4
  shift 4
  if ((!BUILD_OK)); then
    record "$name" "skipped (build failed)" 0
    return 1
  fi
  local limit
  limit=$(limit_for "$cap" "$later")
  if ((limit < 5)); then
    record "$name" "SKIPPED (time budget)" 0
    STATUS=1
    return 1
  fi
  printf '$ %s\n' "$*" >>"$OUT/$log"
  local begin=$SECONDS rc=0
  timeout --kill-after=10 "$limit" "$@" >>"$OUT/$log" 2>&1 || rc=$?
  local took=$((SECONDS - begin))
  if ((rc == 0)); then
    record "$name" ok "$took"
  elif ((rc == 124 || rc == 137)); then
    record "$name" "TIMED OUT (limit ${limit}s)" "$took"
    STATUS=1
  else
    record "$name" "FAILED (exit $rc, see $log)" "$took"
    STATUS=1
  fi
  return $rc
}

{
  echo "fne_fast GPU check$( ((DRY_RUN)) && echo ' (dry run: CPU forms of the steps)')," \
    "$(date -u '+%Y-%m-%d %H:%M UTC'), budget ${BUDGET_S}s"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  "$PYTHON" -c 'import platform, torch, triton; print(f"python {platform.python_version()}, torch",
    torch.__version__, f"(CUDA {torch.version.cuda}), triton {triton.__version__}")' 2>&1
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  command -v nvcc >/dev/null && nvcc --version | tail -1
  echo
} >"$SUMMARY"
cat "$SUMMARY"

# 1-2. Build in place, then check what was built.
if ((DRY_RUN)); then
  record build "skipped (dry run: current build)" 0
else
  arch=$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>>"$OUT/build.log")
  step build 240 $AFTER_BUILD build.log env MAX_JOBS="$(nproc)" TORCH_CUDA_ARCH_LIST="${arch:-9.0}" \
    FNE_FAST_FORCE_CPU=0 "$PYTHON" setup.py build_ext --inplace || BUILD_OK=0
fi
KERNEL_CHECK='
import sys, torch, fne_fast, fne_fast.kernels.sample_negatives
from fne_fast import ops
print("fne_fast from", fne_fast.__file__)
print("cuda available:", torch.cuda.is_available(), "| compiled CUDA kernel:", ops.COMPILED_CUDA_KERNEL,
      "| Triton serves the CUDA key:", ops.TRITON_SERVES_CUDA)
if sys.argv[1] == "gpu":
    assert torch.cuda.is_available(), "no GPU visible to torch"
    assert ops.COMPILED_CUDA_KERNEL, "fne_fast was built without its CUDA kernel"
'
step kernel 30 $AFTER_KERNEL build.log "$PYTHON" -c "$KERNEL_CHECK" "$( ((DRY_RUN)) && echo cpu || echo gpu)"

# 3. Triton resources (the full table on the GPU machine; a few kernels in a dry run).
step resources 60 $AFTER_RESOURCES resources.log "$PYTHON" scripts/triton_resources.py --arch 90 \
  $( ((DRY_RUN)) && echo --subset)

# 4. Tests: the GPU tests and the conformance suite on the GPU backends (the resource compile tests ran in step 3).
TESTS=(tests/test_sample_negatives_cuda.py tests/test_sample_negatives_triton.py tests/test_sample_negatives.py
       -k "(cuda or triton) and not compile_for")
if ((DRY_RUN)); then
  step tests 60 $AFTER_TESTS tests.log "$PYTHON" -m pytest -q -p no:cacheprovider --collect-only "${TESTS[@]}"
else
  workers=()
  "$PYTHON" -c 'import xdist' 2>/dev/null && workers=(-n "$(($(nproc) < 8 ? $(nproc) : 8))")
  step tests 170 $AFTER_TESTS tests.log "$PYTHON" -m pytest -q -rs -p no:cacheprovider "${workers[@]}" "${TESTS[@]}"
fi

# 5. memcheck (an out-of-bounds access inside a cached block would go unseen with the caching allocator on).
#    API errors are not counted: torch and Triton probe the driver with calls that may fail by design.
if ((DRY_RUN)); then
  step memcheck 60 $AFTER_MEMCHECK memcheck.log "$PYTHON" scripts/check_cuda.py --case --dry-run
else
  sanitizer=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
  step memcheck 120 $AFTER_MEMCHECK memcheck.log env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool memcheck \
    --report-api-errors no --error-exitcode 1 --print-limit 20 "$PYTHON" scripts/check_cuda.py --case
fi

# 6. Roofline: the rest of the budget; the script stops starting measurements 20 s before its limit.
limit=$(limit_for 600 0)
step roofline 600 0 roofline.log "$PYTHON" bench/bench_sample_negatives_gpu.py --out "$OUT" \
  --budget-s $((limit > 40 ? limit - 20 : limit / 2)) $( ((DRY_RUN)) && echo --dry-run)

echo | tee -a "$SUMMARY"
echo "total $SECONDS s of ${BUDGET_S} s; $( ((STATUS == 0)) && echo 'all steps ok' || echo 'SOME STEPS FAILED')" \
  | tee -a "$SUMMARY"
exit $STATUS
