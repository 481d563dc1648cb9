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

import torch  # noqa: F401  (loads libtorch, which the compiled library links against)

from fne_fast import _C  # noqa: F401  (registers the fne_fast operators)
from fne_fast.matcher import load_matcher
from fne_fast.ops import SamplerOptions, merge_candidates, sample_negatives
from fne_fast.sampling import FNELoss, MemoryBank, RunningStats, ThresholdTable

__all__ = ["sample_negatives", "merge_candidates", "SamplerOptions", "MemoryBank", "RunningStats", "FNELoss",
           "ThresholdTable", "load_matcher"]
__version__ = "0.1.0"
