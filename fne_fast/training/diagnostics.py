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
                                   guide_exclusions, guide_similarities, race_log_weights, row_ceilings, safe_stats)
from fne_fast.ops.options import SamplerOptions
from fne_fast.sampling import distributed
from fne_fast.training.data import sampler_labels

__all__ = ["bank_diagnostics", "reduce_sums", "epoch_diagnostics", "SIM_EDGES", "LOG10_P_FN_EDGES", "TOP_SHARE"]

SIM_EDGES = [round(-1.0 + 0.025 * i, 3) for i in range(81)]  # similarity histogram bins over [-1, 1]
# log10 P_fn bins: the first bin also holds everything below -12 (P_fn underflows to 0 for easy candidates).
LOG10_P_FN_EDGES = [-12.0 + 0.5 * i for i in range(25)]
TOP_SHARE = 0.01  # "the top 1 % most similar candidates"
_SAMPLE_SEED = 20230  # the anchor sample is the same for every run on a data set, so runs compare row for row
_SUMS = ("anchors", "candidates", "race", "race_bayes", "candidates_bayes", "entropy", "drawing_anchors",
         "expected_fn", "top_fn", "top_slots")


def _race_log_weights(sim, positive_sim, anchor_ids, bank_ids, filled, stats, options: SamplerOptions, sampler,
                      fn_thresholds=None, guided_out=None):
    """(log-weights of the sampler's race, -inf outside it; non-positive mask). Mode "hardest" (and the in-batch
    sampler, which draws nothing from the bank) has no race: None."""
    non_positive = fallback_candidates(sim, anchor_ids, bank_ids, filled,
                                       row_ceilings(positive_sim, options, fn_thresholds), guided_out)
    if sampler == "inbatch-hardest" or options.mode == "hardest":
        return None, non_positive
    weights, race = race_log_weights(sim, positive_sim, stats, options, non_positive)
    return torch.where(race, weights, torch.full_like(weights, -math.inf)), non_positive


@torch.no_grad()
def bank_diagnostics(anchors: torch.Tensor, positive_sim: torch.Tensor, anchor_ids: torch.Tensor,
                     bank_features: torch.Tensor, bank_ids: torch.Tensor, filled: int, stats: torch.Tensor,
                     options: SamplerOptions, *, sampler: str = "fne", group_of_id: torch.Tensor | None = None,
                     sums: dict | None = None, chunk: int = 64, col_offset: int = 0, group=None,
                     fn_thresholds: torch.Tensor | None = None, anchor_guides: torch.Tensor | None = None,
                     bank_guides: torch.Tensor | None = None) -> dict:
    """Adds one direction's sums (device tensors) into ``sums`` and returns it; ``summarise`` turns them into
    numbers. ``anchors`` [A, D] against ``bank_features`` [N, D]; ``positive_sim`` [A]; ids, ``fn_thresholds``
    [A] (optional) and the guides (with ``options.guide_threshold``) as for the op.

    Sharded (``group`` of W > 1 ranks, each passing the same anchors, its shard of the bank, the shard's first row
    as ``col_offset`` and the whole bank's ``filled``): each rank adds its shard's part of the sums, and what
    depends on the whole bank — a draw's normalisation, the hardest candidate, the top 1 % — is combined across
    the ranks per chunk of anchors; ``reduce_sums`` then adds the ranks' sums."""
    device = anchors.device
    sums = sums if sums is not None else _zero_sums(device)
    once = 1.0 if distributed.rank(group) == 0 else 0.0  # whole-bank quantities: counted on one rank
    bank = bank_features.to(torch.float32)
    local_filled = min(max(filled - col_offset, 0), bank.shape[0])
    stats = stats.to(device=device, dtype=torch.float32)
    active = bayes_active(stats, options.min_count)
    has_model = gaussians_defined(stats)
    model_stats = safe_stats(stats, has_model).double()
    p_fn_threshold = 1.0 - options.fn_margin
    sim_edges = torch.tensor(SIM_EDGES, dtype=torch.float64, device=device)
    p_fn_edges = torch.tensor(LOG10_P_FN_EDGES, dtype=torch.float64, device=device)
    top = max(1, math.ceil(TOP_SHARE * filled))
    for start in range(0, anchors.shape[0], chunk):
        rows = slice(start, start + chunk)
        sim = anchors[rows].to(torch.float32) @ bank.T
        guided_out = None
        if options.guide_threshold is not None:
            guided_out = guide_exclusions(guide_similarities(anchor_guides[rows], bank_guides, torch.float32),
                                          options.guide_threshold)
        weights, non_positive = _race_log_weights(
            sim, positive_sim[rows].to(torch.float32), anchor_ids[rows], bank_ids, local_filled, stats, options,
            sampler, fn_thresholds[rows] if fn_thresholds is not None else None, guided_out)
        sim64 = sim.double()
        p_fn = false_negative_probability(sim64, model_stats, options.prior_k)
        likely_false = active & (p_fn > p_fn_threshold)
        sums["anchors"] += once * sim.shape[0]
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
        candidates = sim.masked_fill(~non_positive, -math.inf)
        if weights is not None:
            race = weights > -math.inf
            sums["race"] += race.sum()
            sums["race_bayes"] += (likely_false & race).sum()
            probability, log_total = _draw_probabilities(weights.double(), race, group)
            drawing = log_total > -math.inf
            # -Σ p log p with log p = ℓ - log Σ exp ℓ: each shard adds its members' terms.
            entropy = torch.where(race, probability * (log_total[:, None] - weights.double()), 0.0).sum(dim=1)
            sums["entropy"] += entropy.sum()
            sums["drawing_anchors"] += once * drawing.sum()
            sums["expected_fn"] += (probability * same_group).sum()
        elif sampler != "inbatch-hardest":  # mode "hardest": a point mass on the most similar non-positive
            hardest, index = candidates.max(dim=1)
            hardest_same = torch.gather(same_group, 1, index[:, None]).squeeze(1)
            hardest, hardest_same = _across_shards(torch.stack([hardest.double(), hardest_same.double()], dim=1),
                                                   group).unbind(-1)
            best, first = hardest.max(dim=0)  # ties: the lowest rank's, i.e. the lowest global column
            drawing = torch.isfinite(best)
            sums["drawing_anchors"] += once * drawing.sum()
            sums["expected_fn"] += once * ((hardest_same.gather(0, first[None]).squeeze(0) > 0) & drawing).sum()
        top_sim, top_index = candidates.topk(min(top, sim.shape[1]), dim=1)
        top_same = torch.gather(same_group, 1, top_index).double()
        if group is not None:  # the shards' top lists side by side, then the top of those
            padding = top - top_sim.shape[1]
            top_sim = _pad_columns(top_sim.double(), padding, -math.inf)
            top_same = _pad_columns(top_same, padding, 0.0)
            gathered = _across_shards(torch.stack([top_sim, top_same], dim=-1), group)
            merged = gathered.permute(1, 0, 2, 3).reshape(top_sim.shape[0], -1, 2)
            top_sim, order = merged[..., 0].topk(top, dim=1)
            top_same = torch.gather(merged[..., 1], 1, order)
        top_valid = torch.isfinite(top_sim)
        sums["top_fn"] += once * ((top_same > 0) & top_valid).sum()
        sums["top_slots"] += once * top_valid.sum()
    return sums


def _pad_columns(values: torch.Tensor, columns: int, fill: float) -> torch.Tensor:
    """``values`` [A, k] with ``columns`` more columns of ``fill``."""
    return torch.cat([values, values.new_full((values.shape[0], columns), fill)], dim=1)


def _across_shards(values: torch.Tensor, group) -> torch.Tensor:
    """Every rank's ``values`` (one shape on every rank) stacked in rank order, [W, ...]."""
    if distributed.world_size(group) == 1:
        return values[None]
    size = distributed.world_size(group)
    gathered = distributed.all_gather_rows(values, [values.shape[0]] * size, group, "diagnostics")
    return gathered.view(size, *values.shape)


def _draw_probabilities(weights: torch.Tensor, race: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """(p [A, N] of this shard's race members under the whole bank's normalisation, log Σ exp ℓ [A] over the whole
    bank's race, -inf for an anchor with no race anywhere)."""
    peak = -distributed.all_reduce(-weights.max(dim=1).values, group, "diagnostics", "min")
    centre = torch.where(torch.isfinite(peak), peak, 0.0)
    total = torch.where(race, torch.exp(weights - centre[:, None]), 0.0).sum(dim=1)
    log_total = centre + torch.log(distributed.all_reduce(total, group, "diagnostics"))
    probability = torch.where(race, torch.exp(weights - log_total[:, None]), 0.0)
    return probability, log_total


def reduce_sums(sums: dict, group) -> dict:
    """The ranks' sums added up (one all_reduce; the sums are unchanged for one process)."""
    if distributed.world_size(group) == 1:
        return sums
    flat = distributed.all_reduce(torch.cat([value.reshape(-1) for value in sums.values()]), group, "diagnostics")
    reduced, offset = {}, 0
    for name, value in sums.items():
        reduced[name] = flat[offset:offset + value.numel()].view(value.shape)
        offset += value.numel()
    return reduced


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
def epoch_diagnostics(heads, split, image_bank, text_bank, stats: torch.Tensor, options: SamplerOptions,
                      *, sampler: str, device, anchors: int = 256, oracle: bool = False, thresholds=None) -> dict:
    """Both directions' diagnostics for a fixed sample of ``anchors`` training pairs (the same pairs in every
    epoch and every run on the split): image anchors against the text bank, text anchors against the image bank
    (``MemoryBank``s; collective when they are sharded: every rank scores its own rows and gets the result).
    Positives are scored against the momentum keys, as in the loss; ``oracle``: the banks hold semantic groups
    as identities (``fne_fast.training.data.sampler_labels``); ``thresholds``: the run's GloFND tables (image
    anchors', text anchors'), whose current thresholds exclude as in training."""
    generator = torch.Generator().manual_seed(_SAMPLE_SEED)
    captions = torch.randperm(split.text_features.shape[0], generator=generator)[:anchors]
    identity_of_caption, group_of_id = sampler_labels(split, oracle)
    ids = identity_of_caption[captions].to(device)
    image_features = split.image_features[split.caption_image[captions]].to(device)
    text_features = split.text_features[captions].to(device)
    image, text, image_key, text_key = heads(image_features, text_features)
    guided = options.guide_threshold is not None
    guides = torch.nn.functional.normalize(text_features, dim=1) if guided else None  # as the training step's
    group_of_id = group_of_id.to(device) if group_of_id is not None else None
    sums = None
    tables = thresholds or (None, None)
    for anchor, positive_key, bank, table in ((image, text_key, text_bank, tables[0]),
                                              (text, image_key, image_bank, tables[1])):
        sums = bank_diagnostics(anchor, (anchor * positive_key).sum(dim=1), ids, bank.features.to(device),
                                bank.ids.to(device), bank.filled, stats, options, sampler=sampler,
                                group_of_id=group_of_id, sums=sums, col_offset=bank.row_begin, group=bank.group,
                                fn_thresholds=table.lookup(ids, stats) if table is not None else None,
                                # the anchors' guides rounded to the bank's dtype, as MemoryBank.sample passes them
                                anchor_guides=guides.to(bank.dtype) if guided else None,
                                bank_guides=bank.guides.to(device) if guided else None)
    return summarise(reduce_sums(sums, image_bank.group), sampler=sampler, has_groups=group_of_id is not None)
