"""scripts/gpu_check.sh, the one-call GPU check, in its --dry-run form: each step's CPU form runs (the build check,
the Triton resource table for a few kernels, test collection, the sanitizer case on the C++ kernel, the roofline
through the interpreter), so that the script's logic, commands and outputs are exercised wherever the suite runs.
The GPU run itself happens on a GPU machine (bench/RESULTS.md)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "gpu_check.sh")
STEPS = ("build", "kernel", "resources", "tests", "memcheck", "roofline")


def run_check(out, budget_s=None):
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["PYTHON"] = sys.executable
    if budget_s is not None:
        env["GPU_CHECK_BUDGET_S"] = str(budget_s)
    return subprocess.run(["bash", SCRIPT, "--dry-run", str(out)], env=env, capture_output=True, text=True,
                          timeout=900)


def step_status(summary: str, step: str) -> str:
    found = re.search(rf"^{step}\s+(.*?)\s+\d+s$", summary, re.MULTILINE)
    assert found, f"no line for step {step} in:\n{summary}"
    return found.group(1)


def test_dry_run_runs_every_step(tmp_path):
    result = run_check(tmp_path)
    summary = (tmp_path / "summary.txt").read_text()
    assert result.returncode == 0, summary + result.stderr[-2000:]
    assert step_status(summary, "build").startswith("skipped (dry run")
    for step in STEPS[1:]:
        assert step_status(summary, step) == "ok"
    roofline = json.loads((tmp_path / "roofline.json").read_text())
    assert roofline["checks"] and all(roofline["checks"].values())
    assert "sm_90" in (tmp_path / "resources.log").read_text()
    assert "tests collected" in (tmp_path / "tests.log").read_text()
    # The device tool brings back at most 8 files from its output folder.
    assert len([path for path in tmp_path.rglob("*") if path.is_file()]) <= 8


@pytest.mark.parametrize("budget_s", [20])
def test_steps_past_the_budget_are_skipped_and_fail_the_check(tmp_path, budget_s):
    # Every step reserves time for the later ones: with 20 s none but the last (which takes what is left and
    # bounds itself) may start, and the check says so.
    result = run_check(tmp_path, budget_s=budget_s)
    summary = (tmp_path / "summary.txt").read_text()
    assert result.returncode == 1
    for step in STEPS[1:-1]:
        assert step_status(summary, step) == "SKIPPED (time budget)"
    total = re.search(r"^total (\d+) s of (\d+) s", summary, re.MULTILINE)
    assert total and int(total.group(2)) == budget_s and int(total.group(1)) <= budget_s + 10
