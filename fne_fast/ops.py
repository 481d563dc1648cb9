"""The typed Python wrapper of ``fne_fast::sample_negatives``, its fake implementation, and the Triton kernel's
place behind the dispatcher.

Dispatch. ``backend="auto"`` (and ``"cpu"``, ``"cuda"``) calls the operator, and the dispatcher picks the kernel
registered for the inputs' device: the C++ kernel on CPU; on CUDA the compiled CUDA C++ kernel when this build
has it, else the Triton kernel, which this module registers for the CUDA key. Triton itself is imported on that
kernel's first call, never by ``import fne_fast``. ``backend="triton"`` and ``backend="reference"`` call those
two Python kernels directly.

Checks. Each call is checked once, by whatever serves it: the C++ kernels at their entry (csrc/), the Python
kernels through fne_fast.checks. The wrapper adds what only Python can see (argument types, integers beyond
int64, the backend) and builds a ``SamplerOptions``, which validates the scalar options.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

from fne_fast.checks import TENSOR_ARGUMENTS, check_counters, check_python_types, check_tensor_arguments
from fne_fast.options import SamplerOptions

__all__ = ["sample_negatives", "check_backend", "BACKENDS", "COMPILED_CUDA_KERNEL", "TRITON_SERVES_CUDA"]

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")
_OPERATOR = "fne_fast::sample_negatives"
_UINT64 = 1 << 64
_DEFAULTS = SamplerOptions()

# Whether fne_fast._C holds the compiled CUDA kernel (read before the Triton kernel may take the CUDA key).
COMPILED_CUDA_KERNEL = torch._C._dispatch_has_kernel_for_dispatch_key(_OPERATOR, "CUDA")


def _triton_kernels():
    """kernels/sample_negatives.py, imported on first use (it imports Triton)."""
    return importlib.import_module("fne_fast.kernels.sample_negatives")


def _run_python_kernel(backend, anchors, bank, positive_sim, anchor_ids, bank_ids, stats, options, *, seed, step,
                       row_offset, col_offset, filled, check_finite):
    """The reference or the Triton kernel, after the checks the C++ kernels make at their entry."""
    check_tensor_arguments(anchors, bank, positive_sim, anchor_ids, bank_ids, stats)
    check_counters(anchors.shape[0], bank.shape[0], step=step, row_offset=row_offset, col_offset=col_offset,
                   filled=filled)
    counters = dict(seed=seed, step=step, row_offset=row_offset, col_offset=col_offset, filled=filled)
    if backend == "reference":
        from fne_fast import reference  # the oracle is loaded only when asked for

        return reference.sample_negatives_reference(anchors, bank, positive_sim, anchor_ids, bank_ids, stats,
                                                    dtype=torch.float32, check_finite=check_finite,
                                                    return_keys=True, **options.as_kwargs(), **counters)
    return _triton_kernels().sample_negatives_triton(anchors, bank, positive_sim, anchor_ids, bank_ids, stats,
                                                     options, check_finite=check_finite, **counters)


def _sample_negatives_triton_op(anchors, bank, positive_sim, anchor_ids, bank_ids, stats, k, mode, margin, tau,
                                fn_tau, prior_k, fn_margin, min_count, cutdown, seed, step, row_offset, col_offset,
                                filled, check_finite):
    """The Triton kernel in the schema's calling convention (csrc/fne_fast.cpp), for the CUDA dispatch key."""
    options = SamplerOptions(mode=mode, k=k, margin=margin, tau=tau, fn_tau=fn_tau, prior_k=prior_k,
                             fn_margin=fn_margin, min_count=min_count, cutdown=cutdown)
    return _run_python_kernel("triton", anchors, bank, positive_sim, anchor_ids, bank_ids, stats, options,
                              seed=seed % _UINT64, step=step, row_offset=row_offset, col_offset=col_offset,
                              filled=filled, check_finite=check_finite)


def _register_triton_for_cuda():
    """Registers the Triton kernel for the CUDA key when no compiled CUDA kernel was built and Triton is
    installed (found without importing it). Returns the registration, which must stay alive."""
    if COMPILED_CUDA_KERNEL or importlib.util.find_spec("triton") is None:
        return None
    library = torch.library.Library("fne_fast", "IMPL")
    library.impl("sample_negatives", _sample_negatives_triton_op, "CUDA")
    return library


_TRITON_REGISTRATION = _register_triton_for_cuda()
# Whether the Triton kernel serves the CUDA key (benchmarks label the GPU backends with it).
TRITON_SERVES_CUDA = _TRITON_REGISTRATION is not None


def check_backend(backend: str, device: torch.device) -> None:
    """Whether ``backend`` can serve tensors on ``device`` (a ValueError naming the problem if not)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend in ("cpu", "cuda") and device.type != backend:
        raise ValueError(f"backend={backend!r} needs tensors on {backend}, got {device}")
    if backend == "cuda" and not COMPILED_CUDA_KERNEL:
        raise ValueError("backend='cuda' needs the compiled CUDA kernel, which this build lacks (it is built when "
                         "torch is a CUDA build and nvcc is found); use backend='triton' or 'auto'")


def sample_negatives(anchors: torch.Tensor, bank: torch.Tensor, positive_sim: torch.Tensor,
                     anchor_ids: torch.Tensor, bank_ids: torch.Tensor, stats: torch.Tensor, *,
                     k: int = _DEFAULTS.k, mode: str = _DEFAULTS.mode, margin: float = _DEFAULTS.margin,
                     tau: float = _DEFAULTS.tau, fn_tau: float | None = _DEFAULTS.fn_tau,
                     prior_k: float = _DEFAULTS.prior_k, fn_margin: float = _DEFAULTS.fn_margin,
                     min_count: int = _DEFAULTS.min_count, cutdown: bool = _DEFAULTS.cutdown, seed: int = 0,
                     step: int = 0, row_offset: int = 0, col_offset: int = 0, filled: int | None = None,
                     backend: str = "auto", check_finite: bool = True, return_keys: bool = False):
    """Sample k negatives per anchor from the bank in one pass (DESIGN.md §2).

    The sampler's options (``k`` … ``cutdown``) are the fields of :class:`fne_fast.SamplerOptions`, whose
    defaults these are; ``**options.as_kwargs()`` passes a whole ``SamplerOptions``.

    Returns ``(index [B, k] int64, sim [B, k] float32, valid [B, k] bool)``: global bank indices
    (``col_offset + j``) ordered by decreasing key, then hardest-negative fallbacks; ``index = -1`` and
    ``valid = False`` where a row has run out of non-positive candidates. With ``return_keys=True`` a fourth
    tensor ``key [B, k]`` float32: each slot's race key ℓ + G (the similarity in mode "hardest"), -inf for
    fallback and invalid slots; the keys make the results of column shards mergeable exactly
    (:func:`fne_fast.merge_candidates`). The op is not differentiable: gather ``bank[index]`` and recompute the
    similarities with autograd.

    ``seed`` is taken modulo 2⁶⁴. ``check_finite`` raises on NaN/Inf in the inputs, checked inside the pass; on
    CUDA (compiled or Triton) reading that flag back is the op's one host synchronisation, and
    ``check_finite=False`` removes it. The compiled CUDA kernel supports k <= 64 (its lists live in shared memory).
    """
    options = SamplerOptions(mode=mode, k=k, margin=margin, tau=tau, fn_tau=fn_tau, prior_k=prior_k,
                             fn_margin=fn_margin, min_count=min_count, cutdown=cutdown)
    tensors = dict(zip(TENSOR_ARGUMENTS, (anchors, bank, positive_sim, anchor_ids, bank_ids, stats)))
    check_python_types(tensors, dict(step=step, row_offset=row_offset, col_offset=col_offset,
                                     filled=0 if filled is None else filled), seed)
    filled = bank.shape[0] if filled is None else filled
    seed %= _UINT64
    check_backend(backend, anchors.device)
    if backend in ("reference", "triton"):
        result = _run_python_kernel(backend, *tensors.values(), options, seed=seed, step=step,
                                    row_offset=row_offset, col_offset=col_offset, filled=filled,
                                    check_finite=check_finite)
    else:
        signed_seed = seed - _UINT64 if seed >= 2**63 else seed  # the schema's int is int64: the same 64 bits
        result = torch.ops.fne_fast.sample_negatives(
            *tensors.values(), options.k, options.mode, options.margin, options.tau, options.effective_fn_tau,
            options.prior_k, options.fn_margin, options.min_count, options.cutdown, signed_seed, step, row_offset,
            col_offset, filled, bool(check_finite))
    return tuple(result) if return_keys else tuple(result[:3])


@torch.library.register_fake(_OPERATOR)
def _sample_negatives_fake(anchors, bank, positive_sim, anchor_ids, bank_ids, stats, k, mode, margin, tau, fn_tau,
                           prior_k, fn_margin, min_count, cutdown, seed, step, row_offset, col_offset, filled,
                           check_finite):
    torch._check(anchors.dim() == 2, lambda: "anchors must be 2-D")
    torch._check(k >= 1, lambda: "k must be >= 1")
    rows = anchors.shape[0]
    return (anchors.new_empty((rows, k), dtype=torch.int64), anchors.new_empty((rows, k), dtype=torch.float32),
            anchors.new_empty((rows, k), dtype=torch.bool), anchors.new_empty((rows, k), dtype=torch.float32))
