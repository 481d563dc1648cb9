"""The bytes a sharded ``MemoryBank`` sends per step (docs/DESIGN.md §3.1): the cost formula, and its
data-dependent terms counted from a step's chosen rows. The tests check it byte for byte against sharded steps."""

from __future__ import annotations

import torch

__all__ = ["sharded_traffic", "remote_rows"]


def sharded_traffic(counts: list[int], rank: int, k: int, dim: int, element_bytes: int, *, rows_fetched: int,
                    rows_served: int, guide_dim: int = 0) -> dict[str, int]:
    """The bytes rank ``rank`` of a sharded bank sends for one ``enqueue`` and one ``sample`` of a step, by kind
    (docs/DESIGN.md §3.1; the small agreement rows and row counts aside). ``counts``: every rank's local batch (the
    anchors and the ring are padded to the largest); ``k``: negatives per anchor; ``element_bytes``: the bank's
    dtype's; ``rows_fetched``: chosen rows of this rank's anchors that other ranks hold; ``rows_served``: rows of
    this rank's shard chosen for other ranks' anchors (each about B·k·(W − 1)/W when the chosen rows spread
    evenly over the shards); ``guide_dim``: the bank's guides per row (language guidance), which travel with the
    anchors and the ring's rows."""
    others, largest, row_bytes = len(counts) - 1, max(counts), dim * element_bytes
    guide_bytes = guide_dim * element_bytes
    return {"anchors": others * largest * (row_bytes + guide_bytes + 16),
            "candidates": 16 * k * (sum(counts) - counts[rank]),
            "requests": 8 * rows_fetched, "rows": (row_bytes + 8) * rows_served,
            "ring": others * largest * (row_bytes + guide_bytes + 8)}


def remote_rows(counts: list[int], index: torch.Tensor, valid: torch.Tensor,
                shard_size: int) -> tuple[list[int], list[int]]:
    """``sharded_traffic``'s data-dependent terms for every rank, from a step's chosen rows ``index``, ``valid``
    [G, k] of the global batch (the ranks' anchors in rank order): (chosen rows of each rank's anchors that
    other ranks hold, rows of each rank's shard that other ranks' anchors chose)."""
    owner = torch.where(valid, index, 0) // shard_size
    anchor_rank = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))[:, None].expand_as(index)
    remote = valid & (owner != anchor_rank)
    return (torch.bincount(anchor_rank[remote], minlength=len(counts)).tolist(),
            torch.bincount(owner[remote], minlength=len(counts)).tolist())
