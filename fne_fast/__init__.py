"""fne_fast: fused kernels for False Negative Elimination (FNE) negative sampling.

``sample_negatives`` selects, for each anchor, k negatives from a memory bank in one pass over the bank, with the
Bayesian false-negative weights of Li et al. (ACM MM 2023); see DESIGN.md for the exact contract.
"""

import torch  # noqa: F401  (loads libtorch, which the compiled library links against)

from fne_fast import _C  # noqa: F401,E402  (registers the fne_fast ops)
from fne_fast.ops import sample_negatives  # noqa: E402
import fne_fast.kernels  # noqa: E402,F401  (registers the Triton CUDA kernel when Triton is installed)
from fne_fast.stats import RunningStats  # noqa: E402
from fne_fast.matcher import load_matcher  # noqa: E402

__all__ = ["sample_negatives", "RunningStats", "load_matcher"]
__version__ = "0.1.0"
