#!/usr/bin/env bash
# The whole GPU check of fne_fast in one call, for a fresh GPU machine: an H200 whose image has torch 2.11+cu130,
# Triton 3.6, Python 3.12, nvcc 13.0 and no package registry. Nothing is installed or downloaded: the extension is
# built in place against the torch that is there, and everything runs from this tree.
#
#   bash scripts/gpu_check.sh OUT              # on the GPU machine
#   bash scripts/gpu_check.sh --dry-run OUT    # each step in its CPU form (CI runs it: tests/test_gpu_check.py)
#
# The machine is leased for minutes, so the steps that measure come first and the long checks after them:
#    1. build       setup.py build_ext --inplace, CUDA kernel for this GPU, ptxas -v      build.log
#    2. build-cpu   only if the CUDA build failed: a CPU-only build (FNE_FAST_FORCE_CPU=1),  build.log
#                   so that every Triton step still runs (import fne_fast needs fne_fast._C)
#    3. kernel      fne_fast and fne_fast.kernels import from the tree; the CUDA kernel is     build.log
#                   registered (unless step 2 ran)
#    4. backends    each GPU backend against the float64 oracle (exact inputs: same draws)    roofline.log, .json
#    5. core        the roofline core: the two acceptance shapes, worst and training cases:   roofline.log, .json
#                   Triton, CUDA, the GEMM into a preallocated output, copy bandwidth
#    6. ncu-*       one Nsight Compute launch each of the Triton kernel, the CUDA epilogue    ncu.log
#                   and the GEMM (informative: skipped without ncu, never fails the check)
#    7. tests       CUDA and Triton tests and the conformance suite on the GPU backends       tests.log
#    8. memcheck,   compute-sanitizer over scripts/check_cuda.py --case (memcheck with the     sanitizers.log
#       racecheck,  caching allocator off; racecheck and synccheck on fne_fast's own kernels)
#       synccheck
#    9. resources   registers, spills, shared memory of the shipped Triton configurations     resources.log
#                   under this machine's Triton (scripts/triton_resources.py)
#   10. rest        the other shapes and cases, check_finite, the plain eager sampler, CUDA   roofline.log, .json
#                   at other chunk sizes, the Triton sweep, the eager oracle
# OUT/summary.txt holds the versions, each step's status and seconds, and last the headline table. A file appears
# in OUT only whole (written aside, then renamed) as soon as its step ends; OUT holds at most 8 files, as many as
# the device tool brings back. The exit status is 1 if a step failed (the ncu steps excepted).
#
# Time: everything ends within GPU_CHECK_BUDGET_S (480 s by default). A step may take its cap, or less: what the
# budget leaves after reserving a floor for each later step; the rest gets what is left and stops itself in time.
# GPU_CHECK_SIMULATE_CUDA_BUILD_FAILURE=1 makes the build step fail at once (the dry run's test of the fallback).
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
PYTHON=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
SIMULATE_BUILD_FAILURE=${GPU_CHECK_SIMULATE_CUDA_BUILD_FAILURE:-0}
SECONDS=0
STATUS=0
BUILD=none  # what the tree holds once the build steps ran: cuda, cpu (the fallback) or none
OPTIONAL=0  # set around a step whose failure is reported but does not fail the check
# Logs grow in WORK and are copied whole into OUT after each step: OUT never holds a half-written file.
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"; rm -f "$OUT"/.*.tmp' EXIT
# This script's own files only: a fresh set of results, and the roofline stages merge into a new roofline.json.
for name in summary.txt build.log roofline.log roofline.json ncu.log tests.log sanitizers.log resources.log; do
  rm -f "$OUT/$name"
done
# The in-place build must win over any installed copy; the interpreter's own bin (ninja) on the PATH.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PATH="$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')"):$PATH"
export PATH
BENCH=("$PYTHON" bench/bench_sample_negatives_gpu.py --out "$OUT" $( ((DRY_RUN)) && echo --dry-run))

# Seconds reserved for each step while earlier ones run: a step may use its cap only from what is left above the
# floors of the steps after it. build-cpu's floor is reserved during the CUDA build only (it runs only after it).
ORDER=(build build-cpu kernel backends core ncu-triton ncu-cuda ncu-gemm tests memcheck racecheck synccheck
       resources rest)
declare -A FLOOR=([build]=0 [build-cpu]=0 [kernel]=5 [backends]=15 [core]=45 [ncu-triton]=5 [ncu-cuda]=5
                  [ncu-gemm]=5 [tests]=45 [memcheck]=30 [racecheck]=10 [synccheck]=10 [resources]=15 [rest]=20)
BUILD_CPU_RESERVE=60

later_floors() {  # later_floors STEP: the floors of the steps after STEP
  local name sum=0 after=0
  for name in "${ORDER[@]}"; do
    ((after)) && sum=$((sum + FLOOR[$name]))
    [[ $name == "$1" ]] && after=1
  done
  echo $sum
}

publish() {  # publish FILE: WORK/FILE into OUT/FILE whole (a rename within OUT is atomic)
  cp "$WORK/$1" "$OUT/.$1.tmp" && mv -f "$OUT/.$1.tmp" "$OUT/$1"
}

say() {  # say TEXT...: a line of the summary, on the terminal and in OUT/summary.txt at once
  printf '%s\n' "$*" | tee -a "$WORK/summary.txt"
  publish summary.txt
}

record() {  # record STEP STATUS SECONDS
  say "$(printf '%-10s %-44s %5ss' "$1" "$2" "$3")"
}

fail() {  # fail: a failed step fails the check, unless it is informative
  ((OPTIONAL)) || STATUS=1
}

limit_for() {  # limit_for CAP LATER_FLOORS: seconds a step may take now
  local left=$((BUDGET_S - SECONDS - $2))
  echo $(($1 < left ? $1 : left))
}

step() {  # step NAME CAP LOG COMMAND...: runs COMMAND, its output appended to OUT/LOG
  local name=$1 cap=$2 log=$3 later
  shift 3
  later=$(later_floors "$name")
  [[ $name == build ]] && later=$((later + BUILD_CPU_RESERVE))
  if [[ $name != build* && $BUILD == none ]]; then
    record "$name" "skipped (no build)" 0
    return 1
  fi
  local limit
  limit=$(limit_for "$cap" "$later")
  if ((limit < 5)); then
    record "$name" "SKIPPED (time budget)" 0
    fail
    return 1
  fi
  printf '$ %s\n' "$*" >>"$WORK/$log"
  local begin=$SECONDS rc=0
  timeout --kill-after=10 "$limit" "$@" >>"$WORK/$log" 2>&1 || rc=$?
  local took=$((SECONDS - begin))
  printf '[%s: exit %s after %ss]\n\n' "$name" "$rc" "$took" >>"$WORK/$log"
  publish "$log"
  local tag=
  ((OPTIONAL)) && tag=", informative"
  if ((rc == 0)); then
    record "$name" ok "$took"
  elif ((rc == 124 || rc == 137)); then
    record "$name" "TIMED OUT (limit ${limit}s$tag)" "$took"
    fail
  else
    record "$name" "FAILED (exit $rc, see $log$tag)" "$took"
    fail
  fi
  return $rc
}

note() {  # note NAME STATUS LOG: a step that does not run, with the reason in its log too
  printf '%s: %s\n\n' "$1" "$2" >>"$WORK/$3"
  publish "$3"
  record "$1" "$2" 0
}

# 0. The card and the versions.
{
  echo "fne_fast GPU check$( ((DRY_RUN)) && echo ' (dry run: CPU forms of the steps)')," \
    "$(date -u '+%Y-%m-%d %H:%M UTC'), budget ${BUDGET_S}s"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  "$PYTHON" -c 'import platform, torch, triton; print(f"python {platform.python_version()}, torch",
    torch.__version__, f"(CUDA {torch.version.cuda}), triton {triton.__version__}")' 2>&1
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  command -v nvcc >/dev/null && nvcc --version | tail -1
  echo
} >"$WORK/summary.txt"
cat "$WORK/summary.txt"
publish summary.txt

# 1-2. Build in place (ptxas -v puts the CUDA kernels' registers, spills and shared memory in build.log); if the
#      CUDA build fails, a CPU-only build, without which no Triton step could import fne_fast.
if ((SIMULATE_BUILD_FAILURE)); then
  note build "FAILED (simulated CUDA build failure)" build.log
  STATUS=1
elif ((DRY_RUN)); then
  record build "skipped (dry run: current build)" 0
  BUILD=cuda
else
  arch=$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>>"$WORK/build.log")
  step build 240 build.log env MAX_JOBS="$(nproc)" TORCH_CUDA_ARCH_LIST="${arch:-9.0}" FNE_FAST_FORCE_CPU=0 \
    FNE_FAST_NVCC_FLAGS="-Xptxas=-v" "$PYTHON" setup.py build_ext --inplace && BUILD=cuda
fi
if [[ $BUILD == none ]]; then
  if ((DRY_RUN)); then
    record build-cpu "skipped (dry run: current build)" 0
    BUILD=cpu
  else
    step build-cpu 120 build.log env MAX_JOBS="$(nproc)" FNE_FAST_FORCE_CPU=1 "$PYTHON" setup.py build_ext \
      --inplace && BUILD=cpu
  fi
fi

# 3. What was built: on the GPU machine the CUDA kernel must be registered, unless the fallback build ran.
KERNEL_CHECK='
import sys, torch, fne_fast, fne_fast.kernels.sample_negatives
from fne_fast import ops
print("fne_fast from", fne_fast.__file__)
print("cuda available:", torch.cuda.is_available(), "| compiled CUDA kernel:", ops.COMPILED_CUDA_KERNEL,
      "| Triton serves the CUDA key:", ops.TRITON_SERVES_CUDA)
if sys.argv[1] != "cpu":
    assert torch.cuda.is_available(), "no GPU visible to torch"
if sys.argv[1] == "cuda":
    assert ops.COMPILED_CUDA_KERNEL, "fne_fast was built without its CUDA kernel"
'
if ((DRY_RUN)); then
  expect=cpu
elif [[ $BUILD == cuda ]]; then
  expect=cuda
else
  expect=triton  # the fallback build: a GPU, but no CUDA kernel
fi
step kernel 30 build.log "$PYTHON" -c "$KERNEL_CHECK" "$expect"

# 4-5. The measurements first: the backends against the oracle, then the roofline core, each with its own budget
#      (the bench starts no measurement past --budget-s, so it ends before the step's limit).
bench_budget() {  # bench_budget CAP STEP: --budget-s for the bench stage of STEP, which may take CAP
  local limit
  limit=$(limit_for "$1" "$(later_floors "$2")")
  echo $((limit > 40 ? limit - 20 : limit / 2))
}
step backends 90 roofline.log "${BENCH[@]}" --stage backends --budget-s "$(bench_budget 90 backends)"
step core 150 roofline.log "${BENCH[@]}" --stage core --case worst,training --budget-s "$(bench_budget 150 core)"

# 6. One Nsight Compute launch per kernel (the first launch whose name matches; the GEMM runs on uninitialised
#    inputs, so it is its process's first kernel). Informative: ncu may be absent or lack the counters' permission.
ncu_profile() {  # ncu_profile NCU METHOD [KERNEL_FILTER]: fails where no kernel was profiled
  local filter=() rc
  [[ -n ${3:-} ]] && filter=(--kernel-name "$3")
  "$1" "${filter[@]}" --launch-count 1 "$PYTHON" bench/bench_sample_negatives_gpu.py --stage profile \
    --method "$2" --out "$WORK/profile" 2>&1 | tee "$WORK/ncu_output.txt"
  rc=${PIPESTATUS[0]}
  ((rc == 0)) && ! grep -q "No kernels were profiled" "$WORK/ncu_output.txt"
}
export -f ncu_profile
export PYTHON WORK
NCU=$(command -v ncu)
[[ -z $NCU && -x ${CUDA_HOME:-/usr/local/cuda}/bin/ncu ]] && NCU=${CUDA_HOME:-/usr/local/cuda}/bin/ncu
OPTIONAL=1
for target in triton:regex:_sample_negatives_kernel cuda:regex:epilogue_kernel gemm:; do
  method=${target%%:*} filter=${target#*:}
  if ((DRY_RUN)); then  # the profiled call alone: its path, without ncu
    step "ncu-$method" 30 ncu.log "${BENCH[@]}" --stage profile --method "$method"
  elif [[ $method == cuda && $BUILD != cuda ]]; then
    note "ncu-$method" "skipped (no CUDA kernel built)" ncu.log
  elif [[ -z $NCU ]]; then
    note "ncu-$method" "skipped (ncu not found)" ncu.log
  else
    step "ncu-$method" 60 ncu.log bash -c 'ncu_profile "$@"' _ "$NCU" "$method" "$filter"
  fi
done
OPTIONAL=0

# 7. Tests: the GPU tests and the conformance suite on the GPU backends (the resource compile tests are step 9).
#    -v and --tb=short leave one line per test and short tracebacks in tests.log even if the step times out;
#    each xdist worker gets its share of the cores (8 workers × torch's default threads would oversubscribe).
TESTS=(tests/test_sample_negatives_cuda.py tests/test_sample_negatives_triton.py tests/test_sample_negatives.py
       tests/test_sampler_criteria.py tests/test_language_guidance.py -k "(cuda or triton) and not compile_for")
if ((DRY_RUN)); then
  step tests 60 tests.log "$PYTHON" -m pytest -q -p no:cacheprovider --collect-only "${TESTS[@]}"
else
  cores=$(nproc) workers=1 options=()
  "$PYTHON" -c 'import xdist' 2>/dev/null && workers=$((cores < 8 ? cores : 8)) && options+=(-n "$workers")
  "$PYTHON" -c 'import pytest_timeout' 2>/dev/null && options+=(--timeout=60)
  threads=$((cores / workers > 0 ? cores / workers : 1))
  step tests 240 tests.log env OMP_NUM_THREADS="$threads" MKL_NUM_THREADS="$threads" "$PYTHON" -m pytest -v \
    --tb=short -rs -p no:cacheprovider "${options[@]}" "${TESTS[@]}"
fi

# 8. Sanitizers. memcheck with PyTorch's caching allocator off (an out-of-bounds access inside a cached block would
#    go unseen), over both backends; racecheck and synccheck on fne_fast's own kernels (Triton's asynchronous
#    copies are not theirs to judge). API errors are not counted: torch and Triton probe the driver with calls
#    that may fail by design.
CASE=("$PYTHON" scripts/check_cuda.py --case)
if ((DRY_RUN)); then
  for tool in memcheck racecheck synccheck; do
    step "$tool" 60 sanitizers.log "${CASE[@]}" --dry-run
  done
else
  sanitizer=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
  quiet=(--report-api-errors no --error-exitcode 1 --print-limit 20)
  if [[ ! -x $sanitizer ]]; then
    for tool in memcheck racecheck synccheck; do
      note "$tool" "FAILED (compute-sanitizer not found)" sanitizers.log
    done
    STATUS=1
  else
    step memcheck 150 sanitizers.log env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool memcheck \
      "${quiet[@]}" "${CASE[@]}"
    for tool in racecheck synccheck; do
      if [[ $BUILD != cuda ]]; then
        note "$tool" "skipped (no CUDA kernel built)" sanitizers.log
      else
        step "$tool" 90 sanitizers.log env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool "$tool" \
          --kernel-name kns=fne_fast "${quiet[@]}" "${CASE[@]}"
      fi
    done
  fi
fi

# 9. Triton resources under this machine's Triton (the full table on the GPU machine; a few kernels in a dry run).
step resources 60 resources.log "$PYTHON" scripts/triton_resources.py --arch 90 $( ((DRY_RUN)) && echo --subset)

# 10. The rest of the roofline: whatever the budget leaves.
step rest 600 roofline.log "${BENCH[@]}" --stage rest --budget-s "$(bench_budget 600 rest)"

say ""
say "total $SECONDS s of ${BUDGET_S} s; $( ((STATUS == 0)) && echo 'all steps ok' || echo 'SOME STEPS FAILED')"
# The headline table last (it reads roofline.json only: no torch, no GPU).
if [[ -f $OUT/roofline.json ]]; then
  say ""
  say "$("$PYTHON" bench/bench_sample_negatives_gpu.py --out "$OUT" --stage table \
    $( ((DRY_RUN)) && echo --dry-run) 2>&1)"
fi
exit $STATUS
