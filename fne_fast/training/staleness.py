"""How stale the banks' rows are, once per epoch, for a run whose backbone tops train (``--finetune``).

A bank row is the key the momentum encoder gave a pair when the pair was enqueued; while the encoders train, the
key the momentum encoder would give the same pair now drifts away from it. ``BankLedger`` keeps, beside the ring,
the caption (the pair) and the step of every row: the image bank's rows are named by their image ids already, the
text bank's need the caption, and the age needs the step. ``bank_staleness`` compares a fixed sample of rows with
their current momentum keys.
"""

from __future__ import annotations

import torch

from fne_fast.data import FeatureSplit
from fne_fast.sampling import distributed

__all__ = ["BankLedger", "bank_staleness", "STALENESS_SAMPLE"]

STALENESS_SAMPLE = 256  # rows compared per bank and epoch, evenly spaced over the ring


class BankLedger:
    """The caption and the step of every row of the global ring (the banks' rows are written at the same
    positions, so one ledger serves both), on every process: 16 bytes per row."""

    def __init__(self, size: int):
        self.size = size
        self.caption = torch.full((size,), -1, dtype=torch.int64)
        self.step = torch.full((size,), -1, dtype=torch.int64)

    def record(self, placement: tuple[int, torch.Tensor], captions: torch.Tensor, step: int) -> None:
        """The global batch's ``captions`` at the ring positions the banks' next enqueue writes them to
        (``MemoryBank.next_positions``: the first caption kept, and the positions from there)."""
        skipped, positions = placement
        self.caption[positions] = captions[skipped:].cpu()
        self.step[positions] = step

    def state_dict(self) -> dict:
        return {"caption": self.caption.clone(), "step": self.step.clone()}

    def load_state_dict(self, state: dict) -> None:
        if state["caption"].shape != (self.size,):
            raise ValueError(f"the ledger holds {state['caption'].shape[0]} rows, the banks {self.size}")
        self.caption, self.step = state["caption"].clone(), state["step"].clone()


def _mean_cosine(stored: torch.Tensor, current: torch.Tensor) -> float:
    stored = torch.nn.functional.normalize(stored.float(), dim=-1)
    return float((stored * torch.nn.functional.normalize(current.float(), dim=-1)).sum(dim=-1).mean())


@torch.no_grad()
def _stored_rows(bank, rows: torch.Tensor, device) -> torch.Tensor:
    """The bank's stored keys at the global ``rows``: each rank adds the rows it holds into zeros, and one
    all_reduce sums them (adding zeros is exact), so no rank needs the whole bank."""
    local = rows - bank.row_begin
    mine = (local >= 0) & (local < bank.features.shape[0])
    stored = torch.where(mine[:, None], bank.features[local.clamp(0, bank.features.shape[0] - 1)].float(), 0.0)
    return distributed.all_reduce(stored.to(device), bank.group, "staleness")


def bank_staleness(heads, split: FeatureSplit, image_bank, text_bank, ledger: BankLedger, step: int,
                   device) -> dict | None:
    """The mean cosine between the stored keys of a fixed sample of written rows and the keys the momentum
    copies give the same pairs now (image bank, text bank: ``MemoryBank``s, collective when sharded), and the
    rows' age in steps (mean, max) after ``step`` steps; None before any row is written."""
    written = torch.nonzero(ledger.step >= 0).squeeze(1)
    if written.numel() == 0:
        return None
    rows = written[torch.linspace(0, written.numel() - 1, min(STALENESS_SAMPLE, written.numel())).long()]
    captions = ledger.caption[rows]
    image_keys = heads.image_head_momentum(split.image_features[split.caption_image[captions]].to(device))
    text_keys = heads.text_head_momentum(split.text_features[captions].to(device))
    age = (step - ledger.step[written]).double()
    return {"image_cosine": _mean_cosine(_stored_rows(image_bank, rows, device), image_keys),
            "text_cosine": _mean_cosine(_stored_rows(text_bank, rows, device), text_keys),
            "mean_age_steps": float(age.mean()), "max_age_steps": int(age.max())}
