"""What the sampler sees in the whole bank, once per epoch, for a fixed sample of anchors.

The per-step diagnostics of ``FNELoss`` describe only the negatives that were chosen. These describe every
candidate of the bank for a sample of training anchors, with the epoch's final running statistics:

* the distribution of P_fn over the bank, for candidates in the anchor's semantic group (the false negatives the
  method should find) and for the others — a histogram of log10 P_fn;
* the share of candidates where the Bayesian branch changes the weight (over the race, i.e. non-positive,
  filled and above the cut-down, and over all non-positive candidates);
* the sampling distribution of the run's sampler over the race: its entropy (nats), the share of anchors with
  no candidate (which fall back to the hardest negative), and its expected false-negative rate Σ p_j·[same
  group] — the exact FN rate of the sampler's own draws for these anchors;
* the FN rate among the top 1 % most similar candidates: how many false negatives there are to eliminate;
* similarity histograms of same-group and other candidates, for the per-epoch P_fn plot.

It runs on the device in chunks of anchors and reads the results to the host once, at the end of an epoch, so
training steps never wait for it. The race's masks and weights are the reference oracle's
(``fne_fast.ops.fne_math.race_log_weights``, docs/DESIGN.md §1).
"""

from __future__ import annotations

import math

import torch

from fne_fast.ops.fne_math import (bayes_active, fallback_candidates, false_negative_probability, gaussians_defined,
                                   race_log_weights, safe_stats)
from fne_fast.ops.options import SamplerOptions

__all__ = ["bank_diagnostics", "epoch_diagnostics", "SIM_EDGES", "LOG10_P_FN_EDGES", "TOP_SHARE"]

SIM_EDGES = [round(-1.0 + 0.025 * i, 3) for i in range(81)]  # similarity histogram bins over [-1, 1]
# log10 P_fn bins: the first bin also holds everything below -12 (P_fn underflows to 0 for easy candidates).
LOG10_P_FN_EDGES = [-12.0 + 0.5 * i for i in range(25)]
TOP_SHARE = 0.01  # "the top 1 % most similar candidates"
_SAMPLE_SEED = 20230  # the anchor sample is the same for every run on a data set, so runs compare row for row
_SUMS = ("anchors", "candidates", "race", "race_bayes", "candidates_bayes", "entropy", "drawing_anchors",
         "expected_fn", "top_fn", "top_slots")


def _race_log_weights(sim, positive_sim, anchor_ids, bank_ids, filled, stats, options: SamplerOptions, sampler):
    """(log-weights of the sampler's race, -inf outside it; non-positive mask). Mode "hardest" (and the in-batch
    sampler, which draws nothing from the bank) has no race: None."""
    non_positive = fallback_candidates(sim, anchor_ids, bank_ids, filled)
    if sampler == "inbatch-hardest" or options.mode == "hardest":
        return None, non_positive
    weights, race = race_log_weights(sim, positive_sim, stats, options, non_positive)
    return torch.where(race, weights, torch.full_like(weights, -math.inf)), non_positive


@torch.no_grad()
def bank_diagnostics(anchors: torch.Tensor, positive_sim: torch.Tensor, anchor_ids: torch.Tensor,
                     bank_features: torch.Tensor, bank_ids: torch.Tensor, filled: int, stats: torch.Tensor,
                     options: SamplerOptions, *, sampler: str = "fne", group_of_id: torch.Tensor | None = None,
                     sums: dict | None = None, chunk: int = 64) -> dict:
    """Adds one direction's sums (device tensors) into ``sums`` and returns it; ``summarise`` turns them into
    numbers. ``anchors`` [A, D] against ``bank_features`` [N, D]; ``positive_sim`` [A]; ids as for the op."""
    device = anchors.device
    sums = sums if sums is not None else _zero_sums(device)
    bank = bank_features.to(torch.float32)
    stats = stats.to(device=device, dtype=torch.float32)
    active = bayes_active(stats, options.min_count)
    has_model = gaussians_defined(stats)
    model_stats = safe_stats(stats, has_model).double()
    p_fn_threshold = 1.0 - options.fn_margin
    sim_edges = torch.tensor(SIM_EDGES, dtype=torch.float64, device=device)
    p_fn_edges = torch.tensor(LOG10_P_FN_EDGES, dtype=torch.float64, device=device)
    for start in range(0, anchors.shape[0], chunk):
        rows = slice(start, start + chunk)
        sim = anchors[rows].to(torch.float32) @ bank.T
        weights, non_positive = _race_log_weights(sim, positive_sim[rows].to(torch.float32), anchor_ids[rows],
                                                  bank_ids, filled, stats, options, sampler)
        sim64 = sim.double()
        p_fn = false_negative_probability(sim64, model_stats, options.prior_k)
        likely_false = active & (p_fn > p_fn_threshold)
        sums["anchors"] += sim.shape[0]
        sums["candidates"] += non_positive.sum()
        sums["candidates_bayes"] += (likely_false & non_positive).sum()
        if group_of_id is not None:
            same_group = (group_of_id[bank_ids.clamp(min=0)][None, :] == group_of_id[anchor_ids[rows]][:, None])
        else:
            same_group = torch.zeros_like(non_positive)
        for name, members in (("same_group", non_positive & same_group), ("other", non_positive & ~same_group)):
            sums[f"sim_hist_{name}"] += _histogram(sim64[members], sim_edges)
            log_p = torch.log10(p_fn[members].clamp(min=1e-300)).clamp(min=LOG10_P_FN_EDGES[0])
            sums[f"p_fn_hist_{name}"] += torch.where(has_model, _histogram(log_p, p_fn_edges), 0.0)
        if weights is not None:
            race = weights > -math.inf
            sums["race"] += race.sum()
            sums["race_bayes"] += (likely_false & race).sum()
            drawing = race.any(dim=1)
            probability = torch.softmax(weights.double().masked_fill(~drawing[:, None], 0.0), dim=1)
            probability = torch.where(race, probability, torch.zeros_like(probability))
            entropy = -(probability * torch.log(probability.clamp(min=1e-300))).sum(dim=1)
            sums["entropy"] += torch.where(drawing, entropy, torch.zeros_like(entropy)).sum()
            sums["drawing_anchors"] += drawing.sum()
            sums["expected_fn"] += (probability * same_group).sum()
        elif sampler != "inbatch-hardest":  # mode "hardest": a point mass on the most similar non-positive
            hardest = sim.masked_fill(~non_positive, -math.inf).argmax(dim=1, keepdim=True)
            drawing = non_positive.any(dim=1)
            sums["drawing_anchors"] += drawing.sum()
            sums["expected_fn"] += (torch.gather(same_group, 1, hardest).squeeze(1) & drawing).sum()
        top = max(1, math.ceil(TOP_SHARE * filled))
        top_sim, top_index = sim.masked_fill(~non_positive, -math.inf).topk(min(top, sim.shape[1]), dim=1)
        top_valid = torch.isfinite(top_sim)
        sums["top_fn"] += (torch.gather(same_group, 1, top_index) & top_valid).sum()
        sums["top_slots"] += top_valid.sum()
    return sums


def _histogram(values: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Counts of ``values`` in the bins of ``edges`` (values beyond the ends go to the end bins), float64."""
    index = (torch.bucketize(values, edges, right=True) - 1).clamp(0, edges.numel() - 2)
    return torch.bincount(index, minlength=edges.numel() - 1).to(torch.float64)


def _zero_sums(device) -> dict:
    sums = {name: torch.zeros((), dtype=torch.float64, device=device) for name in _SUMS}
    for name in ("same_group", "other"):
        sums[f"sim_hist_{name}"] = torch.zeros(len(SIM_EDGES) - 1, dtype=torch.float64, device=device)
        sums[f"p_fn_hist_{name}"] = torch.zeros(len(LOG10_P_FN_EDGES) - 1, dtype=torch.float64, device=device)
    return sums


def summarise(sums: dict, *, sampler: str, has_groups: bool) -> dict:
    """The sums as plain numbers (one host synchronisation); rates in [0, 1], None where undefined."""
    flat = torch.cat([value.reshape(-1) for value in sums.values()]).tolist()  # all float64 on one device
    values, offset = {}, 0
    for name, value in sums.items():
        values[name] = flat[offset] if value.dim() == 0 else flat[offset:offset + value.numel()]
        offset += value.numel()

    def ratio(numerator, denominator):
        return values[numerator] / values[denominator] if values[denominator] else None

    p_fn_same, p_fn_other = values["p_fn_hist_same_group"], values["p_fn_hist_other"]
    draws = sampler != "inbatch-hardest"
    races = draws and sampler != "hardest"  # mode "hardest" picks its negative without a race
    return {
        "anchors": int(values["anchors"]),
        "candidates_per_anchor": ratio("candidates", "anchors"),
        "race_per_anchor": ratio("race", "anchors") if races else None,
        "bayes_share_race": ratio("race_bayes", "race") if races else None,
        "bayes_share_all": ratio("candidates_bayes", "candidates"),
        "entropy": ratio("entropy", "drawing_anchors") if draws else None,
        "fallback_share": (1.0 - values["drawing_anchors"] / values["anchors"]) if draws and values["anchors"]
        else None,
        "expected_fn_rate": ratio("expected_fn", "drawing_anchors") if draws and has_groups else None,
        "top1pct_fn_rate": ratio("top_fn", "top_slots") if has_groups else None,
        "same_group_share": (sum(values["sim_hist_same_group"]) / values["candidates"]
                             if has_groups and values["candidates"] else None),
        "sim_hist_same_group": values["sim_hist_same_group"] if has_groups else None,
        "sim_hist_other": values["sim_hist_other"],
        "p_fn_hist_same_group": p_fn_same if has_groups and sum(p_fn_same) else None,
        "p_fn_hist_other": p_fn_other if sum(p_fn_other) else None,
    }


@torch.no_grad()
def epoch_diagnostics(heads, split, image_bank: dict, text_bank: dict, stats: torch.Tensor, options: SamplerOptions,
                      *, sampler: str, device, anchors: int = 256) -> dict:
    """Both directions' diagnostics for a fixed sample of ``anchors`` training pairs (the same pairs in every
    epoch and every run on the split): image anchors against the text bank, text anchors against the image bank.
    The banks are whole-bank states (``MemoryBank.state_dict()``: features, ids, filled). Positives are scored
    against the momentum keys, as in the loss."""
    generator = torch.Generator().manual_seed(_SAMPLE_SEED)
    captions = torch.randperm(split.text_features.shape[0], generator=generator)[:anchors]
    ids = split.caption_image[captions].to(device)
    image_features = split.image_features[split.caption_image[captions]].to(device)
    text_features = split.text_features[captions].to(device)
    image, text, image_key, text_key = heads(image_features, text_features)
    group_of_id = split.image_group.to(device) if split.image_group is not None else None
    sums = None
    for anchor, positive_key, bank in ((image, text_key, text_bank), (text, image_key, image_bank)):
        sums = bank_diagnostics(anchor, (anchor * positive_key).sum(dim=1), ids, bank["features"].to(device),
                                bank["ids"].to(device), bank["filled"], stats, options, sampler=sampler,
                                group_of_id=group_of_id, sums=sums)
    return summarise(sums, sampler=sampler, has_groups=group_of_id is not None)
