"""Running statistics of positive and negative similarities (docs/DESIGN.md §1, "Running statistics").

Everything stays on the device: no ``.item()``, no loop over rows, no host synchronisation per step.
"""

from __future__ import annotations

import torch

__all__ = ["RunningStats", "right_pair_samples"]


def right_pair_samples(sim: torch.Tensor, columns: torch.Tensor | None = None,
                       offset: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Samples of one batch from the in-batch similarity matrix ``sim = V Tᵀ`` [B, B].

    Returns ``(positive [B], negative [B, 2], right [B] bool)``: row i is a sample where ``right[i]``, i.e.
    ``argmax_j sim[i, j] == i`` and ``argmax_j sim[j, i] == i``; its positive is ``sim[i, i]`` and its negatives
    are the row and column maxima with the diagonal set to 0 (the authors' code fills it with 0 first).

    One rank of a global batch of G passes its rows ``sim`` [B, G] and its columns ``columns`` [G, B] of the
    G × G matrix (``GlobalBatch.similarity_blocks``), its first pair being global pair ``offset``: the samples of
    its B pairs, exactly the G × G matrix's rows for them.
    """
    columns = sim if columns is None else columns
    if sim.dim() != 2 or columns.shape != sim.shape[::-1] or not 0 <= offset <= sim.shape[1] - sim.shape[0]:
        raise ValueError(f"sim must be [B, G] with columns [G, B] and 0 <= offset <= G - B (a square [B, B] "
                         f"matrix alone), got {tuple(sim.shape)}, {tuple(columns.shape)}, offset {offset}")
    local = torch.arange(sim.shape[0], device=sim.device)
    diagonal = local + offset
    right = (sim.argmax(dim=1) == diagonal) & (columns.argmax(dim=0) == diagonal)
    on_diagonal = torch.zeros(sim.shape, dtype=torch.bool, device=sim.device)
    on_diagonal[local, diagonal] = True
    row_negative = sim.masked_fill(on_diagonal, 0.0).max(dim=1).values
    column_negative = columns.masked_fill(on_diagonal.T, 0.0).max(dim=0).values
    return sim[local, diagonal], torch.stack([row_negative, column_negative], dim=1), right


class _Moments:
    """Count, running mean and the sum of squared deviations, each step's terms taken about the running mean
    after that step's samples were added (the authors' order); or an exponential moving average."""

    def __init__(self, device, momentum: float | None):
        self.momentum = momentum
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.squares = torch.zeros((), dtype=torch.float64, device=device)
        self.ema_mean = torch.zeros((), dtype=torch.float64, device=device)
        self.ema_var = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, values: torch.Tensor, mask: torch.Tensor) -> None:
        values = values.to(torch.float64)
        weight = mask.to(torch.float64)
        step_count = weight.sum()
        if self.momentum is not None:
            batch_mean = (values * weight).sum() / step_count.clamp(min=1)
            batch_var = ((values - batch_mean) ** 2 * weight).sum() / (step_count - 1).clamp(min=1)
            first = self.count == 0
            m = self.momentum
            new_mean = torch.where(first, batch_mean, m * self.ema_mean + (1 - m) * batch_mean)
            new_var = torch.where(first, batch_var, m * self.ema_var + (1 - m) * batch_var)
            self.ema_mean = torch.where(step_count > 0, new_mean, self.ema_mean)
            self.ema_var = torch.where(step_count > 0, new_var, self.ema_var)
        self.count = self.count + step_count
        self.total = self.total + (values * weight).sum()
        mean_after = self.total / self.count.clamp(min=1)
        self.squares = self.squares + ((values - mean_after) ** 2 * weight).sum()

    def mean(self) -> torch.Tensor:
        return self.ema_mean if self.momentum is not None else self.total / self.count.clamp(min=1)

    def variance(self) -> torch.Tensor:
        return self.ema_var if self.momentum is not None else self.squares / (self.count - 1).clamp(min=1)


class RunningStats:
    """μ⁺, σ⁺², μ⁻, σ⁻² and n⁺ of the right pairs seen since the last ``reset()``, on ``device``.

    ``momentum=None`` (default) reproduces the authors' running mean and variance; a float in (0, 1) switches
    to exponential moving averages of each step's mean and variance (n⁺ still counts every sample).
    """

    def __init__(self, device: torch.device | str = "cpu", momentum: float | None = None):
        if momentum is not None and not 0.0 < momentum < 1.0:
            raise ValueError(f"momentum must be None or in (0, 1), got {momentum}")
        self.device = torch.device(device)
        self.momentum = momentum
        self.reset()

    def reset(self) -> None:
        self._positive = _Moments(self.device, self.momentum)
        self._negative = _Moments(self.device, self.momentum)

    @torch.no_grad()
    def update(self, sim: torch.Tensor) -> None:
        """Adds the right pairs of one batch's in-batch similarity matrix ``sim`` [B, B] (image × text)."""
        self._add(*right_pair_samples(sim.detach().to(self.device)))

    @torch.no_grad()
    def update_batch(self, batch) -> None:
        """Adds the right pairs of a global batch (``fne_fast.sampling.distributed.GlobalBatch``; collective when
        it spans several ranks): each rank takes its pairs' samples from its rows and columns of the in-batch
        matrix, and the samples of all G pairs, gathered in rank order, update every rank's statistics alike, as
        ``update`` of the G × G matrix would."""
        rows, columns = (block.detach().to(self.device) for block in batch.similarity_blocks())
        positive, negative, right = right_pair_samples(rows, columns, batch.offset)
        samples = batch.gather(torch.cat([positive[:, None], negative, right[:, None].to(positive.dtype)], dim=1))
        self._add(samples[:, 0], samples[:, 1:3], samples[:, 3] > 0)

    def _add(self, positive, negative, right) -> None:
        self._positive.add(positive, right)
        self._negative.add(negative, right.unsqueeze(1).expand_as(negative))

    def as_tensor(self) -> torch.Tensor:
        """The op's ``stats`` argument: float32 ``(μ⁺, σ⁺², μ⁻, σ⁻², n⁺)`` on the device."""
        pos, neg = self._positive, self._negative
        return torch.stack([pos.mean(), pos.variance(), neg.mean(), neg.variance(), pos.count]).to(torch.float32)

    _FIELDS = ("count", "total", "squares", "ema_mean", "ema_var")

    def state_dict(self) -> dict:
        state = {}
        for name, moments in (("positive", self._positive), ("negative", self._negative)):
            for field in self._FIELDS:
                state[f"{name}.{field}"] = getattr(moments, field).clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            which, field = key.split(".")
            if field not in self._FIELDS or which not in ("positive", "negative"):
                raise KeyError(f"unexpected key {key!r} in the RunningStats state")
            moments = self._positive if which == "positive" else self._negative
            setattr(moments, field, value.to(device=self.device, dtype=torch.float64).clone())
