"""fne_fast: fused kernels for False Negative Elimination (FNE) negative sampling.

``sample_negatives`` selects, for each anchor, k negatives from a memory bank in one pass over the bank, with the
Bayesian false-negative weights of Li et al. (ACM MM 2023); see DESIGN.md for the exact contract. Importing the
package loads the compiled operators, not Triton (the Triton kernel imports it on first use).
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
from fne_fast.bank import MemoryBank  # noqa: E402
from fne_fast.merge import merge_candidates  # noqa: E402
from fne_fast.ops import sample_negatives  # noqa: E402
from fne_fast.options import SamplerOptions  # noqa: E402
from fne_fast.stats import RunningStats  # noqa: E402
from fne_fast.matcher import load_matcher  # noqa: E402

__all__ = ["sample_negatives", "merge_candidates", "MemoryBank", "SamplerOptions", "RunningStats", "load_matcher"]
__version__ = "0.1.0"
