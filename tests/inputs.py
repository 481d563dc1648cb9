"""What every sample_negatives test shares: the backends under test, the float64 oracle and the comparisons
against it, and the statistical checks. Inputs come from fne_fast.ops.testing.sample_inputs."""

from __future__ import annotations

import dataclasses

import torch

import fne_fast
from fne_fast.ops import reference
from fne_fast.ops.options import MODES, SamplerOptions  # noqa: F401  (MODES: re-exported for the tests)
from fne_fast.ops.testing import sample_inputs

# A tau large enough that the weights are far from flat (0.5 gives nearly uniform weights).
STEEP = dict(tau=4.0)
# The op's counter arguments (the rest of a call's keyword arguments are SamplerOptions fields).
_COUNTERS = ("seed", "step", "row_offset", "col_offset", "filled")


@dataclasses.dataclass(frozen=True)
class Backend:
    """One kernel of sample_negatives under test: ``backend=name`` on tensors of ``device``."""

    name: str
    device: str

    @property
    def interpreted(self) -> bool:
        """The Triton interpreter: correct but slow, so a few tests shrink their sizes for it."""
        return self.name == "triton" and self.device == "cpu"

    @property
    def key_tolerance(self) -> float:
        """How far the backend's float32 keys may stray from the float64 oracle's beyond the CPU's rounding:
        compiled GPU code uses approximate log2/exp2/division (about 2 ulp each; Triton) and fuses multiply-adds
        (both GPU compilers). A key is ℓ + G with G up to ~23, where a float32 ulp is 1.9e-6; G takes two
        logarithms and the weight one exp, so the key is within 5 ulps: 1e-5. Candidates whose oracle keys are
        closer than this are near-ties that may go either way; everywhere else the draws must be identical.
        (Derived, not yet measured on a GPU: scripts/gpu_check.sh runs the tests that would show a larger gap.)"""
        return 1e-5 if self.device == "cuda" else 0.0

    def inputs(self, *args, **kwargs) -> dict:
        return sample_inputs(*args, device=self.device, **kwargs)

    def run(self, inputs: dict, **options):
        """The backend on ``inputs`` and tensor options (fn_thresholds), moved to its device:
        ``(index, sim, valid, key)`` on the CPU."""
        tensors = {name: tensor.to(self.device) for name, tensor in inputs.items()}
        options = {name: value.to(self.device) if isinstance(value, torch.Tensor) else value
                   for name, value in options.items()}
        result = fne_fast.sample_negatives(*tensors.values(), backend=self.name, return_keys=True, **options)
        return tuple(tensor.cpu() for tensor in result)


def run_oracle(inputs: dict, **options):
    """The float64 oracle: ``(index, sim, valid, key)`` on the CPU (keys in float64)."""
    options = {key: value.cpu() if isinstance(value, torch.Tensor) else value for key, value in options.items()
               if key not in ("backend", "check_finite")}
    cpu_inputs = {name: tensor.cpu() for name, tensor in inputs.items()}
    result = reference.sample_negatives_reference(*cpu_inputs.values(), dtype=torch.float64, return_keys=True,
                                                  **options)
    return tuple(tensor.cpu() for tensor in result)


# float32 keys (ℓ + G, G up to ~23) against float64: each of the similarity, the weight and the noise is within a
# few float32 ulps, well inside this.
KEY_ATOL = 2e-5


def assert_same_draws(actual, expected) -> None:
    """Identical indices and validity, similarities within float32 accumulation error, and where both results
    carry keys, the same keys to float32 rounding (-inf exactly where the other's is)."""
    index, sim, valid = (tensor.cpu() for tensor in actual[:3])
    ref_index, ref_sim, ref_valid = (tensor.cpu() for tensor in expected[:3])
    assert torch.equal(valid, ref_valid)
    assert torch.equal(index, ref_index)
    torch.testing.assert_close(sim, ref_sim, rtol=0, atol=1e-6)
    if len(actual) == 4 and len(expected) == 4:
        key, ref_key = actual[3].cpu().double(), expected[3].cpu().double()
        assert torch.equal(torch.isfinite(key), torch.isfinite(ref_key))
        finite = torch.isfinite(key)
        torch.testing.assert_close(key[finite], ref_key[finite], rtol=0, atol=KEY_ATOL)


def oracle_values(inputs: dict, index: torch.Tensor, sampled: torch.Tensor, **options) -> torch.Tensor:
    """The float64 value each chosen column is ranked by: its oracle key where the slot was sampled, else its
    similarity (the fallback's order); for explaining disagreements as near-ties."""
    counters = {key: options[key] for key in _COUNTERS if key in options}
    sampler = SamplerOptions(**{key: value for key, value in options.items()
                                if key not in (*_COUNTERS, "backend", "check_finite", "fn_thresholds")})
    cpu_inputs = {name: tensor.cpu() for name, tensor in inputs.items()}
    thresholds = options.get("fn_thresholds")
    keys, _, _, sim = reference.candidate_keys(*cpu_inputs.values(), sampler, **counters,
                                               fn_thresholds=None if thresholds is None else thresholds.cpu())
    column = index.clamp(min=0)
    return torch.where(sampled, torch.gather(keys, 1, column), torch.gather(sim, 1, column))


def assert_matches_oracle(backend: Backend, actual, inputs: dict, max_differ: float = 0.0, **options) -> None:
    """The backend's draws against the float64 oracle's: identical, except in rows where the two picks are
    near-ties (float64 values within ``backend.key_tolerance``, or 1e-4 where ``max_differ`` admits float32
    rounding of random inputs); at most ``max_differ`` of the rows (0.1 % on a GPU) may differ at all."""
    expected = run_oracle(inputs, **options)
    tolerance = max(backend.key_tolerance, 1e-4 if max_differ else 0.0)
    if tolerance == 0.0:
        assert_same_draws(actual, expected)
        return
    index, _, valid, key = actual
    ref_index, _, ref_valid, ref_key = expected
    assert torch.equal(valid.sum(dim=1), ref_valid.sum(dim=1))
    differ = (index != ref_index).any(dim=1)
    assert differ.float().mean() <= max(max_differ, 1e-3 if backend.key_tolerance else 0.0)
    same = ~differ
    assert torch.equal(torch.isfinite(key[same]), torch.isfinite(ref_key[same]))
    torch.testing.assert_close(actual[1][same], expected[1][same], rtol=0, atol=1e-5 if backend.key_tolerance else 1e-6)
    finite = torch.isfinite(key[same])
    torch.testing.assert_close(key[same][finite].double(), ref_key[same][finite], rtol=0,
                               atol=KEY_ATOL + backend.key_tolerance)
    if differ.any():
        rows = differ.nonzero().flatten()
        ours = oracle_values(inputs, index, torch.isfinite(key), **options)[rows]
        theirs = oracle_values(inputs, ref_index, torch.isfinite(ref_key), **options)[rows]
        assert (ours - theirs).abs().max() < tolerance, "a disagreement that is not a near-tie"


# --- distribution tests ---------------------------------------------------------------------------------------

# Similarities of the candidates to the anchor: two below the cut-down threshold μ⁺ - margin = 0.1, the rest
# spread over both branches of the weight (P_fn > 0.001 from s ≈ 0.46 on with the exact inputs' statistics).
DISTRIBUTION_SIMS = (-0.25, 0.0625, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


def distribution_inputs(sims=DISTRIBUTION_SIMS, copies: int = 20000) -> dict:
    """One anchor repeated `copies` times against candidates of chosen similarity: rows differ only in their
    Philox counter, so they are independent draws from the same categorical distribution."""
    inputs = sample_inputs(1, len(sims), 8, kind="exact", seed=11)
    inputs["anchors"] = torch.zeros(copies, 8)
    inputs["anchors"][:, 0] = 1.0
    inputs["bank"][:, 0] = torch.tensor(sims)
    inputs["bank_ids"] = torch.arange(1, len(sims) + 1)
    inputs["anchor_ids"] = torch.zeros(copies, dtype=torch.int64)
    inputs["positive_sim"] = torch.full((copies,), 0.8)
    return inputs


def expected_probabilities(inputs: dict, tau: float, mode: str = "fne", fn_tau: float | None = None) -> torch.Tensor:
    """Normalised exp(ℓ) over the survivors of distribution_inputs, in float64 on the CPU."""
    from fne_fast.ops.fne_math import log_weights

    sim = inputs["anchors"][:1].cpu().double() @ inputs["bank"].cpu().double().T  # [1, N]
    stats = inputs["stats"].cpu()
    options = SamplerOptions(mode=mode, tau=tau, fn_tau=fn_tau)
    weights = log_weights(sim, inputs["positive_sim"][:1].cpu(), stats, options)[0]
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


def keeping(inputs: dict, share: float) -> dict:
    """The inputs with statistics whose cut-down keeps about ``share`` of the pairs (a quantile of their own
    similarities), the Bayesian branch on."""
    sims = inputs["anchors"].double() @ inputs["bank"].double().T
    threshold = torch.quantile(sims.flatten().cpu(), 1.0 - share).item()
    stats = [threshold + SamplerOptions().margin, 0.04, 0.0, 0.04, 500.0]
    return dict(inputs, stats=torch.tensor(stats, device=inputs["stats"].device))
