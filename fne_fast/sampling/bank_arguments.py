"""Argument checks of ``MemoryBank.sample`` and ``enqueue`` that run before any collective, so that a bad
argument is reported on its rank instead of hanging the others, and the fingerprint by which sharded ranks agree
that they pass the same options."""

from __future__ import annotations

import zlib

import torch

from fne_fast.ops import BACKENDS, SamplerOptions

__all__ = ["sample_problem", "guides_problem", "fingerprint"]


def sample_problem(anchors, positive_sim, anchor_ids, stats, dim: int, options, seed, step, backend,
                    fn_thresholds=None, count_above=False) -> str | None:
    """What is wrong with ``sample``'s arguments on this rank (None when nothing is), found before any
    collective; the op checks the rest where it runs."""
    if not isinstance(options, SamplerOptions):
        return f"options must be a SamplerOptions, got {type(options).__name__}"
    if backend not in BACKENDS:
        return f"backend must be one of {BACKENDS}, got {backend!r}"
    if not isinstance(seed, int) or not isinstance(step, int):
        return "seed and step must be integers"
    if not isinstance(anchors, torch.Tensor) or anchors.dim() != 2 or anchors.shape[1] != dim:
        return f"anchors must be a [B, {dim}] tensor, got {getattr(anchors, 'shape', type(anchors).__name__)}"
    if not anchors.is_floating_point():
        return f"anchors must be floating point, got {anchors.dtype}"
    rows = anchors.shape[0]
    for name, tensor, dtype in (("positive_sim", positive_sim, torch.float32), ("anchor_ids", anchor_ids,
                                                                                torch.int64)):
        if not isinstance(tensor, torch.Tensor) or tensor.shape != (rows,) or tensor.dtype != dtype:
            return (f"{name} must be a [{rows}] {str(dtype).replace('torch.', '')} tensor, got "
                    f"{getattr(tensor, 'shape', type(tensor).__name__)} {getattr(tensor, 'dtype', '')}")
    if not isinstance(stats, torch.Tensor) or stats.shape != (5,) or stats.dtype != torch.float32:
        return "stats must be a [5] float32 tensor"
    if fn_thresholds is not None and (not isinstance(fn_thresholds, torch.Tensor) or fn_thresholds.shape != (rows,)
                                      or fn_thresholds.dtype != torch.float32):
        return (f"fn_thresholds must be a [{rows}] float32 tensor, got "
                f"{getattr(fn_thresholds, 'shape', type(fn_thresholds).__name__)} "
                f"{getattr(fn_thresholds, 'dtype', '')}")
    if count_above and fn_thresholds is None:
        return "count_above counts the candidates above fn_thresholds, which were not given"
    return None


def guides_problem(name: str, guides, rows: int, guide_dim: int, reason: str) -> str | None:
    """What is wrong with a [rows, guide_dim] guide argument (None: nothing), or with giving one where the bank
    has no guides."""
    if guide_dim == 0:
        return None if guides is None else f"{name} given, but this bank has no guides (guide_dim 0)"
    if not isinstance(guides, torch.Tensor) or guides.dim() != 2 or tuple(guides.shape) != (rows, guide_dim):
        got = tuple(guides.shape) if isinstance(guides, torch.Tensor) else type(guides).__name__
        return f"{name} must be a [{rows}, {guide_dim}] tensor ({reason}), got {got}"
    if not guides.is_floating_point():
        return f"{name} must be floating point, got {guides.dtype}"
    return None


def fingerprint(options: SamplerOptions, stats: torch.Tensor, call: dict, fn_thresholds) -> list[int]:
    """Integers that equal on every rank exactly when the ranks pass the same options, counters and statistics
    (and all give thresholds, or none; their values are each anchor's own)."""
    seed = call["seed"] % 2**64
    rest = repr((options.as_kwargs(), call["backend"], call["check_finite"], call["count_above"],
                 fn_thresholds is None))
    stats_bits = zlib.crc32(stats.detach().float().cpu().numpy().tobytes())
    return [options.k, zlib.crc32(options.mode.encode()), seed - 2**64 if seed >= 2**63 else seed,
            call["step"], zlib.crc32(rest.encode()), stats_bits]
