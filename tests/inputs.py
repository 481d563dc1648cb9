"""The one input generator, oracle wrapper and statistical checks of the sample_negatives tests, shared by
every backend's tests."""

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


# --- the oracle and the comparisons every backend's tests use ---------------------------------------------------

def run_oracle(inputs: dict, **options):
    """The float64 oracle on the inputs' device; results on the CPU."""
    from fne_fast import reference

    options = {key: value for key, value in options.items() if key not in ("backend", "check_finite")}
    result = reference.sample_negatives_reference(*inputs.values(), dtype=torch.float64, **options)
    return tuple(tensor.cpu() for tensor in result)


def assert_same_draws(actual, expected) -> None:
    """Identical indices and validity, similarities within float32 accumulation error (compared on the CPU)."""
    index, sim, valid = (tensor.cpu() for tensor in actual)
    ref_index, ref_sim, ref_valid = (tensor.cpu() for tensor in expected)
    assert torch.equal(valid, ref_valid)
    assert torch.equal(index, ref_index)
    torch.testing.assert_close(sim, ref_sim, rtol=0, atol=1e-6)


# --- distribution tests ---------------------------------------------------------------------------------------

# Similarities of the candidates to the anchor: two below the cut-down threshold μ⁺ - margin = 0.1, the rest
# spread over both branches of the weight (P_fn > 0.001 from s ≈ 0.46 on with EXACT_STATS).
DISTRIBUTION_SIMS = (-0.25, 0.0625, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


def distribution_inputs(sims=DISTRIBUTION_SIMS, copies: int = 20000, device="cpu") -> dict:
    """One anchor repeated `copies` times against candidates of chosen similarity: rows differ only in their
    Philox counter, so they are independent draws from the same categorical distribution."""
    inputs = sample_inputs(1, len(sims), 8, exact=True, seed=11)
    inputs["anchors"] = torch.zeros(copies, 8)
    inputs["anchors"][:, 0] = 1.0
    inputs["bank"][:, 0] = torch.tensor(sims)
    inputs["bank_ids"] = torch.arange(1, len(sims) + 1)
    inputs["anchor_ids"] = torch.zeros(copies, dtype=torch.int64)
    inputs["positive_sim"] = torch.full((copies,), 0.8)
    return {name: tensor.to(device) for name, tensor in inputs.items()}


def expected_probabilities(inputs: dict, tau: float, mode: str = "fne") -> torch.Tensor:
    """Normalised exp(ℓ) over the survivors of distribution_inputs, in float64 on the CPU."""
    from fne_fast import reference

    sim = inputs["anchors"][:1].cpu().double() @ inputs["bank"].cpu().double().T  # [1, N]
    stats = inputs["stats"].cpu()
    weights = reference.log_weights(sim, inputs["positive_sim"][:1].cpu(), stats, mode=mode, tau=tau)[0]
    survives = sim[0] > stats[0].item() - 0.2
    probabilities = torch.where(survives, weights.exp(), torch.zeros_like(weights))
    return probabilities / probabilities.sum()


def chi_square_p_value(counts: torch.Tensor, probabilities: torch.Tensor) -> float:
    """Pearson's goodness of fit of sampled counts to probabilities; a cut-down candidate sampled fails."""
    from scipy import stats

    counts = counts.cpu()
    keep = probabilities > 0
    assert counts[~keep].sum() == 0, "a cut-down candidate was sampled"
    expected = probabilities[keep] * counts.sum()
    return stats.chisquare(counts[keep].double().numpy(), expected.numpy()).pvalue


def pair_p_values(index: torch.Tensor, probabilities: torch.Tensor) -> tuple[float, float]:
    """Chi-square p-values of the (first, second) slot pairs of k = 2 draws: against sampling without
    replacement (p_i p_j / (1 - p_i), the Gumbel-top-2 law) and against independent slots (p_i p_j, renormalised
    over i ≠ j), which a correct sampler must fail."""
    index = index.cpu()
    live = probabilities > 0
    n = int(live.sum())
    order = torch.nonzero(live).flatten()
    position = torch.full((probabilities.numel(),), -1, dtype=torch.int64)
    position[order] = torch.arange(n)
    counts = torch.bincount(position[index[:, 0]] * n + position[index[:, 1]], minlength=n * n)
    p = probabilities[order]
    without_replacement = p.reshape(-1, 1) * p.reshape(1, -1) / (1 - p).reshape(-1, 1)
    independent = p.reshape(-1, 1) * p.reshape(1, -1)
    for table in (without_replacement, independent):
        table.fill_diagonal_(0)
    return (chi_square_p_value(counts, without_replacement.flatten()),
            chi_square_p_value(counts, (independent / independent.sum()).flatten()))


def strided_copy(inputs: dict) -> dict:
    """The same values as `inputs` in non-contiguous layouts (column-major anchors, strided bank and vectors)."""
    return {
        "anchors": inputs["anchors"].T.contiguous().T,
        "bank": torch.stack([inputs["bank"], -inputs["bank"]], dim=2)[:, :, 0],
        "positive_sim": torch.stack([inputs["positive_sim"]] * 2, dim=1)[:, 0],
        "anchor_ids": inputs["anchor_ids"].repeat_interleave(3)[::3],
        "bank_ids": inputs["bank_ids"].repeat_interleave(2)[::2],
        "stats": torch.stack([inputs["stats"]] * 2, dim=1)[:, 1],
    }
