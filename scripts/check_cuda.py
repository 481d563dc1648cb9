"""One-call check of the CUDA backend on a GPU machine: build, tests, compute-sanitizer, a first timing.

Run from the repository root on a machine with a GPU, a CUDA build of torch and nvcc:

    python3 scripts/check_cuda.py                 # every step; exit status 1 if any step failed
    python3 scripts/check_cuda.py --skip-build    # reuse the extension already built in place

Steps: (1) build fne_fast with its CUDA kernel (setup.py, in place), (2) check that the CUDA kernel is registered,
(3) pytest tests/test_sample_negatives_cuda.py, (4) compute-sanitizer memcheck, with PyTorch's caching allocator
off (so that an access beyond a tensor is beyond its allocation), over a small case that crosses chunk and split
boundaries and the multi-split merge in every mode (then racecheck and synccheck on fne_fast's own kernels),
(5) time backend="cuda" on the two acceptance shapes beside the measured copy bandwidth and bf16 matmul rate.
Each step prints the command it runs, so any one can be rerun alone. `--case` is the sanitizers' workload
(`--case --dry-run`: its logic on the CPU). scripts/gpu_check.sh runs the whole GPU check, this case included.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the in-place build, when this file runs as a script from scripts/


def run_step(name: str, command: list[str], env: dict | None = None) -> bool:
    print(f"\n=== {name}\n$ {' '.join(command)}", flush=True)
    ok = subprocess.call(command, cwd=ROOT, env={**os.environ, **(env or {})}) == 0
    print(f"=== {name}: {'ok' if ok else 'FAILED'}", flush=True)
    return ok


# The sanitizers' workload: bank columns per chunk (FNE_FAST_CUDA_CHUNK_COLS) and the bank's length. The CUDA
# kernel cuts a chunk into min(ceil(4 · SMs / B), ceil(chunk / 1024)) column splits and merges their lists after
# every second chunk (sample_negatives_cuda.cu, chunk_columns and split_cols); with 5000-column chunks of 11500
# live columns, B <= 105 on a 132-SM GPU gets 5, 5 and 2 splits: the first merge folds two chunks' 10 lists, the
# second the last chunk's 2 into the running lists, and the last chunk's epilogue starts from a merged floor.
CASE_CHUNK_COLS, CASE_COLUMNS, CASE_FILLED = 5000, 12000, 11500


def expected_splits(num_rows: int, chunk_cols: int, multiprocessors: int) -> list[int]:
    """Splits per chunk of the case (the .cu file's arithmetic, mirrored here to check the case's coverage)."""
    ceil = lambda a, b: -(-a // b)  # noqa: E731
    chunk = min(chunk_cols, CASE_FILLED)
    split_cols = ceil(chunk, max(1, min(ceil(4 * multiprocessors, num_rows), ceil(chunk, 1024))))
    return [ceil(min(chunk, CASE_FILLED - begin), split_cols) for begin in range(0, CASE_FILLED, chunk)]


def sanitizer_case(device: str = "cuda") -> None:
    """Every code path on small inputs: chunks of 5000 columns cut into several splits (see expected_splits), k = 1
    and 64, float32 / bf16 / float32-with-bf16 banks, partly filled with NaN beyond `filled`, global columns above
    2³², every mode; the compiled CUDA kernel and the Triton kernels (whose merge kernel folds one list per split).
    On a CPU (--dry-run) the same calls run on the C++ kernel: the case's logic, without the GPU kernels."""
    import torch

    import fne_fast
    from fne_fast import ops

    os.environ["FNE_FAST_CUDA_CHUNK_COLS"] = str(CASE_CHUNK_COLS)
    backends = ((["cuda"] if ops.COMPILED_CUDA_KERNEL else []) + ["triton"]) if device == "cuda" else ["cpu"]
    if device == "cuda":
        splits = expected_splits(70, CASE_CHUNK_COLS, torch.cuda.get_device_properties(0).multi_processor_count)
        print(f"CUDA kernel, B = 70: splits per chunk {splits}")
        assert max(splits) > 1, "the case no longer crosses the multi-split merge"
    generator = torch.Generator().manual_seed(0)
    for num_rows, anchor_dtype, bank_dtype in ((3, torch.float32, torch.float32),
                                              (70, torch.bfloat16, torch.bfloat16),
                                              (5, torch.float32, torch.bfloat16)):
        dim = 24
        anchors = torch.randn(num_rows, dim, generator=generator).to(anchor_dtype).to(device)
        bank = torch.randn(CASE_COLUMNS, dim, generator=generator).to(bank_dtype).to(device)
        bank[CASE_FILLED:] = float("nan")
        args = (anchors, bank, torch.rand(num_rows).to(device), torch.randint(0, 50, (num_rows,)).to(device),
                torch.randint(0, 50, (CASE_COLUMNS,)).to(device),
                torch.tensor([0.1, 0.04, 0.0, 0.04, 500.0]).to(device))
        for backend in backends:
            for mode in ("fne", "hardest", "uniform"):
                for k in (1, 64):
                    index, _, valid = fne_fast.sample_negatives(*args, k=k, mode=mode, filled=CASE_FILLED,
                                                                col_offset=2**33, backend=backend)
                    chosen = index[valid]
                    assert bool(((chosen >= 2**33) & (chosen < 2**33 + CASE_FILLED)).all()), (backend, mode, k)
    for backend in backends:
        empty = fne_fast.sample_negatives(anchors, bank[:0], *args[2:4], args[4][:0], args[5], k=2, backend=backend)
        assert not bool(empty[2].any())
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"sanitizer case done ({', '.join(backends)})")


def timing() -> None:
    import torch

    import fne_fast

    def milliseconds(function, repeats=10) -> float:
        function()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            function()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / repeats

    source = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    copy_bandwidth = 2 * source.numel() / milliseconds(lambda: target.copy_(source)) / 1e6  # GB/s, read + write
    del source, target
    square = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    matmul_rate = 2 * 8192**3 / milliseconds(lambda: square @ square) / 1e9  # TFLOP/s
    del square
    print(f"{torch.cuda.get_device_name()}: copy {copy_bandwidth:.0f} GB/s, bf16 matmul {matmul_rate:.0f} TFLOP/s")
    for num_rows, num_cols, dim in ((128, 4 * 2**20, 256), (1024, 2**20, 768)):
        anchors = torch.nn.functional.normalize(torch.randn(num_rows, dim, device="cuda"), dim=1).bfloat16()
        bank = torch.nn.functional.normalize(torch.randn(num_cols, dim, device="cuda"), dim=1).bfloat16()
        args = (anchors, bank, torch.full((num_rows,), 0.5, device="cuda"), torch.arange(num_rows, device="cuda"),
                torch.arange(num_cols, device="cuda") + num_rows,
                torch.tensor([-1.0, 0.01, 0.0, 0.01, 500.0], device="cuda"))
        ms = milliseconds(lambda: fne_fast.sample_negatives(*args, backend="cuda", check_finite=False))
        bandwidth = bank.numel() * bank.element_size() / ms / 1e6
        rate = 2 * num_rows * num_cols * dim / ms / 1e9
        print(f"B={num_rows} N={num_cols} D={dim} bf16: {ms:.3f} ms, bank read {bandwidth:.0f} GB/s "
              f"({100 * bandwidth / copy_bandwidth:.0f}% of copy), {rate:.0f} TFLOP/s "
              f"({100 * rate / matmul_rate:.0f}% of matmul)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--case", action="store_true", help="run the sanitizers' workload and exit")
    parser.add_argument("--dry-run", action="store_true", help="with --case: on the CPU (checks the case's logic)")
    parser.add_argument("--time-only", action="store_true", help="only the timing step")
    options = parser.parse_args()
    if options.case:
        sanitizer_case("cpu" if options.dry_run else "cuda")
        return 0
    if options.time_only:
        timing()
        return 0

    results = {}
    python = sys.executable
    if not options.skip_build:
        # In place, without pip: nothing is fetched and no other environment is touched.
        results["build"] = run_step("build", [python, "setup.py", "build_ext", "--inplace"],
                                    env={"FNE_FAST_FORCE_CPU": "0", "MAX_JOBS": str(os.cpu_count() or 4)})
    registered = ("import torch, fne_fast; from fne_fast import ops; assert torch.cuda.is_available(), 'no GPU'; "
                  "assert ops.COMPILED_CUDA_KERNEL, 'fne_fast was built without its CUDA kernel'; "
                  "print('CUDA kernel registered')")
    results["registered"] = run_step("kernel registered", [python, "-c", registered])
    results["tests"] = run_step("tests", [python, "-m", "pytest", "-q", "-rs", "tests/test_sample_negatives_cuda.py"])
    sanitizer = shutil.which("compute-sanitizer") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"),
                                                                   "bin", "compute-sanitizer")
    case = [python, os.path.join("scripts", "check_cuda.py"), "--case"]
    no_cache = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    # API errors are not counted: torch and Triton probe the driver with calls that may fail by design.
    quiet_api = ["--report-api-errors", "no", "--error-exitcode", "1"]
    results["memcheck"] = run_step("memcheck", [sanitizer, "--tool", "memcheck", *quiet_api, *case], env=no_cache)
    for tool in ("racecheck", "synccheck"):
        results[tool] = run_step(tool, [sanitizer, "--tool", tool, "--kernel-name", "kns=fne_fast", *quiet_api,
                                        *case], env=no_cache)
    results["timing"] = run_step("timing", [python, os.path.join("scripts", "check_cuda.py"), "--time-only"])
    print("\n" + "\n".join(f"{name}: {'ok' if ok else 'FAILED'}" for name, ok in results.items()))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
