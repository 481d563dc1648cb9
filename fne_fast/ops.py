"""Typed Python wrappers of the fne_fast operators and their fake (meta) implementations."""

from __future__ import annotations

import torch

from fne_fast import reference

__all__ = ["sample_negatives", "BACKENDS"]

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_UINT64 = 1 << 64


def _has_compiled_cuda_kernel() -> bool:
    """Whether fne_fast._C was built with its CUDA kernel (the CUDA key may be served by Triton instead)."""
    if not torch._C._dispatch_has_kernel_for_dispatch_key("fne_fast::sample_negatives", "CUDA"):
        return False
    try:
        from fne_fast.kernels.sample_negatives import SERVES_CUDA_DISPATCH
    except ImportError:  # no Triton: whatever serves the CUDA key is the compiled kernel
        return True
    return not SERVES_CUDA_DISPATCH


def _check_tensor(name: str, value, *, ndim: int, dtypes: tuple, device: torch.device | None) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    if value.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}, got {str(value.dtype).replace('torch.', '')}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} must be on the anchors' device {device}, got {value.device}")


def _check_arguments(anchors, bank, positive_sim, anchor_ids, bank_ids, stats, k, mode, tau, prior_k, fn_margin,
                     min_count, step, row_offset, col_offset, filled, backend) -> None:
    """Clear Python errors naming the argument, for every backend (the C++ kernels check again)."""
    _check_tensor("anchors", anchors, ndim=2, dtypes=_FLOAT_DTYPES, device=None)
    device = anchors.device
    _check_tensor("bank", bank, ndim=2, dtypes=_FLOAT_DTYPES, device=device)
    if anchors.shape[1] != bank.shape[1]:
        raise ValueError(f"anchors and bank must have the same embedding dimension, got {anchors.shape[1]} "
                         f"and {bank.shape[1]}")
    if anchors.dtype != bank.dtype and anchors.dtype != torch.float32:
        raise TypeError(f"anchors must have the bank's dtype or be float32, got anchors {anchors.dtype} and "
                        f"bank {bank.dtype}")
    num_rows, num_cols = anchors.shape[0], bank.shape[0]
    _check_tensor("positive_sim", positive_sim, ndim=1, dtypes=(torch.float32,), device=device)
    _check_tensor("anchor_ids", anchor_ids, ndim=1, dtypes=(torch.int64,), device=device)
    _check_tensor("bank_ids", bank_ids, ndim=1, dtypes=(torch.int64,), device=device)
    _check_tensor("stats", stats, ndim=1, dtypes=(torch.float32,), device=device)
    for name, tensor, length in (("positive_sim", positive_sim, num_rows), ("anchor_ids", anchor_ids, num_rows),
                                 ("bank_ids", bank_ids, num_cols), ("stats", stats, 5)):
        if tensor.shape[0] != length:
            raise ValueError(f"{name} must have length {length}, got {tensor.shape[0]}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if mode not in reference.MODES:
        raise ValueError(f"mode must be one of {reference.MODES}, got {mode!r}")
    if not tau >= 0 or tau == float("inf"):
        raise ValueError(f"tau must be finite and >= 0, got {tau}")
    if not prior_k > 1 or prior_k == float("inf"):
        raise ValueError(f"prior_k must be finite and > 1, got {prior_k}")
    if not 0 <= fn_margin <= 1:
        raise ValueError(f"fn_margin must be in [0, 1], got {fn_margin}")
    if min_count < 0:
        raise ValueError(f"min_count must be >= 0, got {min_count}")
    if not 0 <= step < 2**32:
        raise ValueError(f"step must be in [0, 2**32), got {step}")
    if not (0 <= row_offset and row_offset + num_rows <= 2**32):
        raise ValueError(f"row_offset must be >= 0 with row_offset + B <= 2**32, got {row_offset} with B {num_rows}")
    if not 0 <= col_offset < 2**63 - num_cols:
        raise ValueError(f"col_offset must be in [0, 2**63 - N), got {col_offset}")
    if not 0 <= filled <= num_cols:
        raise ValueError(f"filled must be in [0, N] = [0, {num_cols}], got {filled}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend in ("cpu", "cuda") and device.type != backend:
        raise ValueError(f"backend={backend!r} needs tensors on {backend}, got {device}")
    if backend == "cuda" and not _has_compiled_cuda_kernel():
        raise ValueError("backend='cuda' needs the compiled CUDA kernel, which this build lacks (it is built when "
                         "torch is a CUDA build and nvcc is found); use backend='triton' or 'auto'")


def sample_negatives(anchors: torch.Tensor, bank: torch.Tensor, positive_sim: torch.Tensor,
                     anchor_ids: torch.Tensor, bank_ids: torch.Tensor, stats: torch.Tensor, *, k: int = 1,
                     mode: str = "fne", margin: float = 0.2, tau: float = 0.5, prior_k: float = 10000.0,
                     fn_margin: float = 0.999, min_count: int = 200, cutdown: bool = True, seed: int = 0,
                     step: int = 0, row_offset: int = 0, col_offset: int = 0, filled: int | None = None,
                     backend: str = "auto", check_finite: bool = True,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample k negatives per anchor from the bank in one pass (DESIGN.md §2).

    Returns ``(index [B, k] int64, sim [B, k] float32, valid [B, k] bool)``: global bank indices
    (``col_offset + j``) ordered by decreasing key, then hardest-negative fallbacks; ``index = -1`` and
    ``valid = False`` where a row has run out of non-positive candidates. The op is not differentiable: gather
    ``bank[index]`` and recompute the similarities with autograd.

    ``seed`` is taken modulo 2⁶⁴. ``check_finite`` raises on NaN/Inf in the inputs, checked inside the pass; on
    CUDA (compiled or Triton) reading that flag back is the op's one host synchronisation, and
    ``check_finite=False`` removes it. The compiled CUDA kernel supports k <= 64 (its lists live in shared memory).
    """
    num_cols = bank.shape[0] if isinstance(bank, torch.Tensor) and bank.dim() >= 1 else 0
    filled = num_cols if filled is None else filled
    _check_arguments(anchors, bank, positive_sim, anchor_ids, bank_ids, stats, k, mode, tau, prior_k, fn_margin,
                     min_count, step, row_offset, col_offset, filled, backend)
    seed %= _UINT64
    options = dict(k=k, mode=mode, margin=margin, tau=tau, prior_k=prior_k, fn_margin=fn_margin,
                   min_count=min_count, cutdown=cutdown, step=step, row_offset=row_offset, col_offset=col_offset,
                   filled=filled)
    if backend == "reference":
        return reference.sample_negatives_reference(anchors, bank, positive_sim, anchor_ids, bank_ids, stats,
                                                    seed=seed, dtype=torch.float32, **options)
    if backend == "triton":
        from fne_fast.kernels.sample_negatives import sample_negatives_triton

        return sample_negatives_triton(anchors, bank, positive_sim, anchor_ids, bank_ids, stats, seed=seed,
                                       check_finite=check_finite, **options)
    signed_seed = seed - _UINT64 if seed >= 2**63 else seed  # the schema's int is int64: same 64 bits
    return torch.ops.fne_fast.sample_negatives(anchors, bank, positive_sim, anchor_ids, bank_ids, stats, k, mode,
                                               float(margin), float(tau), float(prior_k), float(fn_margin),
                                               int(min_count), bool(cutdown), signed_seed, int(step),
                                               int(row_offset), int(col_offset), int(filled), bool(check_finite))


@torch.library.register_fake("fne_fast::sample_negatives")
def _sample_negatives_fake(anchors, bank, positive_sim, anchor_ids, bank_ids, stats, k, mode, margin, tau, prior_k,
                           fn_margin, min_count, cutdown, seed, step, row_offset, col_offset, filled, check_finite):
    torch._check(anchors.dim() == 2, lambda: "anchors must be 2-D")
    torch._check(k >= 1, lambda: "k must be >= 1")
    rows = anchors.shape[0]
    return (anchors.new_empty((rows, k), dtype=torch.int64), anchors.new_empty((rows, k), dtype=torch.float32),
            anchors.new_empty((rows, k), dtype=torch.bool))
