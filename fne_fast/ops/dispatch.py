"""The typed Python wrapper of ``fne_fast::sample_negatives``, its fake implementation, and the Triton kernel's
place behind the dispatcher.

Dispatch. ``backend="auto"`` (and ``"cpu"``, ``"cuda"``) calls the operator, and the dispatcher picks the kernel
registered for the inputs' device: the C++ kernel on CPU; on CUDA the compiled CUDA C++ kernel when this build
has it, else the Triton kernel, which this module registers for the CUDA key. Triton itself is imported on that
kernel's first call, never by ``import fne_fast``. ``backend="triton"`` and ``backend="reference"`` call those
two Python kernels directly.

Options. ``sample_negatives`` takes the sampler's options as keyword arguments (a user's call) and builds one
``SamplerOptions``; code that already holds one (the memory bank) calls ``sample_negatives_with_options``. Either
way the options are validated once, when the object is built, and reach a kernel as that object or as the
schema's positional values (``SamplerOptions.schema_values``).

Checks. Each call is checked once, by whatever serves it: the C++ kernels at their entry (csrc/), the Python
kernels through fne_fast.ops.checks. The wrapper adds what only Python can see (argument types, integers beyond
int64, the backend).
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

from fne_fast.ops.checks import (TENSOR_ARGUMENTS, check_counters, check_fn_thresholds, check_guides,
                                 check_python_types, check_tensor_arguments)
from fne_fast.ops.options import SamplerOptions

__all__ = ["sample_negatives", "sample_negatives_with_options", "check_backend", "BACKENDS", "COMPILED_CUDA_KERNEL",
           "TRITON_SERVES_CUDA"]

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")
_OPERATOR = "fne_fast::sample_negatives"
_UINT64 = 1 << 64
_DEFAULTS = SamplerOptions()

# Whether fne_fast._C holds the compiled CUDA kernel (read before the Triton kernel may take the CUDA key).
COMPILED_CUDA_KERNEL = torch._C._dispatch_has_kernel_for_dispatch_key(_OPERATOR, "CUDA")


def _triton_kernels():
    """fne_fast/kernels/sample_negatives.py, imported on first use (it imports Triton)."""
    return importlib.import_module("fne_fast.kernels.sample_negatives")


def _run_python_kernel(backend, anchors, bank, positive_sim, anchor_ids, bank_ids, stats, options, *, fn_thresholds,
                       anchor_guides, bank_guides, seed, step, row_offset, col_offset, filled, check_finite,
                       count_above):
    """The reference or the Triton kernel, after the checks the C++ kernels make at their entry: the four outputs,
    and the exceedance counts with ``count_above``."""
    check_tensor_arguments(anchors, bank, positive_sim, anchor_ids, bank_ids, stats)
    check_fn_thresholds(fn_thresholds, anchors.shape[0], anchors.device)
    check_guides(anchor_guides, bank_guides, options.guide_threshold, anchors.shape[0], bank.shape[0],
                 anchors.device)
    if count_above and fn_thresholds is None:
        raise ValueError("count_above counts the candidates above fn_thresholds, which were not given")
    check_counters(anchors.shape[0], bank.shape[0], step=step, row_offset=row_offset, col_offset=col_offset,
                   filled=filled)
    counters = dict(seed=seed, step=step, row_offset=row_offset, col_offset=col_offset, filled=filled,
                    fn_thresholds=fn_thresholds, anchor_guides=anchor_guides, bank_guides=bank_guides,
                    count_above=count_above)
    if backend == "reference":
        from fne_fast.ops import reference  # the oracle is loaded only when asked for

        return reference.reference_draws(anchors, bank, positive_sim, anchor_ids, bank_ids, stats, options,
                                         dtype=torch.float32, check_finite=check_finite, **counters)
    return _triton_kernels().sample_negatives_triton(anchors, bank, positive_sim, anchor_ids, bank_ids, stats,
                                                     options, check_finite=check_finite, **counters)


def _sample_negatives_triton_op(anchors, bank, positive_sim, anchor_ids, bank_ids, stats, fn_thresholds,
                                anchor_guides, bank_guides, *schema_values):
    """The Triton kernel in the schema's calling convention (csrc/fne_fast.cpp), for the CUDA dispatch key: the
    options' values (``SCHEMA_FIELDS``), then seed, step, row_offset, col_offset, filled, check_finite,
    count_above; five outputs, the counts empty unless asked for."""
    *option_values, seed, step, row_offset, col_offset, filled, check_finite, count_above = schema_values
    result = _run_python_kernel("triton", anchors, bank, positive_sim, anchor_ids, bank_ids, stats,
                                SamplerOptions.from_schema(*option_values), fn_thresholds=fn_thresholds,
                                anchor_guides=anchor_guides, bank_guides=bank_guides, seed=seed % _UINT64,
                                step=step, row_offset=row_offset, col_offset=col_offset,
                                filled=filled, check_finite=check_finite, count_above=count_above)
    return result if count_above else (*result, anchors.new_zeros((0,), dtype=torch.int64))


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


def sample_negatives_with_options(anchors: torch.Tensor, bank: torch.Tensor, positive_sim: torch.Tensor,
                                  anchor_ids: torch.Tensor, bank_ids: torch.Tensor, stats: torch.Tensor,
                                  options: SamplerOptions = _DEFAULTS, *, fn_thresholds: torch.Tensor | None = None,
                                  anchor_guides: torch.Tensor | None = None, bank_guides: torch.Tensor | None = None,
                                  seed: int = 0, step: int = 0, row_offset: int = 0, col_offset: int = 0,
                                  filled: int | None = None, backend: str = "auto", check_finite: bool = True,
                                  count_above: bool = False):
    """``sample_negatives`` with the sampler's options as one ``SamplerOptions``; returns all four outputs
    ``(index, sim, valid, key)``, and with ``count_above`` a fifth, the exceedance counts (``return_counts`` of
    ``sample_negatives``)."""
    if not isinstance(options, SamplerOptions):
        raise TypeError(f"options must be a SamplerOptions, got {type(options).__name__}")
    tensors = dict(zip(TENSOR_ARGUMENTS, (anchors, bank, positive_sim, anchor_ids, bank_ids, stats)))
    check_python_types(tensors, dict(step=step, row_offset=row_offset, col_offset=col_offset,
                                     filled=0 if filled is None else filled), seed)
    optional = dict(fn_thresholds=fn_thresholds, anchor_guides=anchor_guides, bank_guides=bank_guides)
    given = {name: tensor for name, tensor in optional.items() if tensor is not None}
    if given:
        check_python_types({"anchors": anchors, **given}, {}, seed)
    filled = bank.shape[0] if filled is None else filled
    seed %= _UINT64
    check_backend(backend, anchors.device)
    if backend in ("reference", "triton"):
        return tuple(_run_python_kernel(backend, *tensors.values(), options, **optional, seed=seed, step=step,
                                        row_offset=row_offset, col_offset=col_offset, filled=filled,
                                        check_finite=check_finite, count_above=bool(count_above)))
    signed_seed = seed - _UINT64 if seed >= 2**63 else seed  # the schema's int is int64: the same 64 bits
    result = torch.ops.fne_fast.sample_negatives(*tensors.values(), *optional.values(), *options.schema_values(),
                                                 signed_seed, step, row_offset, col_offset, filled,
                                                 bool(check_finite), bool(count_above))
    return tuple(result if count_above else result[:4])


def sample_negatives(anchors: torch.Tensor, bank: torch.Tensor, positive_sim: torch.Tensor,
                     anchor_ids: torch.Tensor, bank_ids: torch.Tensor, stats: torch.Tensor, *,
                     k: int = _DEFAULTS.k, mode: str = _DEFAULTS.mode, margin: float = _DEFAULTS.margin,
                     tau: float = _DEFAULTS.tau, fn_tau: float | None = _DEFAULTS.fn_tau,
                     prior_k: float = _DEFAULTS.prior_k, fn_margin: float = _DEFAULTS.fn_margin,
                     min_count: int = _DEFAULTS.min_count, cutdown: bool = _DEFAULTS.cutdown,
                     cut_margin: float | None = _DEFAULTS.cut_margin, center_offset: float = _DEFAULTS.center_offset,
                     relative_cut: float | None = _DEFAULTS.relative_cut,
                     guide_threshold: float | None = _DEFAULTS.guide_threshold,
                     fn_thresholds: torch.Tensor | None = None, anchor_guides: torch.Tensor | None = None,
                     bank_guides: torch.Tensor | None = None, seed: int = 0, step: int = 0, row_offset: int = 0,
                     col_offset: int = 0,
                     filled: int | None = None, backend: str = "auto", check_finite: bool = True,
                     return_keys: bool = False, return_counts: bool = False):
    """Sample k negatives per anchor from the bank in one pass (docs/DESIGN.md §2).

    Args:
        anchors, bank: ``[B, D]`` and ``[N, D]`` embeddings (float32, bfloat16 or float16; float32 anchors may
            meet a low-precision bank), on one device, which picks the kernel.
        positive_sim: ``[B]`` float32, each anchor's similarity to its own positive.
        anchor_ids, bank_ids: ``[B]`` and ``[N]`` int64 identities; a bank row with the anchor's id is a positive.
        stats: float32 ``(μ⁺, σ⁺², μ⁻, σ⁻², n⁺)`` on the device (``fne_fast.RunningStats.as_tensor()``).
        k … relative_cut: the sampler's options, the fields of :class:`fne_fast.SamplerOptions`, whose defaults
            these are (``**options.as_kwargs()`` passes a whole one).
        fn_thresholds: optional ``[B]`` float32 per-anchor thresholds: a candidate with a larger similarity is
            excluded from the race and the fallback, as by ``relative_cut`` (docs/DESIGN.md §1).
        anchor_guides, bank_guides: language guidance's ``[B, Dg]`` and ``[N, Dg]`` guide embeddings (float32,
            bfloat16 or float16; float32 anchor guides may meet low-precision bank guides), given exactly when
            ``guide_threshold`` is: a candidate whose guide similarity (their float32 dot product) is above it is
            excluded from the race and the fallback (docs/DESIGN.md §1).
        seed, step, row_offset, col_offset: the Philox key and counters; ``seed`` is taken modulo 2⁶⁴.
        filled: the number of live bank rows (rows ``>= filled`` are never chosen); None means N.
        backend: "auto" (the dispatcher's kernel for the device), "cpu", "cuda", "triton" or "reference".
        check_finite: raise on NaN or infinity in the inputs, checked inside the pass; on CUDA reading that flag
            back is the op's one host synchronisation, and ``check_finite=False`` removes it.
        return_keys: also return each slot's race key.
        return_counts: also return, last, ``above [B]`` int64: each anchor's candidates (another identity, a
            filled row, a finite similarity) whose similarity is above its ``fn_thresholds`` entry, excluded or
            not (GloFND's update of per-anchor thresholds needs them; column shards' counts add up).

    Returns:
        ``(index [B, k] int64, sim [B, k] float32, valid [B, k] bool)``: global bank indices (``col_offset + j``)
        ordered by decreasing key, then hardest-negative fallbacks; ``index = -1`` and ``valid = False`` where a
        row has run out of non-positive candidates. With ``return_keys=True`` a fourth tensor ``key [B, k]``
        float32: each slot's race key ℓ + G (the similarity in mode "hardest"), -inf for fallback and invalid
        slots; the keys make the results of column shards mergeable exactly (:func:`fne_fast.merge_candidates`).

    Raises:
        ValueError or TypeError naming the argument for a bad option, shape, dtype, device or counter.

    The op is not differentiable: gather ``bank[index]`` and recompute the similarities with autograd. The
    compiled CUDA kernel supports k <= 64 (its lists live in shared memory).
    """
    options = SamplerOptions(mode=mode, k=k, margin=margin, tau=tau, fn_tau=fn_tau, prior_k=prior_k,
                             fn_margin=fn_margin, min_count=min_count, cutdown=cutdown, cut_margin=cut_margin,
                             center_offset=center_offset, relative_cut=relative_cut,
                             guide_threshold=guide_threshold)
    result = sample_negatives_with_options(anchors, bank, positive_sim, anchor_ids, bank_ids, stats, options,
                                           fn_thresholds=fn_thresholds, anchor_guides=anchor_guides,
                                           bank_guides=bank_guides, seed=seed, step=step, row_offset=row_offset,
                                           col_offset=col_offset, filled=filled, backend=backend,
                                           check_finite=check_finite, count_above=return_counts)
    return (*result[:4 if return_keys else 3], *result[4:])


@torch.library.register_fake(_OPERATOR)
def _sample_negatives_fake(anchors, bank, positive_sim, anchor_ids, bank_ids, stats, fn_thresholds, anchor_guides,
                           bank_guides, k, *schema_values):
    torch._check(anchors.dim() == 2, lambda: "anchors must be 2-D")
    torch._check(k >= 1, lambda: "k must be >= 1")
    rows, count_above = anchors.shape[0], schema_values[-1]
    return (anchors.new_empty((rows, k), dtype=torch.int64), anchors.new_empty((rows, k), dtype=torch.float32),
            anchors.new_empty((rows, k), dtype=torch.bool), anchors.new_empty((rows, k), dtype=torch.float32),
            anchors.new_empty((rows if count_above else 0,), dtype=torch.int64))
