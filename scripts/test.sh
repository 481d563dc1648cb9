#!/usr/bin/env bash
# Runs every test: the Python suite (CPU kernels, the oracle, Triton through its interpreter; CUDA tests skip
# without a GPU), the C++ unit tests with ctest and the nvcc compile check of the CUDA sources, then the wheel a
# user gets, built and installed into a fresh virtual environment (scripts/check_wheel.sh).
set -uo pipefail
cd "$(dirname "$0")/.."

status=0
python -m pytest -q tests || status=$?

build_dir=build/cmake
mkdir -p build
if cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release >"$build_dir.log" 2>&1 \
    && cmake --build "$build_dir" >>"$build_dir.log" 2>&1; then
  grep -E "compile-checking" "$build_dir.log" \
    || echo "cmake: no CUDA compile check (nvcc not found, or no csrc/cuda/*.cu sources)"
  ctest --test-dir "$build_dir" --output-on-failure || status=$?
else
  cat "$build_dir.log"
  echo "C++ build or CUDA compile check FAILED"
  status=1
fi
bash scripts/check_wheel.sh 2> >(grep -v "^WARNING: Location" >&2) || { echo "wheel check FAILED"; status=1; }
exit $status
