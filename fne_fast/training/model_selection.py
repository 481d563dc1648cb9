"""Model selection by validation rsum.

A run is reported at its best-validation epoch, chosen among the epochs trained with its own sampler: the warm-up
epochs (in-batch max violation, the same for every sampler of a seed) are eligible only when a run has nothing
else, so a sampler that harms training cannot be rescued by the shared warm-up. Ties go to the earlier epoch.
The test recalls of that epoch, and of the last one, are what a comparison reports; the test split never takes
part in the choice.
"""

from __future__ import annotations

__all__ = ["best_epoch_index", "is_best_so_far", "run_summary"]


def best_epoch_index(history: list[dict]) -> int | None:
    """Position in ``history`` (metrics rows with ``val_rsum`` and ``warmup``) of the best-validation epoch, or
    None for an empty history."""
    if not history:
        return None
    eligible = [index for index, row in enumerate(history) if not row.get("warmup")] or list(range(len(history)))
    return max(eligible, key=lambda index: (history[index]["val_rsum"], -index))


def is_best_so_far(history: list[dict]) -> bool:
    """Whether the last row of ``history`` is (now) the best-validation epoch: when to keep a copy of the state."""
    return bool(history) and best_epoch_index(history) == len(history) - 1


def run_summary(history: list[dict]) -> dict:
    """``{"best_epoch", "epochs", "best": row, "last": row}`` of a run's metrics rows."""
    index = best_epoch_index(history)
    if index is None:
        raise ValueError("the run has no finished epoch to summarise")
    return {"best_epoch": history[index]["epoch"], "epochs": len(history), "best": history[index],
            "last": history[-1]}
