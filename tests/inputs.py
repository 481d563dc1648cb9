"""The one input generator of the sample_negatives tests (shared by every backend's tests)."""

from __future__ import annotations

import torch

# Statistics with the Bayesian branch on (n⁺ = 500 > min_count) and a cut-down threshold inside the range of the
# similarities, so that every branch of DESIGN.md §1 is exercised.
EXACT_STATS = (0.3, 0.04, 0.0, 0.04, 500.0)
RANDOM_STATS = (0.2, 0.01, 0.0, 0.01, 500.0)


def sample_inputs(num_rows: int, num_cols: int, dim: int, *, exact: bool = False, bank_dtype=torch.float32,
                  anchor_dtype=torch.float32, seed: int = 0, num_ids: int | None = None,
                  device: str | torch.device = "cpu") -> dict:
    """Positional arguments of ``sample_negatives`` as a dict.

    ``exact=True`` draws every embedding entry from {-4, ..., 4} / 8: representable in bfloat16 and float16, and
    every dot product is exact in float32 (|s| · 64 < 2²⁴), so all backends see bit-identical similarities.
    Otherwise rows are L2-normalised Gaussians, as in training. Ids repeat, so each anchor has a few positives.
    """
    generator = torch.Generator().manual_seed(seed)
    if exact:
        anchors = torch.randint(-4, 5, (num_rows, dim), generator=generator) / 8.0
        bank = torch.randint(-4, 5, (num_cols, dim), generator=generator) / 8.0
        stats = EXACT_STATS
    else:
        anchors = torch.nn.functional.normalize(torch.randn(num_rows, dim, generator=generator), dim=1)
        bank = torch.nn.functional.normalize(torch.randn(num_cols, dim, generator=generator), dim=1)
        stats = RANDOM_STATS
    num_ids = num_ids or max(num_cols // 4, 1)
    return {
        "anchors": anchors.to(anchor_dtype).to(device),
        "bank": bank.to(bank_dtype).to(device),
        "positive_sim": (0.3 + 0.6 * torch.rand(num_rows, generator=generator)).to(device),
        "anchor_ids": torch.randint(0, num_ids, (num_rows,), generator=generator).to(device),
        "bank_ids": torch.randint(0, num_ids, (num_cols,), generator=generator).to(device),
        "stats": torch.tensor(stats, dtype=torch.float32, device=device),
    }
