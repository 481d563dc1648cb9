"""Triton kernels of fne_fast, installed as the subpackage fne_fast.kernels.

Nothing here is imported by ``import fne_fast``: fne_fast/ops.py imports kernels/sample_negatives.py (and with it
Triton) on the Triton kernel's first call.
"""
