"""scripts/gpu_check.sh, the one-call GPU check, in its --dry-run form: each step's CPU form runs (the build check,
the backends against the oracle and the roofline stages through the interpreter, the profiled calls without ncu,
test collection, the sanitizer case on the C++ kernel, the Triton resource table for a few kernels), so that the
script's logic, order, commands and outputs are exercised wherever the suite runs. The GPU run itself happens on a
GPU machine (bench/RESULTS.md)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "gpu_check.sh")
# The plan: what measures first, the long checks after it.
STEPS = ("build", "kernel", "backends", "core", "ncu-triton", "ncu-cuda", "ncu-gemm", "tests", "memcheck",
         "racecheck", "synccheck", "resources", "rest")
TRITON_STEPS = ("kernel", "backends", "core", "ncu-triton", "tests", "memcheck", "resources", "rest")


def run_check(out, budget_s=None, simulate_build_failure=False):
    env = {name: value for name, value in os.environ.items()
           if name not in ("TRITON_INTERPRET", "GPU_CHECK_BUDGET_S", "GPU_CHECK_SIMULATE_CUDA_BUILD_FAILURE")}
    env["PYTHON"] = sys.executable
    if budget_s is not None:
        env["GPU_CHECK_BUDGET_S"] = str(budget_s)
    if simulate_build_failure:
        env["GPU_CHECK_SIMULATE_CUDA_BUILD_FAILURE"] = "1"
    return subprocess.run(["bash", SCRIPT, "--dry-run", str(out)], env=env, capture_output=True, text=True,
                          timeout=600)


def step_status(summary: str, step: str) -> str:
    found = re.search(rf"^{re.escape(step)}\s+(.*?)\s+\d+s$", summary, re.MULTILINE)
    assert found, f"no line for step {step} in:\n{summary}"
    return found.group(1)


def step_order(summary: str) -> list[str]:
    names = re.findall(r"^(\S+)\s+.*?\s+\d+s$", summary, re.MULTILINE)
    return [name for name in names if name in STEPS or name == "build-cpu"]


def out_files(out) -> list:
    return [path for path in out.rglob("*") if path.is_file()]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    result = run_check(out)
    return out, result, (out / "summary.txt").read_text()


def test_dry_run_runs_every_step(dry_run):
    out, result, summary = dry_run
    assert result.returncode == 0, summary + result.stderr[-2000:]
    assert step_status(summary, "build").startswith("skipped (dry run")
    for step in STEPS[1:]:
        assert step_status(summary, step) == "ok", step
    roofline = json.loads((out / "roofline.json").read_text())
    assert roofline["checks"] and all(roofline["checks"].values())
    # Every case of the acceptance stand-ins, with the core rows, the GEMM floors and both eager baselines.
    cases = {(entry["B"], entry["case"]): entry["methods"] for entry in roofline["shapes"]}
    for case in ("worst", "training", "middle"):
        methods = cases[(16, case)]
        for name in ("triton", "bare matmul", "bare matmul (out=)", "plain eager", "eager oracle (float32)"):
            assert "ms" in methods[name], (case, name, methods.get(name))
    assert "sm_90" in (out / "resources.log").read_text()
    assert "tests collected" in (out / "tests.log").read_text()
    assert summary.rstrip().splitlines()[-1].startswith("|"), "the headline table comes last"


def test_plan_measures_before_the_long_checks(dry_run):
    _, _, summary = dry_run
    assert step_order(summary) == list(STEPS)
    order = step_order(summary)
    assert order.index("core") < order.index("tests") < order.index("memcheck")


def test_out_holds_at_most_eight_whole_files(dry_run):
    # The device tool brings back at most 8 files from its output folder; temporary files are renamed away.
    out, _, _ = dry_run
    files = out_files(out)
    assert len(files) <= 8, files
    assert not [path for path in files if path.name.startswith(".") or path.name.endswith(".tmp")]


def test_a_failed_cuda_build_still_runs_the_triton_steps(tmp_path):
    result = run_check(tmp_path, simulate_build_failure=True)
    summary = (tmp_path / "summary.txt").read_text()
    assert result.returncode == 1, summary + result.stderr[-2000:]
    assert step_status(summary, "build").startswith("FAILED")
    assert step_status(summary, "build-cpu").startswith("skipped (dry run")  # the fallback build's place
    assert step_order(summary)[:3] == ["build", "build-cpu", "kernel"]
    for step in TRITON_STEPS:
        assert step_status(summary, step) == "ok", step
    assert "SOME STEPS FAILED" in summary
    roofline = json.loads((tmp_path / "roofline.json").read_text())
    assert any("ms" in entry["methods"].get("triton", {}) for entry in roofline["shapes"])


@pytest.mark.parametrize("budget_s", [20])
def test_steps_past_the_budget_are_skipped_and_fail_the_check(tmp_path, budget_s):
    # Every step reserves time for the later ones: with 20 s none but the last (which takes what is left and
    # bounds itself) may start, and the check says so.
    result = run_check(tmp_path, budget_s=budget_s)
    summary = (tmp_path / "summary.txt").read_text()
    assert result.returncode == 1
    for step in STEPS[1:-1]:
        assert step_status(summary, step) == "SKIPPED (time budget)", step
    total = re.search(r"^total (\d+) s of (\d+) s", summary, re.MULTILINE)
    assert total and int(total.group(2)) == budget_s and int(total.group(1)) <= budget_s + 10
    # The last stage was told to stop starting measurements well within what was left.
    told = re.search(r"--stage rest --budget-s (\d+)", (tmp_path / "roofline.log").read_text())
    assert told and int(told.group(1)) < budget_s
    assert len(out_files(tmp_path)) <= 8


def test_cuda_chunk_rows_give_the_single_buffer_chunk_count(monkeypatch):
    # The CUDA kernel's diagnostic rows: twice its chunk must be the chunk of the build with one 32 MiB similarity
    # buffer (2²⁵ bytes of float32 rows of B columns, whole rounds of 1024), whose merges the model counts, and
    # the one-chunk row appears only where B×N float32 similarities fit in memory.
    import torch

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(SCRIPT)), "bench"))
    import bench_sample_negatives_gpu as bench

    monkeypatch.setattr(bench, "torch", torch, raising=False)
    monkeypatch.setattr(bench, "DEVICE", torch.device("cpu"), raising=False)
    for num_rows, num_cols in ((128, 4 * 2**20), (1024, 2**20), (128, 16 * 2**20)):
        single_buffer_chunk = 2**25 // (4 * num_rows) // 1024 * 1024
        assert bench.cuda_chunk_diagnostics(num_rows, num_cols) == [
            (f"diag: cuda chunk {single_buffer_chunk} cols", single_buffer_chunk), ("diag: cuda one chunk", num_cols)]
    assert bench.cuda_chunk_diagnostics(32, 8224) == []  # one chunk already
    monkeypatch.setattr(bench, "fits", lambda *shape: False)
    assert [name for name, _ in bench.cuda_chunk_diagnostics(128, 4 * 2**20)] == ["diag: cuda chunk 65536 cols"]
