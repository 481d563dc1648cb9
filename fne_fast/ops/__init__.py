"""The op: ``sample_negatives`` and everything it needs (its options, argument checks, the method's math, the exact
merge of column shards, the reference oracle and the shared test inputs), and nothing else of fne_fast.

The backends sit behind one operator schema (csrc/fne_fast.cpp): the C++ kernels in fne_fast._C, the Triton kernel
in fne_fast.kernels (registered for CUDA by ``dispatch`` when no compiled CUDA kernel exists), and the oracle in
``reference``, which only ``backend="reference"``, the tests and the benchmarks load.
"""

from fne_fast.ops.dispatch import (BACKENDS, COMPILED_CUDA_KERNEL, TRITON_SERVES_CUDA, check_backend,
                                   sample_negatives, sample_negatives_with_options)
from fne_fast.ops.merge import merge_candidates
from fne_fast.ops.options import MODES, SamplerOptions

__all__ = ["sample_negatives", "sample_negatives_with_options", "merge_candidates", "SamplerOptions", "MODES",
           "BACKENDS", "check_backend", "COMPILED_CUDA_KERNEL", "TRITON_SERVES_CUDA"]
