"""Exact merge of the candidates that several calls of ``sample_negatives`` over disjoint column ranges of one
bank returned with ``return_keys=True`` (docs/DESIGN.md §3.1): the result equals one call over the whole bank.

Per anchor: sampled candidates (finite key) by key descending, ties to the lower global index; then fallback
candidates (valid, key -inf) by similarity descending, ties to the lower index; then invalid slots; the first k.
A global top-k of keys is the top-k of the per-shard top-k's, and when fewer than k candidates survive globally,
each shard has already listed enough of its hardest non-chosen candidates.
"""

from __future__ import annotations

import torch

__all__ = ["merge_candidates"]


def merge_candidates(index: torch.Tensor, sim: torch.Tensor, valid: torch.Tensor, key: torch.Tensor,
                     k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(index, sim, valid, key)`` of shape [B, C] (the shards' [B, k] outputs side by side, in any order) ->
    the same four of shape [B, k]: what one call over the union of the shards' columns returns."""
    if not index.shape == sim.shape == valid.shape == key.shape or index.dim() != 2:
        raise ValueError(f"index, sim, valid and key must be [B, C] of one shape, got {tuple(index.shape)}, "
                         f"{tuple(sim.shape)}, {tuple(valid.shape)}, {tuple(key.shape)}")
    if k < 1 or k > index.shape[1]:
        raise ValueError(f"k must be in [1, C] = [1, {index.shape[1]}], got {k}")
    sampled = valid & torch.isfinite(key)
    group = torch.where(sampled, 0, torch.where(valid, 1, 2))  # sampled, fallback, invalid
    value = torch.where(sampled, key, torch.where(valid, sim, torch.zeros_like(sim)))
    # Stable sorts from the least to the most significant criterion: index ascending, value descending, group.
    order = torch.sort(torch.where(valid, index, torch.full_like(index, 2**62)), dim=1, stable=True).indices
    order = torch.gather(order, 1, torch.sort(torch.gather(value, 1, order), dim=1, descending=True,
                                              stable=True).indices)
    order = torch.gather(order, 1, torch.sort(torch.gather(group, 1, order), dim=1, stable=True).indices)
    order = order[:, :k]
    merged_valid = torch.gather(valid, 1, order)
    merged_index = torch.where(merged_valid, torch.gather(index, 1, order), torch.full_like(order, -1))
    merged_sim = torch.where(merged_valid, torch.gather(sim, 1, order), torch.zeros_like(order, dtype=sim.dtype))
    merged_key = torch.where(torch.gather(sampled, 1, order), torch.gather(key, 1, order),
                             torch.full_like(merged_sim, float("-inf")))
    return merged_index, merged_sim, merged_valid, merged_key
