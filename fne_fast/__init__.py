"""fne_fast: fused kernels for False Negative Elimination (FNE) negative sampling.

``sample_negatives`` selects, for each anchor, k negatives from a memory bank in one pass over the bank, with the
Bayesian false-negative weights of Li et al. (ACM MM 2023); docs/DESIGN.md is the exact contract. ``MemoryBank``,
``RunningStats`` and ``FNELoss`` are what a training loop of one's own composes (docs/TRAINING.md), and
``load_matcher`` serves a trained run. Importing the package loads the compiled operators, not Triton (the Triton
kernel imports it on first use).

The package's wings, each importing only from those before it (tests/test_package.py): the ground (``errors``,
``fields``, ``io``), ``ops`` (the op; its Triton kernels are ``fne_fast.kernels``), ``sampling``, ``runs``,
``data``, ``models``, ``tags``, ``training``, ``experiments``, ``matcher`` and ``cli``.
"""

import importlib.abc
import importlib.util
import os
import sys

import torch  # noqa: F401  (loads libtorch, which the compiled library links against)


class _SourceKernelsFinder(importlib.abc.MetaPathFinder):
    """An installed package (wheel or editable) holds the Triton kernels as fne_fast/kernels/. A source checkout
    used in place (``setup.py build_ext --inplace``, or the tree on sys.path) has them in the top-level kernels/
    folder beside this package: this finder maps exactly the name fne_fast.kernels there. It is appended to the
    import system's finders, so an installed fne_fast.kernels always wins."""

    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "fne_fast.kernels" or not os.path.isfile(os.path.join(self.folder, "__init__.py")):
            return None
        return importlib.util.spec_from_file_location(fullname, os.path.join(self.folder, "__init__.py"),
                                                      submodule_search_locations=[self.folder])


if not any(isinstance(finder, _SourceKernelsFinder) for finder in sys.meta_path):
    sys.meta_path.append(_SourceKernelsFinder())

from fne_fast import _C  # noqa: F401,E402  (registers the fne_fast operators)
from fne_fast.matcher import load_matcher  # noqa: E402
from fne_fast.ops import SamplerOptions, merge_candidates, sample_negatives  # noqa: E402
from fne_fast.sampling import FNELoss, MemoryBank, RunningStats, ThresholdTable  # noqa: E402

__all__ = ["sample_negatives", "merge_candidates", "SamplerOptions", "MemoryBank", "RunningStats", "FNELoss",
           "ThresholdTable", "load_matcher"]
__version__ = "0.1.0"
