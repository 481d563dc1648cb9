"""Builds fne_fast._C: the C++ CPU kernels always, the CUDA kernels when torch is a CUDA build and nvcc exists.

Install torch first, then `pip install --no-build-isolation -e .` (build isolation would compile against a
different torch). FNE_FAST_FORCE_CPU=1 skips the CUDA sources; FNE_FAST_NVCC_FLAGS adds nvcc flags (e.g.
"-Xptxas=-v" for the kernels' register and shared-memory use).
"""

import glob
import os
import shlex

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extension():
    force_cpu = os.environ.get("FNE_FAST_FORCE_CPU", "0") not in ("", "0")
    with_cuda = not force_cpu and torch.version.cuda is not None and CUDA_HOME is not None
    # Release build: -O3 and no debug info (-g0 overrides a -g from Python's own CFLAGS). OpenMP is compiled in
    # for at::parallel_for but not linked: the symbols resolve to the OpenMP runtime torch already loaded, so
    # the process keeps a single thread pool.
    # No -std flag: torch.utils.cpp_extension adds the standard its headers need (C++20 from torch 2.13, whose
    # headers use C++20 features; C++17 before).
    cxx_flags = ["-O3", "-g0", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        nvcc_flags += shlex.split(os.environ.get("FNE_FAST_NVCC_FLAGS", ""))
        return CUDAExtension("fne_fast._C", sources + _sources("csrc/cuda/*.cu"), include_dirs=include_dirs,
                             define_macros=[("FNE_FAST_WITH_CUDA", "1")],
                             extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags})
    return CppExtension("fne_fast._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags})


setup(
    # Every package under fne_fast/ (the Triton kernels are fne_fast/kernels/), found: a listed one can be
    # forgotten, as fne_fast.data once was.
    packages=find_packages(include=["fne_fast", "fne_fast.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
