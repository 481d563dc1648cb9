"""Triton kernels of fne_fast (installed as the subpackage fne_fast.kernels).

Importing this package registers the Triton sampler as the CUDA kernel of fne_fast::sample_negatives when Triton
is installed and no compiled CUDA kernel was built (see kernels/sample_negatives.py).
"""

try:
    import triton  # noqa: F401
except ImportError:  # Triton is optional: CPU-only installs work without it
    pass
else:
    from fne_fast.kernels import sample_negatives  # noqa: F401  (registers the CUDA dispatch key)
