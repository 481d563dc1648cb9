"""Triton kernels of fne_fast: ``sample_negatives`` (the fused kernel, its merge kernel and the host launcher),
``jit_helpers`` (the device helpers they share) and ``configs`` (tile sizes and launch parameters, with the register
budgets behind the defaults).

Nothing here is imported by ``import fne_fast``: fne_fast/ops/dispatch.py imports sample_negatives.py (and with it
Triton) on the Triton kernel's first call.
"""
