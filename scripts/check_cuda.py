"""One-call check of the CUDA backend on a GPU machine: build, tests, compute-sanitizer, a first timing.

Run from the repository root on a machine with a GPU, a CUDA build of torch and nvcc:

    python3 scripts/check_cuda.py                 # every step; exit status 1 if any step failed
    python3 scripts/check_cuda.py --skip-build    # reuse the extension already built in place

Steps: (1) build fne_fast with its CUDA kernel (setup.py, in place), (2) check that the CUDA kernel is registered,
(3) pytest tests/test_sample_negatives_cuda.py, (4) compute-sanitizer memcheck over a small case that crosses
chunk and split boundaries in every mode (then racecheck and synccheck on fne_fast's own kernels), (5) time
backend="cuda" on the two acceptance shapes beside the measured copy bandwidth and bf16 matmul rate.
Each step prints the command it runs, so any one can be rerun alone. `--case` is the sanitizers' workload.
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


def sanitizer_case() -> None:
    """Small inputs through every code path: 3 chunks of 1000 columns (the last partial), several splits for
    few rows, k = 1 and 64, float32 / bf16 / float32-with-bf16 banks, partly filled, NaN beyond `filled`."""
    import torch

    import fne_fast

    os.environ["FNE_FAST_CUDA_CHUNK_COLS"] = "1000"
    generator = torch.Generator().manual_seed(0)
    for num_rows, anchor_dtype, bank_dtype in ((3, torch.float32, torch.float32),
                                              (70, torch.bfloat16, torch.bfloat16),
                                              (5, torch.float32, torch.bfloat16)):
        num_cols, dim = 2600, 24
        anchors = torch.randn(num_rows, dim, generator=generator).to(anchor_dtype).cuda()
        bank = torch.randn(num_cols, dim, generator=generator).to(bank_dtype).cuda()
        bank[2500:] = float("nan")
        args = (anchors, bank, torch.rand(num_rows).cuda(), torch.randint(0, 50, (num_rows,)).cuda(),
                torch.randint(0, 50, (num_cols,)).cuda(), torch.tensor([0.1, 0.04, 0.0, 0.04, 500.0]).cuda())
        for mode in ("fne", "hardest", "uniform"):
            for k in (1, 64):
                index, _, valid = fne_fast.sample_negatives(*args, k=k, mode=mode, filled=2500, col_offset=2**33,
                                                            backend="cuda")
                assert bool(((index[valid] >= 2**33) & (index[valid] < 2**33 + 2500)).all())
    empty = fne_fast.sample_negatives(anchors, bank[:0], *args[2:4], args[4][:0], args[5], k=2, backend="cuda")
    assert not bool(empty[2].any())
    torch.cuda.synchronize()
    print("sanitizer case done")


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
    parser.add_argument("--time-only", action="store_true", help="only the timing step")
    options = parser.parse_args()
    if options.case:
        sanitizer_case()
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
    results["memcheck"] = run_step("memcheck", [sanitizer, "--tool", "memcheck", "--error-exitcode", "1", *case])
    for tool in ("racecheck", "synccheck"):
        results[tool] = run_step(tool, [sanitizer, "--tool", tool, "--kernel-name", "kns=fne_fast",
                                        "--error-exitcode", "1", *case])
    results["timing"] = run_step("timing", [python, os.path.join("scripts", "check_cuda.py"), "--time-only"])
    print("\n" + "\n".join(f"{name}: {'ok' if ok else 'FAILED'}" for name, ok in results.items()))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
