"""Paired statistics of two samplers' recalls: is a difference in rsum beyond the noise?

Two arms trained with the same seed share their initialisation and their batches, so their difference per seed is
paired. Two sources of noise hide a real difference, and each gets its own test:

* training noise, from seed to seed: a paired t-test of the per-seed differences (n − 1 degrees of freedom);
* test-set noise, from the finite test split: a paired bootstrap over test items — images are resampled with
  replacement, each with its captions, the same resamples for both arms and every seed, and the mean difference
  over seeds is recomputed for each resample.

A difference is called "beyond noise" only when both agree at the chosen level (the t-test's p below 1 − level
and the bootstrap interval excluding 0); otherwise "within noise". With one seed only the test-set noise can be
assessed, and the verdict says so. A swap test's accuracy is compared the same way, its bootstrap resampling the
swapped captions (``paired_accuracy``).
"""

from __future__ import annotations

import math

import torch

from fne_fast.training.evaluate import RECALL_KS

__all__ = ["rsum_item_scores", "paired_comparison", "paired_accuracy", "student_t_two_sided_p", "WITHIN_NOISE", "BEYOND_NOISE"]

WITHIN_NOISE = "within noise"
BEYOND_NOISE = "beyond noise"


def student_t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with an integer ``df`` >= 1, from the closed forms of the distribution
    function for integer degrees of freedom (finite sums in θ = atan(|t| / √df))."""
    if df < 1 or int(df) != df:
        raise ValueError(f"df must be an integer >= 1, got {df}")
    if math.isinf(t):
        return 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    sin, cos = math.sin(theta), math.cos(theta)
    if df % 2 == 1:
        series, term = 0.0, cos
        for j in range(1, (df - 1) // 2 + 1):  # cos + (2/3) cos³ + (2·4)/(3·5) cos⁵ + ... up to cos^(df-2)
            series += term
            term *= cos * cos * (2 * j) / (2 * j + 1)
        inside = 2.0 / math.pi * (theta + sin * series) if df > 1 else 2.0 * theta / math.pi
    else:
        series, term = 0.0, 1.0
        for j in range(1, df // 2 + 1):  # 1 + (1/2) cos² + (1·3)/(2·4) cos⁴ + ... up to cos^(df-2)
            series += term
            term *= cos * cos * (2 * j - 1) / (2 * j)
        inside = sin * series
    return min(1.0, max(0.0, 1.0 - inside))


def rsum_item_scores(ranks: dict[str, torch.Tensor], caption_image: torch.Tensor, *, group: bool = False):
    """Per-image terms of rsum: (hits of the image as an i2t anchor, summed over k = 1, 5, 10; the same summed over
    its captions as t2i anchors; its number of captions), float64 [I] each. rsum over images weighted by w is
    ``100 (Σ w·a / Σ w + Σ w·b / Σ w·c)``."""
    suffix = "_group" if group else ""
    image_ranks, caption_ranks = ranks["i2t" + suffix], ranks["t2i" + suffix]
    image_hits = sum((image_ranks < k).double() for k in RECALL_KS)
    caption_hits = sum((caption_ranks < k).double() for k in RECALL_KS)
    num_images = image_ranks.shape[0]
    per_image = torch.zeros(num_images, dtype=torch.float64).index_add_(0, caption_image, caption_hits)
    captions = torch.bincount(caption_image, minlength=num_images).double()
    return image_hits, per_image, captions


def _weighted_rsum(weights: torch.Tensor, scores) -> torch.Tensor:
    """rsum under image weights [R, I] for the scores of ``rsum_item_scores``: [R]."""
    image_hits, caption_hits, captions = scores
    return 100.0 * (weights @ image_hits / weights.sum(dim=1) + weights @ caption_hits / (weights @ captions))


def paired_comparison(arm: list[dict], baseline: list[dict], caption_image: torch.Tensor, *, group: bool = False,
                      replicates: int = 2000, level: float = 0.95, seed: int = 0, chunk: int = 100) -> dict:
    """Compares one arm's test ranks with the baseline's, seed by seed (``arm[s]`` and ``baseline[s]`` are the
    ranks of the same seed, as ``fne_fast.training.evaluate.retrieval_ranks`` returns them). Returns the per-seed
    differences of rsum (``group``: group rsum), their mean, the t-test's p, the bootstrap interval of the mean
    difference and the verdict."""
    if len(arm) != len(baseline) or not arm:
        raise ValueError(f"need the same, non-zero number of seeds on both sides, got {len(arm)} and {len(baseline)}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    caption_image = caption_image.to(torch.int64).cpu()
    arm_scores = [rsum_item_scores(ranks, caption_image, group=group) for ranks in arm]
    base_scores = [rsum_item_scores(ranks, caption_image, group=group) for ranks in baseline]
    num_images = arm_scores[0][0].shape[0]
    ones = torch.ones(1, num_images, dtype=torch.float64)
    differences = [(_weighted_rsum(ones, a) - _weighted_rsum(ones, b)).item() for a, b in zip(arm_scores, base_scores)]
    generator = torch.Generator().manual_seed(seed)
    resampled = []
    for start in range(0, replicates, chunk):
        rows = min(chunk, replicates - start)
        picks = torch.randint(num_images, (rows, num_images), generator=generator)
        weights = torch.zeros(rows, num_images, dtype=torch.float64).scatter_add_(
            1, picks, torch.ones(rows, num_images, dtype=torch.float64))
        per_seed = [_weighted_rsum(weights, a) - _weighted_rsum(weights, b) for a, b in zip(arm_scores, base_scores)]
        resampled.append(torch.stack(per_seed).mean(dim=0))
    return _verdict("group_rsum" if group else "rsum", differences, torch.cat(resampled), level, replicates)


def paired_accuracy(arm: list[torch.Tensor], baseline: list[torch.Tensor], metric: str, *, replicates: int = 2000,
                    level: float = 0.95, seed: int = 0, chunk: int = 100) -> dict:
    """The same test for an accuracy in percent over fixed trials (a swap test's): ``arm[s]``, ``baseline[s]``
    [S] bool, whether each trial was won at seed s; the bootstrap resamples the trials."""
    if len(arm) != len(baseline) or not arm:
        raise ValueError(f"need the same, non-zero number of seeds on both sides, got {len(arm)} and {len(baseline)}")
    if any(won.shape != arm[0].shape for won in (*arm, *baseline)) or arm[0].numel() == 0:
        raise ValueError(f"need the same, non-empty trials for every run, got shapes "
                         f"{[tuple(won.shape) for won in (*arm, *baseline)]}")
    trials = arm[0].numel()
    gaps = torch.stack([100.0 * (a.double() - b.double()) for a, b in zip(arm, baseline)])  # [seeds, S]
    differences = gaps.mean(dim=1).tolist()
    generator = torch.Generator().manual_seed(seed)
    resampled = []
    for start in range(0, replicates, chunk):
        rows = min(chunk, replicates - start)
        picks = torch.randint(trials, (rows, trials), generator=generator)
        resampled.append(gaps.mean(dim=0)[picks].mean(dim=1))
    return _verdict(metric, differences, torch.cat(resampled), level, replicates)


def _verdict(metric: str, differences: list[float], resampled: torch.Tensor, level: float, replicates: int) -> dict:
    """The t-test over the per-seed differences, the bootstrap interval of their mean, and the verdict."""
    mean = sum(differences) / len(differences)
    p_value = None
    if len(differences) > 1:
        spread = math.sqrt(sum((d - mean) ** 2 for d in differences) / (len(differences) - 1))
        if spread == 0.0:  # identical differences: no evidence when they are all 0, certainty otherwise
            p_value = 1.0 if mean == 0.0 else 0.0
        else:
            p_value = student_t_two_sided_p(mean / (spread / math.sqrt(len(differences))), len(differences) - 1)
    tail = (1.0 - level) / 2
    low, high = torch.quantile(resampled, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    bootstrap_excludes_zero = low > 0.0 or high < 0.0
    if p_value is None:
        verdict = f"{BEYOND_NOISE} of the test set (one seed)" if bootstrap_excludes_zero else WITHIN_NOISE
    else:
        verdict = BEYOND_NOISE if bootstrap_excludes_zero and p_value < 1.0 - level else WITHIN_NOISE
    return {"metric": metric, "per_seed": differences, "mean": mean, "t_test_p": p_value,
            "bootstrap_interval": [low, high], "level": level, "replicates": replicates, "verdict": verdict}
