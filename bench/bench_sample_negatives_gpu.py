"""GPU roofline of fne_fast.sample_negatives, in stages that scripts/gpu_check.sh runs as separate steps.

    python bench/bench_sample_negatives_gpu.py --out DIR                    # every stage: backends, core, rest
    python bench/bench_sample_negatives_gpu.py --out DIR --stage core       # one stage, merged into DIR's results
    python bench/bench_sample_negatives_gpu.py --out DIR --dry-run          # CPU, Triton interpreter, tiny shapes
    python bench/bench_sample_negatives_gpu.py --out DIR --stage table      # the tables of DIR/roofline.json
    python bench/bench_sample_negatives_gpu.py --out DIR --stage profile --method triton   # one call (for ncu)

Stages, each under its own ``--budget-s`` (it starts nothing new after that many seconds):

* ``backends``: every GPU backend against the float64 oracle at a small size (exact inputs: identical draws);
* ``core``: the device's ceilings (a 1 GiB device-to-device copy, bytes read + written; an 8192² bf16 matmul),
  then at the two acceptance shapes (128, 4M, 256) and (1024, 1M, 768) bf16: the Triton kernel, the compiled CUDA
  kernel where it was built, and the GEMM floors: ``anchors @ bank.T`` (which allocates its output) and
  ``torch.mm(anchors, bank.T, out=...)`` into a preallocated output;
* ``rest``: the core rows at the other shapes and cases, Triton with check_finite, the plain eager sampler
  (bench/plain_eager.py: one matmul, masks, log-weights, torch's RNG, topk), the CUDA kernel at twice its chunk and
  as one chunk (``diag: cuda ...`` rows: does its side stream overlap?), then a small sweep of Triton tiles and
  two diagnostic modes, then the eager oracle (float32); with ``--compile`` also torch.compile of the oracle (its
  first call compiles for minutes, which no budget bounds: off by default).

Cases (``--case``, default all), fne_fast.ops.testing.sample_inputs kinds: ``worst`` (nothing cut down: every pair
pays for Philox and the race), ``training`` (a race of about 4 candidates per anchor, as in training) and
``middle`` (about 5 % of the pairs kept); each result records the share the cut-down really kept.

Times are medians of CUDA-event timings; "extra MB" is the peak allocation above the inputs. GB/s counts reading
the bank once; TFLOP/s counts 2·B·N·D. Every stage merges its rows into DIR/roofline.json (``--stage all`` starts
it afresh), rewritten atomically after each measurement, so that a run cut short still leaves valid results. A
configuration the device cannot run (too much shared memory, a compile error) is recorded with its error and the
stage goes on. Tables are printed as markdown (for bench/RESULTS.md), every case of every shape in each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
import unittest.mock

SHAPES = ((32, 8224, 768, "float32"), (128, 4 * 2**20, 256, "bfloat16"), (1024, 2**20, 768, "bfloat16"),
          (128, 16 * 2**20, 128, "bfloat16"))
DRY_RUN_SHAPES = ((8, 300, 24, "float32"), (16, 700, 32, "bfloat16"), (12, 500, 48, "bfloat16"))
ACCEPTANCE = (1, 2)  # indices of the acceptance shapes (and of their dry-run stand-ins): the core stage's
CASES = {"worst": "worst_case", "training": "training", "middle": "middle"}  # --case: sample_inputs kind
STAGES = ("all", "backends", "core", "rest", "profile", "table")
ORACLE_BYTES_PER_PAIR = 112  # peak of the oracle's B×N temporaries (float32, int64 Philox limbs, sorts) on CPU
PLAIN_BYTES_PER_PAIR = 24  # peak of the plain eager sampler's B×N temporaries (float32 S, keys, masks)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for roofline.json")
    parser.add_argument("--stage", default="all", choices=STAGES, help="which stage to run (default all: "
                        "backends, core, rest)")
    parser.add_argument("--case", default=",".join(CASES), help="comma-separated cases among "
                        f"{', '.join(CASES)} (default all)")
    parser.add_argument("--method", default="triton,cuda,gemm", help="--stage profile: comma-separated calls "
                        "among triton, cuda (the CUDA kernel's epilogue), gemm (the preallocated-output matmul)")
    parser.add_argument("--build", action="store_true", help="first run `setup.py build_ext --inplace` (the C++ "
                        "kernels, and the CUDA one where nvcc exists), as a fresh GPU machine needs")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU through the Triton interpreter")
    parser.add_argument("--shapes", default=None, help="comma-separated indices into the shape list (default all; "
                        "the core stage takes the acceptance shapes among them)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the oracle (minutes)")
    parser.add_argument("--no-sweep", action="store_true", help="time the default Triton tiles only")
    parser.add_argument("--budget-s", type=float, default=540.0, help="start nothing new after this many seconds")
    args = parser.parse_args(argv)
    args.cases = [case.strip() for case in args.case.split(",") if case.strip()]
    unknown = [case for case in args.cases if case not in CASES]
    if unknown or not args.cases:
        parser.error(f"--case: unknown {unknown}; choose among {', '.join(CASES)}")
    args.methods = [method.strip() for method in args.method.split(",") if method.strip()]
    if not set(args.methods) <= {"triton", "cuda", "gemm"}:
        parser.error("--method: choose among triton, cuda, gemm")
    return args


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Set by main() (after the optional in-place build), read by the functions below.
ARGS = START = DEVICE = None
torch = triton = fne_fast = ops = reference = triton_kernels = triton_configs = plain_eager_sampler = None
DTYPES = {}


def load_modules(args) -> None:
    """Imports torch, Triton and fne_fast after the optional in-place build (whose result must win over an
    installed copy), with TRITON_INTERPRET set first for a dry run."""
    global torch, triton, fne_fast, ops, reference, triton_kernels, triton_configs, plain_eager_sampler
    global DEVICE, DTYPES
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before fne_fast.kernels is imported
    if args.build:
        subprocess.check_call([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT)
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/plain_eager.py
    import torch as torch_module
    import triton as triton_module
    from plain_eager import plain_eager_sampler as plain_function

    import fne_fast as package
    from fne_fast import ops as ops_module
    from fne_fast.ops import reference as reference_module
    from fne_fast.kernels import configs as configs_module
    from fne_fast.kernels import sample_negatives as kernels_module

    torch, triton, fne_fast, ops, reference = torch_module, triton_module, package, ops_module, reference_module
    triton_kernels, triton_configs, plain_eager_sampler = kernels_module, configs_module, plain_function
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
    """Copy bandwidth (read + write) and bf16 matmul rate of this device (once per results file)."""
    if results.get("ceilings", {}).get("copy_GBps"):
        return
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


def make_inputs(num_rows, num_cols, dim, bank_dtype, *, kind="worst_case", seed=0):
    """The op's inputs of one sample_inputs kind, generated on the device (bf16 anchors with a bf16 bank)."""
    from fne_fast.ops.testing import sample_inputs

    return sample_inputs(num_rows, num_cols, dim, kind=kind, bank_dtype=bank_dtype,
                         anchor_dtype=torch.float32 if bank_dtype == torch.float32 else bank_dtype, seed=seed,
                         device=DEVICE, generator_device=DEVICE)


OPTIONS = dict(k=1, mode="fne", seed=1234, step=3)
CORE_METHODS = ("triton", "triton (check_finite)", "cuda (compiled C++)")  # a failed row fails the stage
COUNTERS = dict(seed=1234, step=3)


def triton_options():
    from fne_fast.ops.options import SamplerOptions

    return SamplerOptions(k=OPTIONS["k"], mode=OPTIONS["mode"])


def sweep_configs(num_rows, dim, bank_dtype):
    """A few alternatives to the default tiles (fne_fast/kernels/configs.py default_config: 8 warps, no spills on
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
    from fne_fast.ops.testing import sample_inputs

    checks = {}
    backends = ["triton", "auto"] + (["cuda"] if DEVICE.type == "cuda" and ops.COMPILED_CUDA_KERNEL else [])
    for bank_dtype in (torch.float32, torch.bfloat16):
        inputs = sample_inputs(48, 400 if ARGS.dry_run else 3000, 40, kind="exact", bank_dtype=bank_dtype,
                               anchor_dtype=torch.float32 if bank_dtype == torch.float32 else bank_dtype, seed=7,
                               stats=(0.2, 0.01, 0.0, 0.01, 500.0), device=DEVICE)
        cpu_inputs = {name: tensor.cpu() for name, tensor in inputs.items()}
        for mode in ("fne", "hardest", "uniform"):
            options = dict(OPTIONS, k=3, mode=mode, col_offset=2**32 - 1000)
            expected = reference.sample_negatives_reference(*cpu_inputs.values(), dtype=torch.float64, **options)
            for backend in backends:
                if backend == "auto" and DEVICE.type != "cuda":
                    continue
                got = fne_fast.sample_negatives(*inputs.values(), backend=backend, **options)
                same = all(torch.equal(a.cpu(), b) for a, b in zip((got[0], got[2]), (expected[0], expected[2])))
                same = same and torch.allclose(got[1].cpu(), expected[1], rtol=0, atol=1e-6)
                checks[f"{backend} {mode} {str(bank_dtype).replace('torch.', '')}"] = bool(same)
    results["checks"] = checks
    if DEVICE.type == "cuda" and not ops.COMPILED_CUDA_KERNEL:
        results["checks_note"] = "fne_fast was built without its CUDA kernel: cuda not checked"
    print("oracle checks:", "all identical" if all(checks.values()) else
          f"MISMATCH in {[name for name, ok in checks.items() if not ok]}", flush=True)


def fits(num_rows, num_cols, bytes_per_pair) -> bool:
    free = torch.cuda.mem_get_info()[0] if DEVICE.type == "cuda" else float("inf")
    return num_rows * num_cols * bytes_per_pair < 0.8 * free


def recorder(entry, results, write):
    """record(name, fn): times fn into entry["methods"][name] (unless an earlier stage did), or notes why it was
    skipped."""
    rows = entry["methods"]
    bank_bytes = entry["N"] * entry["D"] * DTYPES[entry["bank_dtype"]].itemsize
    flops = 2 * entry["B"] * entry["N"] * entry["D"]
    ceilings = results["ceilings"]

    def record(name, fn):
        if "ms" in rows.get(name, {}):
            return
        if over_budget():
            rows[name] = {"skipped": "time budget"}
            write()
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
                {"shape": [entry["B"], entry["N"], entry["D"], entry["bank_dtype"]], "case": entry["case"],
                 "method": name, "error": message})
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


def shape_entry(results, shape, case):
    num_rows, num_cols, dim, dtype_name = shape
    for entry in results["shapes"]:
        if ((entry["B"], entry["N"], entry["D"], entry["bank_dtype"], entry.get("case"))
                == (num_rows, num_cols, dim, dtype_name, case)):
            return entry
    entry = {"B": num_rows, "N": num_cols, "D": dim, "bank_dtype": dtype_name, "case": case, "methods": {}}
    results["shapes"].append(entry)
    return entry


def core_rows(record, inputs, bank_dtype, entry):
    """The rows of the core stage: the shipped GPU kernels and the GEMM floors."""
    record("triton", lambda: fne_fast.sample_negatives(*inputs.values(), backend="triton", check_finite=False,
                                                        **OPTIONS))
    if DEVICE.type == "cuda" and ops.COMPILED_CUDA_KERNEL:
        record("cuda (compiled C++)", lambda: fne_fast.sample_negatives(*inputs.values(), backend="cuda",
                                                                         check_finite=False, **OPTIONS))
    elif "cuda (compiled C++)" not in entry["methods"]:
        entry["methods"]["cuda (compiled C++)"] = {"skipped": "no CUDA kernel built"}
    anchors = inputs["anchors"].to(bank_dtype)
    record("bare matmul", lambda: anchors @ inputs["bank"].T)
    # The floor of any fused kernel: the GEMM alone, without even allocating its B×N output.
    out = torch.empty(anchors.shape[0], inputs["bank"].shape[0], dtype=bank_dtype, device=DEVICE)
    record("bare matmul (out=)", lambda: torch.mm(anchors, inputs["bank"].T, out=out))
    del out


def cuda_chunk_diagnostics(num_rows, num_cols):
    """(row name, chunk columns) of the CUDA kernel at other chunk sizes than its own, to tell which end of its
    predicted range holds (bench/RESULTS_gpu_model.md §4): twice its chunk, the chunk count of the single-buffer
    build before the side stream, and the whole bank as one chunk (no side stream, one merge) where its float32
    similarities fit. The shipped chunk mirrors csrc/cuda/sample_negatives_cuda.cu for inputs of one dtype without
    guides: two float32 buffers of B columns' rows in 32 MiB, in whole rounds of 1024 columns."""
    shipped = max(1024, (2**25 // (4 * 2 * num_rows)) // 1024 * 1024)
    if num_cols <= shipped:
        return []
    rows = [(f"diag: cuda chunk {2 * shipped} cols", 2 * shipped)] if 2 * shipped < num_cols else []
    if fits(num_rows, num_cols, 4):
        rows.append(("diag: cuda one chunk", num_cols))
    return rows


def cuda_call_with_chunk(inputs, columns):
    """One call of the compiled CUDA kernel with FNE_FAST_CUDA_CHUNK_COLS (read at every call) set to columns, the
    environment restored after it."""
    with unittest.mock.patch.dict(os.environ, {"FNE_FAST_CUDA_CHUNK_COLS": str(columns)}):
        return fne_fast.sample_negatives(*inputs.values(), backend="cuda", check_finite=False, **OPTIONS)


def bench_pass(shape, case, part, results, write):
    """One part of a stage for one shape and case: "core", "more" (the rest's first pass: the core rows where the
    core stage did not run them, check_finite, the plain eager sampler), "sweep", "oracle", "compile". Each part
    runs over all shapes and cases in turn, so a time limit costs the optional rows first."""
    num_rows, num_cols, dim, dtype_name = shape
    bank_dtype = DTYPES[dtype_name]
    entry = shape_entry(results, shape, case)
    record = recorder(entry, results, write)
    if over_budget() or (part == "sweep" and not sweep_configs(num_rows, dim, bank_dtype)):
        return
    inputs = make_inputs(num_rows, num_cols, dim, bank_dtype, kind=CASES[case], seed=1)
    if "kept_share" not in entry:
        from fne_fast.ops.testing import kept_share

        entry["kept_share"] = kept_share(inputs)
    print(f"[{part}] B={num_rows} N={num_cols} D={dim} {dtype_name} {case} (kept {entry['kept_share']:.2e})",
          flush=True)
    if part in ("core", "more"):
        core_rows(record, inputs, bank_dtype, entry)
    if part == "more":
        record("triton (check_finite)", lambda: fne_fast.sample_negatives(*inputs.values(), backend="triton",
                                                                           **OPTIONS))
        if fits(num_rows, num_cols, PLAIN_BYTES_PER_PAIR):
            record("plain eager", lambda: plain_eager_sampler(*inputs.values(), k=OPTIONS["k"]))
        else:
            entry["methods"].setdefault("plain eager", {"skipped": "would not fit in memory"})
        if DEVICE.type == "cuda" and ops.COMPILED_CUDA_KERNEL:
            for name, columns in cuda_chunk_diagnostics(num_rows, num_cols):
                record(name, lambda columns=columns: cuda_call_with_chunk(inputs, columns))
    elif part == "sweep":
        for name, config in sweep_configs(num_rows, dim, bank_dtype).items():
            record(name, lambda config=config: triton_kernels.sample_negatives_triton(
                *inputs.values(), triton_options(), config=config, check_finite=False, **COUNTERS))
        # Where the time goes: mode "hardest" draws no random numbers (similarities + top-k only), "uniform"
        # draws them but computes no weights. Labelled "diag" so that no acceptance figure picks them.
        for mode in ("hardest", "uniform"):
            record(f"diag: triton mode={mode}", lambda mode=mode: fne_fast.sample_negatives(
                *inputs.values(), backend="triton", check_finite=False, **dict(OPTIONS, mode=mode)))
    elif part == "oracle":
        if fits(num_rows, num_cols, ORACLE_BYTES_PER_PAIR):
            record("eager oracle (float32)", lambda: reference.sample_negatives_reference(
                *inputs.values(), dtype=torch.float32, **OPTIONS))
        else:
            entry["methods"].setdefault("eager oracle (float32)", {"skipped": "would not fit in memory"})
    elif part == "compile":
        if fits(num_rows, num_cols, ORACLE_BYTES_PER_PAIR):
            # The dry run only checks this path: inductor's CPU code generation of the oracle takes many minutes.
            compiled = torch.compile(reference.sample_negatives_reference, dynamic=False,
                                     backend="inductor" if DEVICE.type == "cuda" else "eager")
            record("torch.compile(oracle)", lambda: compiled(*inputs.values(), dtype=torch.float32, **OPTIONS))
        else:
            entry["methods"].setdefault("torch.compile(oracle)", {"skipped": "would not fit in memory"})
    del inputs
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def profile_calls(methods):
    """One call of each method, for `ncu --launch-count 1` (scripts/gpu_check.sh picks the kernel by name). The
    GEMM runs on uninitialised inputs, so that it is the process's first kernel: its time does not depend on the
    values."""
    num_rows, num_cols, dim, dtype_name = (DRY_RUN_SHAPES if ARGS.dry_run else SHAPES)[ACCEPTANCE[0]]
    bank_dtype = DTYPES[dtype_name]
    for method in methods:
        if method == "gemm":
            anchors = torch.empty(num_rows, dim, dtype=bank_dtype, device=DEVICE)
            bank = torch.empty(num_cols, dim, dtype=bank_dtype, device=DEVICE)
            out = torch.empty(num_rows, num_cols, dtype=bank_dtype, device=DEVICE)
            torch.mm(anchors, bank.T, out=out)
        elif method == "cuda" and not (DEVICE.type == "cuda" and ops.COMPILED_CUDA_KERNEL):
            print("cuda: no CUDA kernel built, nothing to profile")
            continue
        else:
            inputs = make_inputs(num_rows, num_cols, dim, bank_dtype, kind="worst_case", seed=1)
            fne_fast.sample_negatives(*inputs.values(), backend=method, check_finite=False, **OPTIONS)
        synchronize()
        print(f"profiled one call: {method} at B={num_rows} N={num_cols} D={dim} {dtype_name}", flush=True)


def add_speedups(results):
    for entry in results["shapes"]:
        rows = entry["methods"]
        best_triton = min((row["ms"] for name, row in rows.items() if name.startswith("triton") and "ms" in row),
                          default=None)
        for baseline, key in (("eager oracle (float32)", "speedup_vs_eager_oracle"),
                              ("plain eager", "speedup_vs_plain_eager")):
            baseline_ms = rows.get(baseline, {}).get("ms")
            if best_triton and baseline_ms:
                entry[key] = baseline_ms / best_triton
        compiled_ms = rows.get("cuda (compiled C++)", {}).get("ms")
        if best_triton and compiled_ms:  # evidence for the backend="auto" rule on CUDA
            entry["faster_gpu_backend"] = "triton" if best_triton < compiled_ms else "cuda"


def acceptance(results):
    """The GPU targets' figures (fractions of the ceilings) from the shipped Triton configuration of each shape and
    case: a sweep row may be faster, but users get the shipped one."""
    verdict = {}
    for entry in results["shapes"]:
        shipped = entry["methods"].get("triton", {})
        if "ms" not in shipped:
            continue
        shape = (entry["B"], entry["N"], entry["D"], entry["bank_dtype"])
        case = entry.get("case", "worst")
        if shape == (128, 4 * 2**20, 256, "bfloat16") and "frac_copy_bw" in shipped:
            verdict[f"4M bf16 {case}: >= 75% of copy bandwidth"] = shipped["frac_copy_bw"] >= 0.75
        if shape == (1024, 2**20, 768, "bfloat16") and "frac_bf16_matmul" in shipped:
            verdict[f"1M x 1024 bf16 {case}: >= 50% of bf16 matmul"] = shipped["frac_bf16_matmul"] >= 0.5
        if shape[1] == 16 * 2**20 and shipped.get("extra_MB") is not None:
            verdict[f"16M {case}: < 64 MB extra memory"] = shipped["extra_MB"] < 64
        if "speedup_vs_eager_oracle" in entry:
            verdict[f"{shape} {case}: >= 5x eager oracle"] = entry["speedup_vs_eager_oracle"] >= 5
    results["acceptance"] = verdict


def _fmt(value, spec):
    return "" if value is None else format(value, spec)


def entries_by_shape(results, shapes=None):
    """(shape, case, entry or None) for every case of every shape measured (or of ``shapes``): each table shows
    every case, a case not run as such."""
    seen = list(shapes or [])
    for entry in results["shapes"]:
        shape = (entry["B"], entry["N"], entry["D"], entry["bank_dtype"])
        if shapes is None and shape not in seen:
            seen.append(shape)
    for shape in seen:
        for case in CASES:
            key = (*shape, case)
            found = [entry for entry in results["shapes"]
                     if (entry["B"], entry["N"], entry["D"], entry["bank_dtype"], entry.get("case")) == key]
            yield shape, case, (found[0] if found else None)


def markdown_table(results) -> str:
    lines = ["| B | N | D | bank | case | kept | method | ms | extra MB | GB/s | % copy BW | TFLOP/s | "
             "% bf16 matmul |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for shape, case, entry in entries_by_shape(results):
        head = f"| {shape[0]} | {shape[1]} | {shape[2]} | {shape[3]} | {case} "
        if entry is None or not entry["methods"]:
            lines.append(f"{head}| | | not run | | | | | |")
            continue
        head += f"| {_fmt(entry.get('kept_share'), '.2e')} "
        for name, row in entry["methods"].items():
            if "ms" not in row:
                lines.append(f"{head}| {name} | {row['skipped']} | | | | | |")
                continue
            lines.append(f"{head}| {name} | {row['ms']:.3f} | {_fmt(row['extra_MB'], '.1f')} | {row['GBps']:.0f} | "
                         f"{_fmt(row.get('frac_copy_bw') and 100 * row['frac_copy_bw'], '.0f')} | "
                         f"{row['TFLOPs']:.1f} | "
                         f"{_fmt(row.get('frac_bf16_matmul') and 100 * row['frac_bf16_matmul'], '.0f')} |")
    return "\n".join(lines)


def headline_table(results, shapes) -> str:
    """One line per acceptance shape and case: the kernels beside their floors and the eager baselines (ms)."""
    names = (("triton", "triton"), ("cuda", "cuda (compiled C++)"), ("matmul out=", "bare matmul (out=)"),
             ("matmul", "bare matmul"), ("plain eager", "plain eager"), ("eager oracle", "eager oracle (float32)"))
    lines = ["| B | N | D | case | kept | " + " | ".join(label for label, _ in names)
             + " | triton % copy BW | triton % bf16 matmul | triton / matmul out= |",
             "|---|---|---|---|---|" + "---|" * (len(names) + 3)]
    for shape, case, entry in entries_by_shape(results, shapes):
        rows = (entry or {}).get("methods", {})
        cells = [_fmt(rows.get(name, {}).get("ms"), ".3f") or ("skipped" if name in rows else "not run")
                 for _, name in names]
        triton_row, floor = rows.get("triton", {}), rows.get("bare matmul (out=)", {}).get("ms")
        ratio = triton_row["ms"] / floor if "ms" in triton_row and floor else None
        copy = triton_row.get("frac_copy_bw") and 100 * triton_row["frac_copy_bw"]
        matmul = triton_row.get("frac_bf16_matmul") and 100 * triton_row["frac_bf16_matmul"]
        lines.append(f"| {shape[0]} | {shape[1]} | {shape[2]} | {case} | {_fmt((entry or {}).get('kept_share'), '.2e')}"
                     f" | {' | '.join(cells)} | {_fmt(copy, '.0f')} | {_fmt(matmul, '.0f')} | {_fmt(ratio, '.2f')} |")
    return "\n".join(lines)


def write_atomically(path, results):
    """A temporary file beside the target, then os.replace: a reader (or a kill) never sees half a file."""
    temporary = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    with open(temporary, "w") as handle:
        json.dump(results, handle, indent=2)
    os.replace(temporary, path)


def load_results(path, fresh) -> dict:
    results = {"shapes": []}
    if not fresh and os.path.exists(path):
        with open(path) as handle:
            results = json.load(handle)
    if DEVICE is not None:
        results.update({
            "device": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu (Triton interpreter)",
            "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                         "python": platform.python_version()},
            "triton_serves_cuda_dispatch": ops.TRITON_SERVES_CUDA,
            "compiled_cuda_kernel": ops.COMPILED_CUDA_KERNEL,
            "options": OPTIONS})
    results.setdefault("shapes", [])
    return results


def main(argv=None):
    global ARGS, START
    ARGS = parse_args(argv)
    START = time.perf_counter()
    path = os.path.join(ARGS.out, "roofline.json")
    shapes = list(DRY_RUN_SHAPES if ARGS.dry_run else SHAPES)
    core_shapes = [shapes[index] for index in ACCEPTANCE]
    if ARGS.shapes:
        shapes = [shapes[int(index)] for index in ARGS.shapes.split(",")]
        core_shapes = [shape for shape in core_shapes if shape in shapes]
    if ARGS.stage == "table":  # no torch: the tables of a results file
        with open(path) as handle:
            results = json.load(handle)
        print(f"device: {results.get('device')}, versions: {results.get('versions')}")
        print(f"ceilings: {results.get('ceilings')}")
        print(headline_table(results, core_shapes))
        return 0
    load_modules(ARGS)
    if ARGS.stage == "profile":
        profile_calls(ARGS.methods)
        return 0
    os.makedirs(ARGS.out, exist_ok=True)
    results = load_results(path, fresh=ARGS.stage == "all")
    errors_before = len(results.get("errors", []))  # an earlier stage's errors are that stage's

    def write():
        write_atomically(path, results)

    write()
    if ARGS.stage in ("all", "backends"):
        check_backends(results)
        write()
    if ARGS.stage in ("all", "core", "rest"):
        measure_ceilings(results)
        print("ceilings:", results["ceilings"], flush=True)
        write()
    if ARGS.stage in ("all", "core"):
        for shape in core_shapes:
            for case in ARGS.cases:
                bench_pass(shape, case, "core", results, write)
    if ARGS.stage in ("all", "rest"):
        for part in ["more", "sweep", "oracle"] + (["compile"] if ARGS.compile else []):
            for shape in shapes:
                for case in ARGS.cases:
                    bench_pass(shape, case, part, results, write)
    add_speedups(results)
    if not ARGS.dry_run:
        acceptance(results)
    if not isinstance(results.get("elapsed_s"), dict):
        results["elapsed_s"] = {}
    results["elapsed_s"][ARGS.stage] = time.perf_counter() - START
    write()
    print(f"\ndevice: {results['device']}, versions: {results['versions']}")
    print(f"ceilings: {results.get('ceilings')}")
    if ARGS.stage != "backends":
        print(markdown_table(results))
        print(headline_table(results, core_shapes))
    if "acceptance" in results:
        print("acceptance:", json.dumps(results["acceptance"], indent=1))
    print(f"wrote {path}")
    # A failed check or a failed row of a shipped backend fails the stage; sweep rows may fail (they probe the
    # device's limits).
    failed_checks = ARGS.stage in ("all", "backends") and not all(results["checks"].values())
    core_errors = [error for error in results.get("errors", [])[errors_before:] if error["method"] in CORE_METHODS]
    return 1 if failed_checks or core_errors else 0


if __name__ == "__main__":
    sys.exit(main())
