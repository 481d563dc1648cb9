"""The authors' negative selection, rewritten here as a benchmark baseline (not their code).

It follows the structure of the public FNE loss (Li et al., ACM MM 2023) step by step: dense B×N similarity and
hinge-cost matrices, running statistics updated in a Python loop over the batch with a host synchronisation per
row, Gaussian pdfs evaluated as probabilities (not in the log domain), weights over the whole bank, a Python loop
over rows for the fallback, and torch.multinomial. Only the per-step cost matters here; the statistics objects
are minimal stand-ins for their meters.
"""

from __future__ import annotations

import torch


class _Meter:
    def __init__(self):
        self.count, self.total, self.squares = 0, 0.0, 0.0

    def add(self, value: torch.Tensor) -> None:
        self.count += 1
        self.total += value.item()

    def add_square(self, value: torch.Tensor, mean: float) -> None:
        self.squares += (value.item() - mean) ** 2

    @property
    def mean(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def var(self) -> float:
        return self.squares / max(self.count - 1, 1)


class AuthorsStyleSampler:
    """One direction of their loss: anchors against a bank, with the batch's own keys for the statistics."""

    def __init__(self, margin=0.2, tau=0.5, prior_k=10000, fn_margin=0.999, min_count=200):
        self.margin, self.tau, self.prior_k, self.fn_margin, self.min_count = margin, tau, prior_k, fn_margin, min_count
        self.pos, self.neg = _Meter(), _Meter()

    def _update_statistics(self, anchors, keys):
        scores = anchors @ keys.T
        best_row = scores.sort(1, descending=True)[1][:, 0]
        best_col = scores.T.sort(1, descending=True)[1][:, 0]
        eye = torch.eye(scores.shape[0], dtype=torch.bool)
        row_max = scores.masked_fill(eye, 0).max(1)[0]
        col_max = scores.T.masked_fill(eye, 0).max(1)[0]
        right = [i for i in range(scores.shape[0]) if best_row[i].item() == i and best_col[i].item() == i]
        for i in right:
            self.pos.add(scores[i, i])
            self.neg.add(row_max[i])
            self.neg.add(col_max[i])
        for i in right:
            self.pos.add_square(scores[i, i], self.pos.mean)
            self.neg.add_square(row_max[i], self.neg.mean)
            self.neg.add_square(col_max[i], self.neg.mean)

    @staticmethod
    def _pdf(mean, var, x):
        return torch.distributions.Normal(mean, var**0.5).log_prob(x).exp()

    def __call__(self, anchors, bank, positive_sim, anchor_ids, bank_ids, batch_keys):
        sims = anchors @ bank.T
        positive = positive_sim.reshape(-1, 1).expand_as(sims)
        cost = (self.margin + sims - positive).clamp(min=0)
        mask = anchor_ids.reshape(-1, 1) == bank_ids.reshape(1, -1)
        cost = cost.masked_fill(mask, 0)
        hardest = cost.max(1)[1]
        self._update_statistics(anchors, batch_keys)
        weights = torch.exp(-((sims - positive) ** 2) * self.tau)
        if self.pos.count > self.min_count:
            pos_p = self._pdf(torch.tensor(self.pos.mean), torch.tensor(self.pos.var), sims)
            neg_p = self._pdf(torch.tensor(self.neg.mean), torch.tensor(self.neg.var), sims)
            match = pos_p / (pos_p + (self.prior_k - 1) * neg_p)
            use = (1 - match) < self.fn_margin
            weights[use] = torch.exp(-match * self.tau)[use]
        weights = weights.masked_fill(mask, 0)
        weights = weights.masked_fill(sims <= self.pos.mean - self.margin, 0)
        for i, total in enumerate(weights.sum(1)):
            if total == 0:
                weights[i, hardest[i]] = 1.0
        negative = torch.multinomial(weights, 1)
        return cost.gather(1, negative)
