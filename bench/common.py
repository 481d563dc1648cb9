"""Shared pieces of the benchmarks beside fne_fast.ops.testing (inputs, the timer): the CPU shapes, peak memory and
the machine description."""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import subprocess

import torch

import fne_fast
from fne_fast.ops.testing import median_seconds, sample_inputs  # noqa: F401  (the benchmarks' inputs and timer)

# The benchmark shapes (docs/DESIGN.md §1): the authors' setting, their comment's bank, and a large bank.
SHAPES = [(32, 8224, 768), (128, 65536, 256), (256, 262144, 256)]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_bytes(function) -> int | None:
    """Peak resident memory above the level before the call (Linux: VmHWM after resetting it), or None.

    malloc_trim first hands freed heap pages back to the kernel, so that memory the call allocates counts even
    where the allocator recycles blocks of an earlier call."""
    try:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets the high-water mark to the current RSS
        before = _status_kib("VmRSS")
        function()
        return (_status_kib("VmHWM") - before) * 1024
    except OSError:
        return None


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; Python "
            f"{platform.python_version()}, torch {torch.__version__}, fne_fast {fne_fast.__version__} ({commit})")
