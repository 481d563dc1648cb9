"""GPU roofline of fne_fast.sample_negatives: one call measures, checks and times everything.

    python bench/bench_sample_negatives_gpu.py --build --out DIR     # fresh CUDA machine: build in place first
    python bench/bench_sample_negatives_gpu.py --out DIR             # fne_fast already built or installed
    python bench/bench_sample_negatives_gpu.py --out DIR --dry-run   # CPU, Triton interpreter, tiny shapes

Steps: (1) the device's ceilings: a large device-to-device copy (bytes read + written) and a large bf16 matmul;
(2) every GPU backend against the float64 oracle at a small size (exact inputs must give identical draws);
(3) for each (B, N, D, bank dtype) of the GPU targets: the Triton kernel (default tiles, plus a small sweep), the
compiled CUDA kernel when it was built, the eager oracle in float32 and the bare matmul ``anchors @ bank.T``; with
``--compile`` also torch.compile of the oracle (its first call compiles for minutes, which no budget bounds: off by
default). Times are medians of CUDA-event timings; "extra MB" is the peak allocation above the inputs. GB/s counts
reading the bank once; TFLOP/s counts 2·B·N·D. The table is printed as markdown (for bench/RESULTS.md) and
everything goes to DIR/roofline.json, rewritten after each measurement so that a run cut short by a time limit
still leaves its results. ``--budget-s`` starts nothing after that many seconds; a configuration the device
cannot run (too much shared memory, a compile error) is recorded with its error and the sweep goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time

SHAPES = ((32, 8224, 768, "float32"), (128, 4 * 2**20, 256, "bfloat16"), (1024, 2**20, 768, "bfloat16"),
          (128, 16 * 2**20, 128, "bfloat16"))
DRY_RUN_SHAPES = ((8, 300, 24, "float32"), (16, 700, 32, "bfloat16"))
ORACLE_BYTES_PER_PAIR = 112  # peak of the oracle's B×N temporaries (float32, int64 Philox limbs, sorts) on CPU


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for roofline.json")
    parser.add_argument("--build", action="store_true", help="first run `setup.py build_ext --inplace` (the C++ "
                        "kernels, and the CUDA one where nvcc exists), as a fresh GPU machine needs")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU through the Triton interpreter")
    parser.add_argument("--shapes", default=None, help="comma-separated indices into the shape list (default all)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the oracle (minutes)")
    parser.add_argument("--no-sweep", action="store_true", help="time the default Triton tiles only")
    parser.add_argument("--budget-s", type=float, default=540.0, help="start nothing new after this many seconds")
    return parser.parse_args(argv)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Set by main() (after the optional in-place build), read by the functions below.
ARGS = START = DEVICE = None
torch = triton = fne_fast = ops = reference = triton_kernels = triton_configs = None
DTYPES = {}


def load_modules(args) -> None:
    """Imports torch, Triton and fne_fast after the optional in-place build (whose result must win over an
    installed copy), with TRITON_INTERPRET set first for a dry run."""
    global torch, triton, fne_fast, ops, reference, triton_kernels, triton_configs, DEVICE, DTYPES
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before fne_fast.kernels is imported
    if args.build:
        subprocess.check_call([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT)
    sys.path.insert(0, ROOT)
    import torch as torch_module
    import triton as triton_module

    import fne_fast as package
    from fne_fast import ops as ops_module
    from fne_fast.ops import reference as reference_module
    from fne_fast.kernels import configs as configs_module
    from fne_fast.kernels import sample_negatives as kernels_module

    torch, triton, fne_fast, ops, reference = torch_module, triton_module, package, ops_module, reference_module
    triton_kernels, triton_configs = kernels_module, configs_module
    DEVICE = torch.device("cpu" if args.dry_run else "cuda")
    DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def over_budget() -> bool:
    return time.perf_counter() - START > ARGS.budget_s


def synchronize():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn, target_s=1.0, min_reps=3, max_reps=25) -> float:
    """Median milliseconds of fn() after one warm-up call (which also compiles). A dry run times one call: it
    checks the path, not the numbers."""
    from fne_fast.ops.testing import median_seconds

    if ARGS.dry_run:
        return 1e3 * median_seconds(fn, 1, device=DEVICE)
    return 1e3 * median_seconds(fn, min_reps, device=DEVICE, target_seconds=target_s, max_repeats=max_reps)


def extra_memory_mb(fn) -> float | None:
    """Peak bytes allocated by one call above what was allocated before it, in MB (CUDA only)."""
    if DEVICE.type != "cuda":
        return None
    synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure_ceilings(results):
    """Copy bandwidth (read + write) and bf16 matmul rate of this device."""
    if DEVICE.type != "cuda":
        results["ceilings"] = {"copy_GBps": None, "bf16_matmul_TFLOPs": None, "note": "dry run: no ceilings"}
        return
    numel = 2**30 // 2  # 1 GiB of bf16 per buffer
    src = torch.empty(numel, dtype=torch.bfloat16, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    copy_ms = time_call(lambda: dst.copy_(src), target_s=2.0)
    del src, dst
    size = 8192
    a = torch.randn(size, size, dtype=torch.bfloat16, device=DEVICE)
    b = torch.randn(size, size, dtype=torch.bfloat16, device=DEVICE)
    matmul_ms = time_call(lambda: a @ b, target_s=2.0)
    del a, b
    torch.cuda.empty_cache()
    results["ceilings"] = {"copy_GBps": 2 * numel * 2 / copy_ms / 1e6,
                           "bf16_matmul_TFLOPs": 2 * size**3 / matmul_ms / 1e9}


def make_inputs(num_rows, num_cols, dim, bank_dtype, *, exact=False, seed=0):
    """Unit-norm random embeddings (or exact small-integer ones), generated on the device; statistics put the
    cut-down threshold ~1.3σ above 0, so ~10% of the pairs survive it."""
    from fne_fast.ops.testing import sample_inputs

    cut = 1.28 / math.sqrt(dim)
    return sample_inputs(num_rows, num_cols, dim, kind="exact" if exact else "random", bank_dtype=bank_dtype,
                         anchor_dtype=torch.float32 if bank_dtype == torch.float32 else bank_dtype, seed=seed,
                         stats=(cut + 0.2, 0.01, 0.0, 0.01, 500.0), device=DEVICE, generator_device=DEVICE)


OPTIONS = dict(k=1, mode="fne", seed=1234, step=3)
CORE_METHODS = ("triton", "triton (check_finite)", "cuda (compiled C++)")
COUNTERS = dict(seed=1234, step=3)


def triton_options():
    from fne_fast.ops.options import SamplerOptions

    return SamplerOptions(k=OPTIONS["k"], mode=OPTIONS["mode"])


def sweep_configs(num_rows, dim, bank_dtype):
    """A few alternatives to the default tiles (kernels/configs.py default_config: 8 warps, no spills on
    sm_90): larger epilogue tiles that spill a little, 4 warps, deeper pipelining. The dry run tries one, to check
    the path. Each is one row of the table; one the device cannot run is recorded with its error."""
    if ARGS.no_sweep:
        return {}
    low = bank_dtype != torch.float32
    default = triton_configs.default_config(num_rows, dim, OPTIONS["k"], low, DEVICE)
    shapes = (((64, 32, 4, 3),) if DEVICE.type != "cuda" else
              ((128, 64, 8, 3), (64, 64, 8, 4), (64, 64, 4, 3), (128, 128, 8, 3)))
    configs = {}
    for block_m, block_n, warps, stages in shapes:
        config = dataclasses.replace(default, block_m=min(block_m, default.block_m), block_n=block_n,
                                     num_warps=warps, num_stages=stages)
        if config != default:
            configs[f"triton {config.block_m}x{block_n}x{config.block_k} w{warps} s{stages}"] = config
    return configs


def check_backends(results):
    """Every GPU backend against the float64 oracle at a small size: exact inputs must give identical draws."""
    checks = {}
    backends = ["triton", "auto"] + (["cuda"] if DEVICE.type == "cuda" else [])
    for bank_dtype in (torch.float32, torch.bfloat16):
        inputs = make_inputs(48, 400 if ARGS.dry_run else 3000, 40, bank_dtype, exact=True, seed=7)
        cpu_inputs = {name: tensor.cpu() for name, tensor in inputs.items()}
        for mode in ("fne", "hardest", "uniform"):
            options = dict(OPTIONS, k=3, mode=mode, col_offset=2**32 - 1000)
            expected = reference.sample_negatives_reference(*cpu_inputs.values(), dtype=torch.float64, **options)
            for backend in backends:
                if backend in ("auto", "cuda") and DEVICE.type != "cuda":
                    continue
                got = fne_fast.sample_negatives(*inputs.values(), backend=backend, **options)
                same = all(torch.equal(a.cpu(), b) for a, b in zip((got[0], got[2]), (expected[0], expected[2])))
                same = same and torch.allclose(got[1].cpu(), expected[1], rtol=0, atol=1e-6)
                checks[f"{backend} {mode} {str(bank_dtype).replace('torch.', '')}"] = bool(same)
    results["checks"] = checks
    print("oracle checks:", "all identical" if all(checks.values()) else
          f"MISMATCH in {[name for name, ok in checks.items() if not ok]}")


def oracle_fits(num_rows, num_cols) -> bool:
    free = torch.cuda.mem_get_info()[0] if DEVICE.type == "cuda" else float("inf")
    return num_rows * num_cols * ORACLE_BYTES_PER_PAIR < 0.8 * free


def recorder(entry, results, write):
    """record(name, fn): times fn into entry["methods"][name], or notes why it was skipped."""
    rows = entry["methods"]
    bank_bytes = entry["N"] * entry["D"] * DTYPES[entry["bank_dtype"]].itemsize
    flops = 2 * entry["B"] * entry["N"] * entry["D"]
    ceilings = results["ceilings"]

    def record(name, fn):
        if over_budget():
            rows[name] = {"skipped": "time budget"}
            return
        try:
            ms = time_call(fn)
            extra = extra_memory_mb(fn)
        except torch.OutOfMemoryError:
            rows[name] = {"skipped": "out of memory"}
            torch.cuda.empty_cache()
            write()
            return
        except Exception as error:  # noqa: BLE001  (OutOfResources, CompilationError, ...: one row, not the run)
            message = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"
            rows[name] = {"skipped": message}
            results.setdefault("errors", []).append(
                {"shape": [entry["B"], entry["N"], entry["D"], entry["bank_dtype"]], "method": name, "error": message})
            print(f"  {name:<34} FAILED: {message}", flush=True)
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            write()
            return
        row = {"ms": ms, "extra_MB": extra, "GBps": bank_bytes / ms / 1e6, "TFLOPs": flops / ms / 1e9}
        if ceilings.get("copy_GBps"):
            row["frac_copy_bw"] = row["GBps"] / ceilings["copy_GBps"]
            row["frac_bf16_matmul"] = row["TFLOPs"] / ceilings["bf16_matmul_TFLOPs"]
        rows[name] = row
        print(f"  {name:<34} {ms:10.3f} ms", flush=True)
        write()

    return record


def shape_entry(results, num_rows, num_cols, dim, dtype_name):
    for entry in results["shapes"]:
        if (entry["B"], entry["N"], entry["D"], entry["bank_dtype"]) == (num_rows, num_cols, dim, dtype_name):
            return entry
    entry = {"B": num_rows, "N": num_cols, "D": dim, "bank_dtype": dtype_name, "methods": {}}
    results["shapes"].append(entry)
    return entry


def bench_pass(shape, stage, results, write):
    """One stage for one shape. Stages run over all shapes in turn ("core", then "sweep", then "compile"), so a
    time limit costs the optional rows first."""
    num_rows, num_cols, dim, dtype_name = shape
    bank_dtype = DTYPES[dtype_name]
    entry = shape_entry(results, *shape)
    record = recorder(entry, results, write)
    fits = oracle_fits(num_rows, num_cols)
    if over_budget() or (stage == "sweep" and not sweep_configs(num_rows, dim, bank_dtype)):
        return
    inputs = make_inputs(num_rows, num_cols, dim, bank_dtype, seed=1)
    print(f"[{stage}] B={num_rows} N={num_cols} D={dim} {dtype_name}", flush=True)
    if stage == "core":
        record("triton", lambda: fne_fast.sample_negatives(*inputs.values(), backend="triton", check_finite=False,
                                                            **OPTIONS))
        record("triton (check_finite)", lambda: fne_fast.sample_negatives(*inputs.values(), backend="triton",
                                                                           **OPTIONS))
        if DEVICE.type == "cuda" and ops.COMPILED_CUDA_KERNEL:
            record("cuda (compiled C++)", lambda: fne_fast.sample_negatives(*inputs.values(), backend="cuda",
                                                                             check_finite=False, **OPTIONS))
        record("bare matmul", lambda: inputs["anchors"].to(bank_dtype) @ inputs["bank"].T)
        if fits:
            record("eager oracle (float32)", lambda: reference.sample_negatives_reference(
                *inputs.values(), dtype=torch.float32, **OPTIONS))
        else:
            entry["methods"]["eager oracle (float32)"] = {"skipped": "would not fit in memory"}
    elif stage == "sweep":
        for name, config in sweep_configs(num_rows, dim, bank_dtype).items():
            record(name, lambda config=config: triton_kernels.sample_negatives_triton(
                *inputs.values(), triton_options(), config=config, check_finite=False, **COUNTERS))
        # Where the time goes: mode "hardest" draws no random numbers (similarities + top-k only), "uniform"
        # draws them but computes no weights. Labelled "diag" so that no acceptance figure picks them.
        for mode in ("hardest", "uniform"):
            record(f"diag: triton mode={mode}", lambda mode=mode: fne_fast.sample_negatives(
                *inputs.values(), backend="triton", check_finite=False, **dict(OPTIONS, mode=mode)))
    elif fits:
        # The dry run only checks this path: inductor's CPU code generation of the oracle takes many minutes.
        compiled = torch.compile(reference.sample_negatives_reference, dynamic=False,
                                 backend="inductor" if DEVICE.type == "cuda" else "eager")
        record("torch.compile(oracle)", lambda: compiled(*inputs.values(), dtype=torch.float32, **OPTIONS))
    else:
        entry["methods"]["torch.compile(oracle)"] = {"skipped": "would not fit in memory"}
    del inputs
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def add_speedups(results):
    for entry in results["shapes"]:
        rows = entry["methods"]
        best_triton = min((row["ms"] for name, row in rows.items() if name.startswith("triton") and "ms" in row),
                          default=None)
        oracle_ms = rows.get("eager oracle (float32)", {}).get("ms")
        if best_triton and oracle_ms:
            entry["speedup_vs_eager_oracle"] = oracle_ms / best_triton
        compiled_ms = rows.get("cuda (compiled C++)", {}).get("ms")
        if best_triton and compiled_ms:  # evidence for the backend="auto" rule on CUDA
            entry["faster_gpu_backend"] = "triton" if best_triton < compiled_ms else "cuda"


def acceptance(results):
    """The GPU targets' figures (fractions of the ceilings) from the best Triton row of each shape."""
    verdict = {}
    for entry in results["shapes"]:
        triton_rows = [row for name, row in entry["methods"].items() if name.startswith("triton") and "ms" in row]
        if not triton_rows:
            continue
        best = min(triton_rows, key=lambda row: row["ms"])
        shape = (entry["B"], entry["N"], entry["D"], entry["bank_dtype"])
        if shape == (128, 4 * 2**20, 256, "bfloat16") and "frac_copy_bw" in best:
            verdict["4M bf16: >= 75% of copy bandwidth"] = best["frac_copy_bw"] >= 0.75
        if shape == (1024, 2**20, 768, "bfloat16") and "frac_bf16_matmul" in best:
            verdict["1M x 1024 bf16: >= 50% of bf16 matmul"] = best["frac_bf16_matmul"] >= 0.5
        if shape[1] == 16 * 2**20:
            default = entry["methods"].get("triton", {})
            if default.get("extra_MB") is not None:
                verdict["16M: < 64 MB extra memory"] = default["extra_MB"] < 64
        if "speedup_vs_eager_oracle" in entry:
            verdict[f"{shape}: >= 5x eager oracle"] = entry["speedup_vs_eager_oracle"] >= 5
    results["acceptance"] = verdict


def markdown_table(results) -> str:
    lines = ["| B | N | D | bank | method | ms | extra MB | GB/s | % copy BW | TFLOP/s | % bf16 matmul |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for entry in results["shapes"]:
        shape = f"| {entry['B']} | {entry['N']} | {entry['D']} | {entry['bank_dtype']} "
        for name, row in entry["methods"].items():
            if "ms" not in row:
                lines.append(f"{shape}| {name} | {row['skipped']} | | | | | |")
                continue
            fmt = lambda value, spec: "" if value is None else format(value, spec)  # noqa: E731
            lines.append(f"{shape}| {name} | {row['ms']:.3f} | {fmt(row['extra_MB'], '.1f')} | {row['GBps']:.0f} | "
                         f"{fmt(row.get('frac_copy_bw') and 100 * row['frac_copy_bw'], '.0f')} | "
                         f"{row['TFLOPs']:.1f} | "
                         f"{fmt(row.get('frac_bf16_matmul') and 100 * row['frac_bf16_matmul'], '.0f')} |")
    return "\n".join(lines)


def main(argv=None):
    global ARGS, START
    ARGS = parse_args(argv)
    START = time.perf_counter()
    load_modules(ARGS)
    os.makedirs(ARGS.out, exist_ok=True)
    path = os.path.join(ARGS.out, "roofline.json")
    results = {
        "device": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu (Triton interpreter)",
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                     "python": platform.python_version()},
        "triton_serves_cuda_dispatch": ops.TRITON_SERVES_CUDA,
        "options": OPTIONS,
        "shapes": [],
    }

    def write():
        with open(path, "w") as handle:
            json.dump(results, handle, indent=2)

    measure_ceilings(results)
    print("ceilings:", results["ceilings"], flush=True)
    write()
    check_backends(results)
    write()
    shapes = DRY_RUN_SHAPES if ARGS.dry_run else SHAPES
    if ARGS.shapes:
        shapes = [shapes[int(index)] for index in ARGS.shapes.split(",")]
    stages = ["core", "sweep"] + (["compile"] if ARGS.compile else [])
    for stage in stages:
        for shape in shapes:
            bench_pass(shape, stage, results, write)
    add_speedups(results)
    if not ARGS.dry_run:
        acceptance(results)
    results["elapsed_s"] = time.perf_counter() - START
    write()
    print(f"\ndevice: {results['device']}, versions: {results['versions']}")
    print(f"ceilings: {results['ceilings']}")
    print(markdown_table(results))
    print("acceptance:", json.dumps(results.get("acceptance", "not judged in a dry run"), indent=1))
    print(f"wrote {path}")
    # A failed row of a shipped backend fails the check; sweep rows may fail (they probe the device's limits).
    core_errors = [error for error in results.get("errors", []) if error["method"] in CORE_METHODS]
    return 0 if all(results["checks"].values()) and not core_errors else 1


if __name__ == "__main__":
    sys.exit(main())
