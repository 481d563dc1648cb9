"""ThresholdTable: GloFND's per-item false-negative thresholds (Xie et al., ICML 2025), learned online beside a bank
(docs/DESIGN.md §6).

Each training item i (an identity, as the bank's ids are) has a threshold λ_i; a bank candidate of an anchor of
item i whose similarity is above λ_i is taken for a false negative and excluded, by the op's ``fn_thresholds``
input. λ_i seeks the (1 − α) quantile of item i's candidate similarities: each time an anchor of item i is drawn
for, with ``above`` of the bank's ``filled`` candidates above the threshold it used (counted by the op in the same
pass),

    λ_i ← λ_i + lr · clamp(above / (α · filled) − 1, −1, 1)

GloFND's step is the pinball loss's gradient, lr · (above / filled − α), which is this one's lr · α times and
unclipped. It falls at lr · α per visit where too few candidates lie above: with α = 0.01 a threshold that starts
above the bank's tail (as this one's start does, the bank's keys lagging the online embeddings the statistics
describe) crossed 0.03 of similarity per epoch of Tux Paint while the tail moved about as fast, and after 20 epochs
0.01–0.07 % of the candidates lay above it against the 1–5 % asked. Scaled by 1/α and clipped, a threshold moves
at up to lr either way and, the counts being exact over the whole bank, settles within lr of the quantile; anchors
of one item in one batch average their steps. The cost per step is the batch's rows of the table, whatever the
data set's size. A threshold never set yet starts at the quantile the running statistics' Gaussian of negatives
gives, μ⁻ + Φ⁻¹(1 − α) σ⁻ (+inf while that Gaussian is undefined: nothing excluded, and the item's threshold
stays unset).

Under several processes every rank holds the whole table (8 bytes per item and direction) and applies the same
update from the global batch's ids and counts, so the ranks' tables stay identical without any exchange but the
counts.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch

from fne_fast.ops.fne_math import gaussians_defined

__all__ = ["ThresholdTable"]


class ThresholdTable:
    """``num_items`` thresholds (float32, NaN where never set) moved so that a share ``share`` of each item's bank
    candidates lies above its threshold, by at most ``lr`` per visit."""

    def __init__(self, num_items: int, *, share: float, lr: float, device: torch.device | str = "cpu"):
        if not (isinstance(num_items, int) and num_items >= 1):
            raise ValueError(f"num_items must be an integer >= 1, got {num_items!r}")
        if not (0.0 < share < 1.0):
            raise ValueError(f"share must be in (0, 1), got {share!r}")
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be finite and > 0, got {lr!r}")
        self.share, self.lr = float(share), float(lr)
        self._quantile_z = NormalDist().inv_cdf(1.0 - self.share)  # Φ⁻¹(1 − α) of the starting threshold
        self.values = torch.full((num_items,), math.nan, dtype=torch.float32, device=device)

    @property
    def num_items(self) -> int:
        return self.values.shape[0]

    @torch.no_grad()
    def lookup(self, ids: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        """The thresholds [B] float32 of items ``ids`` [B] (int64), a never-set one at its starting quantile from
        ``stats``, the op's [5] running statistics (μ⁺, σ⁺², μ⁻, σ⁻², n⁺)."""
        self._check_ids(ids)
        values = self.values[ids]
        return torch.where(values.isnan(), self._starting_threshold(stats), values)

    @torch.no_grad()
    def update(self, ids: torch.Tensor, used: torch.Tensor, above: torch.Tensor, filled: int) -> None:
        """One step for the items ``ids`` [B] whose anchors used thresholds ``used`` [B] (``lookup``'s) and had
        ``above`` [B] of ``filled`` bank candidates above them; repeated ids average their steps."""
        self._check_ids(ids)
        if ids.numel() == 0 or filled <= 0:
            return
        steps = (above.to(torch.float64) / (self.share * filled) - 1.0).clamp(-1.0, 1.0)
        # Each anchor takes the mean step of its item's anchors in the batch (a [B, B] mask, not torch.unique,
        # which would synchronise with the host on a GPU); anchors of one item used one threshold, so every one of
        # them writes the same value.
        same_item = (ids.unsqueeze(1) == ids.unsqueeze(0)).to(torch.float64)
        mean_steps = (same_item @ steps) / same_item.sum(dim=1)
        stepped = (used.double() + self.lr * mean_steps).float()
        # A threshold that started at +inf (no Gaussians yet) stays unset, to start from the statistics next time.
        self.values[ids] = torch.where(stepped.isfinite(), stepped, math.nan)

    def _starting_threshold(self, stats: torch.Tensor) -> torch.Tensor:
        stats = stats.to(device=self.values.device, dtype=torch.float64)
        quantile = stats[2] + self._quantile_z * stats[3].clamp(min=0).sqrt()
        return torch.where(gaussians_defined(stats), quantile, math.inf).float()

    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.dtype != torch.int64 or ids.dim() != 1:
            raise ValueError(f"ids must be a [B] int64 tensor, got {tuple(ids.shape)} {ids.dtype}")
        # (checked where it costs no host synchronisation; a trainer's ids come from the table's own labels)
        if ids.device.type == "cpu" and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_items):
            raise ValueError(f"ids must lie in [0, {self.num_items}), got ids from {int(ids.min())} to "
                             f"{int(ids.max())}")

    def state_dict(self) -> dict:
        return {"values": self.values.clone(), "share": self.share, "lr": self.lr}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["values"].shape) != (self.num_items,):
            raise ValueError(f"threshold state holds {tuple(state['values'].shape)} items, this table "
                             f"{self.num_items}")
        self.values = state["values"].to(device=self.values.device, dtype=torch.float32).clone()
