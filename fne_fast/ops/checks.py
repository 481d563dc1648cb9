"""Argument checks of ``sample_negatives`` for the kernels written in Python (the reference and Triton).

The C++ kernels check the same things in C++ (csrc/sample_negatives.cpp), with the same messages, at their
entry; each call is checked once, by whichever kernel serves it. Scalar options are checked by
``SamplerOptions``; this module checks the tensors and the counters. Errors name the argument.
"""

from __future__ import annotations

import torch

__all__ = ["check_python_types", "check_tensor_arguments", "check_fn_thresholds", "check_guides", "check_counters",
           "raise_if_not_finite", "dtype_name",
           "EMBEDDING_DTYPES", "TENSOR_ARGUMENTS"]

EMBEDDING_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TENSOR_ARGUMENTS = ("anchors", "bank", "positive_sim", "anchor_ids", "bank_ids", "stats")


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype as users write it (``bfloat16``)."""
    return str(dtype).replace("torch.", "")


def _check_tensor(name: str, value, *, ndim: int, dtypes: tuple, device: torch.device | None) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    if value.dtype not in dtypes:
        allowed = ", ".join(dtype_name(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}, got {dtype_name(value.dtype)}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} must be on the anchors' device {device}, got {value.device}")


def _check_pair_of_embeddings(left_name: str, left: torch.Tensor, right_name: str, right: torch.Tensor,
                              dimension: str, right_dtype: str) -> None:
    """Rows to be multiplied with each other: one width, and the left of the right's dtype or float32 (products
    of a low-precision right side with float32 are exact in float32)."""
    if left.shape[1] != right.shape[1]:
        raise ValueError(f"{left_name} and {right_name} must have the same {dimension} dimension, got "
                         f"{left.shape[1]} and {right.shape[1]}")
    if left.dtype != right.dtype and left.dtype != torch.float32:
        raise TypeError(f"{left_name} must have {right_dtype} dtype or be float32, got {left_name} "
                        f"{dtype_name(left.dtype)} and {right_name} {dtype_name(right.dtype)}")


def check_tensor_arguments(anchors, bank, positive_sim, anchor_ids, bank_ids, stats) -> None:
    """Shapes, dtypes and devices of the six tensor arguments."""
    _check_tensor("anchors", anchors, ndim=2, dtypes=EMBEDDING_DTYPES, device=None)
    device = anchors.device
    _check_tensor("bank", bank, ndim=2, dtypes=EMBEDDING_DTYPES, device=device)
    _check_pair_of_embeddings("anchors", anchors, "bank", bank, "embedding", "the bank's")
    _check_tensor("positive_sim", positive_sim, ndim=1, dtypes=(torch.float32,), device=device)
    _check_tensor("anchor_ids", anchor_ids, ndim=1, dtypes=(torch.int64,), device=device)
    _check_tensor("bank_ids", bank_ids, ndim=1, dtypes=(torch.int64,), device=device)
    _check_tensor("stats", stats, ndim=1, dtypes=(torch.float32,), device=device)
    num_rows, num_cols = anchors.shape[0], bank.shape[0]
    for name, tensor, length in (("positive_sim", positive_sim, num_rows), ("anchor_ids", anchor_ids, num_rows),
                                 ("bank_ids", bank_ids, num_cols), ("stats", stats, 5)):
        if tensor.shape[0] != length:
            raise ValueError(f"{name} must have length {length}, got {tensor.shape[0]}")


def check_fn_thresholds(fn_thresholds, num_rows: int, device: torch.device) -> None:
    """The optional per-anchor thresholds: None, or float32 [B] on the anchors' device."""
    if fn_thresholds is None:
        return
    _check_tensor("fn_thresholds", fn_thresholds, ndim=1, dtypes=(torch.float32,), device=device)
    if fn_thresholds.shape[0] != num_rows:
        raise ValueError(f"fn_thresholds must have length {num_rows}, got {fn_thresholds.shape[0]}")


def check_guides(anchor_guides, bank_guides, guide_threshold, num_rows: int, num_cols: int,
                 device: torch.device) -> None:
    """Language guidance's inputs: both guide tensors or neither, exactly when ``guide_threshold`` is given,
    ``[B, Dg]`` and ``[N, Dg]`` embeddings (anchor_guides of bank_guides' dtype, or float32) on the anchors'
    device."""
    if (anchor_guides is None) != (bank_guides is None):
        given = "anchor_guides" if bank_guides is None else "bank_guides"
        raise ValueError(f"anchor_guides and bank_guides must be given together, got only {given}")
    if guide_threshold is not None and anchor_guides is None:
        raise ValueError("guide_threshold needs anchor_guides and bank_guides, which were not given")
    if guide_threshold is None and anchor_guides is not None:
        raise ValueError("anchor_guides and bank_guides are read only with guide_threshold, which is None")
    if guide_threshold is None:
        return
    _check_tensor("anchor_guides", anchor_guides, ndim=2, dtypes=EMBEDDING_DTYPES, device=device)
    _check_tensor("bank_guides", bank_guides, ndim=2, dtypes=EMBEDDING_DTYPES, device=device)
    if anchor_guides.shape[0] != num_rows:
        raise ValueError(f"anchor_guides must have shape [B, Dg] with B = {num_rows}, "
                         f"got {tuple(anchor_guides.shape)}")
    if bank_guides.shape[0] != num_cols:
        raise ValueError(f"bank_guides must have shape [N, Dg] with N = {num_cols}, got {tuple(bank_guides.shape)}")
    _check_pair_of_embeddings("anchor_guides", anchor_guides, "bank_guides", bank_guides, "guide", "bank_guides'")


def check_counters(num_rows: int, num_cols: int, *, step: int, row_offset: int, col_offset: int,
                   filled: int) -> None:
    """The Philox counter words and the fill count (docs/DESIGN.md §2): rows and steps are 32-bit words."""
    if not 0 <= step < 2**32:
        raise ValueError(f"step must be in [0, 2**32), got {step}")
    if not (0 <= row_offset and row_offset + num_rows <= 2**32):
        raise ValueError(f"row_offset must be >= 0 with row_offset + B <= 2**32, got {row_offset} with B {num_rows}")
    if not 0 <= col_offset <= 2**63 - 1 - num_cols:
        raise ValueError(f"col_offset must be >= 0 and col_offset + N must fit in int64, got {col_offset}")
    if not 0 <= filled <= num_cols:
        raise ValueError(f"filled must be in [0, N] = [0, {num_cols}], got {filled}")


def check_python_types(tensors: dict, integers: dict, seed) -> None:
    """What only Python can see, before any conversion to the operator's schema: every tensor argument is a
    tensor on the anchors' device (the device picks the kernel), every integer argument an int that fits the
    schema's int64, and ``seed`` an int of any size (it is taken modulo 2⁶⁴)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    device = tensors["anchors"].device
    for name, value in tensors.items():
        if value.device != device:
            raise ValueError(f"{name} must be on the anchors' device {device}, got {value.device}")
    for name, value in integers.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if not -2**63 <= value < 2**63:
            raise ValueError(f"{name} must fit in int64, got {value}")


def raise_if_not_finite(anchors, positive_sim, stats, fn_thresholds=None, anchor_guides=None, *,
                        similarities_finite: bool = True, guide_similarities_finite: bool = True) -> None:
    """The ``check_finite`` errors of the Python kernels, in the words and order of the C++ kernels'
    (csrc/sample_negatives.cpp): the first of anchors, positive_sim, stats that holds a NaN or Inf, then
    fn_thresholds if it holds a NaN (±inf are thresholds), anchor_guides if they hold a NaN or Inf, else the bank
    when a similarity of a live row was not finite, else the bank's guides when a guide similarity was not."""
    suffix = " contains NaN or Inf (pass check_finite=False to skip this check)"
    for name, tensor in (("anchors", anchors), ("positive_sim", positive_sim), ("stats", stats)):
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(name + suffix)
    if fn_thresholds is not None and bool(torch.isnan(fn_thresholds).any()):
        raise ValueError("fn_thresholds contains NaN (pass check_finite=False to skip this check)")
    if anchor_guides is not None and not bool(torch.isfinite(anchor_guides).all()):
        raise ValueError("anchor_guides" + suffix)
    if not similarities_finite:
        raise ValueError("bank contains NaN or Inf (a similarity was not finite; pass check_finite=False to skip "
                         "this check)")
    if not guide_similarities_finite:
        raise ValueError("bank_guides contains NaN or Inf (a guide similarity was not finite; pass "
                         "check_finite=False to skip this check)")
