"""FNELoss: the bidirectional triplet loss with negatives sampled from momentum memory banks (docs/DESIGN.md §1, §3).

Image anchors are matched against the text bank and text anchors against the image bank. The fused op selects
the negatives without gradients; the loss then gathers the chosen bank rows and recomputes their similarities
with autograd, so only the gather and the hinge are differentiated. Positives are scored against the momentum
keys (``s⁺ = <anchor, key>``), as in the authors' code. In the warm-up epoch, and throughout in mode
``inbatch-hardest``, the loss is VSE++'s in-batch max violation between online embeddings instead.

With a process group (docs/DESIGN.md §3.1) the loss is that of the global batch (every rank's pairs, in rank order):
the running statistics and the in-batch loss use the gathered batch, the banks are sharded and sample for the
global anchor rows. Each rank returns ``world_size`` times the part of the global loss its own embeddings'
gradients come from, so that DDP's averaging of the ranks' gradients gives the global loss's gradient: a run
with W processes of batch B takes the steps of one process with batch W·B. With ``batch_invariant`` (fine-tuned
runs, ``fne_fast.training.units``) the shares are not scaled, the ranks' gradients are summed, and each row's
gradient is one process's to the bit.
"""

from __future__ import annotations

import torch
from torch import nn

from fne_fast.ops import SamplerOptions
from fne_fast.ops.fne_math import bayes_active, false_negative_probability, row_ceilings, safe_stats
from fne_fast.sampling.bank import MemoryBank
from fne_fast.sampling.distributed import GlobalBatch, gather_batch
from fne_fast.sampling.stats import RunningStats
from fne_fast.sampling.thresholds import ThresholdTable

__all__ = ["FNELoss", "SAMPLERS", "STEP_SUMS", "sampler_mode"]

SAMPLERS = ("fne", "hardest", "uniform", "inbatch-hardest")
# Per-step sums, kept on the device; a trainer adds them up (and over the ranks) and divides once per epoch (no
# sync per step). "loss" is this rank's share of the global batch's loss: the ranks' shares add up to it.
STEP_SUMS = ("loss", "slots", "fallback", "p_fn_sum", "p_fn_slots", "false_negatives", "group_slots",
             "sampled_false_negatives", "sampled_group_slots", "threshold_sum", "above_share_sum", "threshold_rows",
             "attracted", "attract_rows")
# Decorrelates the two directions' Gumbel noise, which would otherwise share (row, column, step) counters.
_TEXT_TO_IMAGE_SEED_OFFSET = 0x9E3779B97F4A7C15


def sampler_mode(sampler: str) -> str:
    """The op's mode for a bank sampler (``inbatch-hardest`` samples nothing from the bank: mode "hardest" is
    its nominal value)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    return "hardest" if sampler == "inbatch-hardest" else sampler


class FNELoss(nn.Module):
    """Loss and diagnostics of one batch; owns the running similarity statistics (reset each epoch).

    ``options`` are the op's (its ``mode`` is set from ``sampler``); ``margin`` is also the hinge's (the cut-down's
    unless ``cut_margin`` is set). With k > 1 each anchor's hinge is the mean over its valid slots.
    ``inbatch_weight``: a bank sampler's loss adds VSE++'s in-batch max violation with this weight (0, the
    default: the bank term alone; both terms at once, as in-batch max violation and the bank each give signal the
    other lacks). ``group``:
    the process group the batch is split over (None: this process's batch is the whole batch). ``agree_each_step``
    (default): each sharded sample first checks that the ranks agree on sizes, options and statistics (a host
    synchronisation each); a training loop that guarantees them (the same settings on every rank, checked once)
    turns it off, and the samples take the batch's counts. ``batch_invariant``: each rank's loss is the part
    whose gradient, summed (not averaged) over the ranks, is the global loss's, and each row's gradient is
    computed as one process computes it, to the bit, however the global batch is split: the in-batch term is the
    whole G × G matrix's on every rank (G² · D multiply-adds per rank instead of B · G · D)."""

    def __init__(self, sampler: str = "fne", options: SamplerOptions = SamplerOptions(), *, seed: int = 0,
                 stats_momentum: float | None = None, backend: str = "auto", device: torch.device | str = "cpu",
                 group=None, agree_each_step: bool = True, inbatch_weight: float = 0.0,
                 thresholds: tuple[ThresholdTable, ThresholdTable] | None = None, attract_weight: float = 0.0,
                 attract_k: int = 1, batch_invariant: bool = False):
        super().__init__()
        self.batch_invariant = bool(batch_invariant)
        if not (inbatch_weight >= 0 and inbatch_weight < float("inf")):
            raise ValueError(f"inbatch_weight must be finite and >= 0, got {inbatch_weight!r}")
        self.sampler, self.inbatch_weight = sampler, float(inbatch_weight)
        self.options = options.replace(mode=sampler_mode(sampler))
        self.backend, self.seed, self.group, self.agree_each_step = backend, seed, group, agree_each_step
        self.stats = RunningStats(device, stats_momentum)
        if thresholds is not None and (len(thresholds) != 2
                                       or not all(isinstance(t, ThresholdTable) for t in thresholds)):
            raise ValueError("thresholds must be two ThresholdTables (image anchors', text anchors') or None")
        self.thresholds = thresholds
        if not (attract_weight >= 0 and attract_weight < float("inf")):
            raise ValueError(f"attract_weight must be finite and >= 0, got {attract_weight!r}")
        if not (isinstance(attract_k, int) and attract_k >= 1):
            raise ValueError(f"attract_k must be an integer >= 1, got {attract_k!r}")
        if attract_weight and options.relative_cut is None and thresholds is None:
            raise ValueError("attract_weight attracts the candidates a false-negative criterion excludes: set "
                             "options.relative_cut or thresholds")
        self.attract_weight = float(attract_weight)
        # The detector: the anchor's most similar non-positive candidates, with no criterion of its own.
        self._detector = self.options.replace(mode="hardest", k=attract_k, relative_cut=None, guide_threshold=None)

    def forward(self, image: torch.Tensor, text: torch.Tensor, image_key: torch.Tensor, text_key: torch.Tensor,
                ids: torch.Tensor, *, image_bank: MemoryBank | None = None, text_bank: MemoryBank | None = None,
                step: int = 0, warmup: bool = False, group_of_id: torch.Tensor | None = None,
                update_stats: bool = True, batch: GlobalBatch | None = None, guides: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``image``, ``text``: online embeddings [B, D] of this rank's pairs; ``image_key``, ``text_key``: their
        momentum keys; ``ids`` [B]: the image identity of each pair (pairs with one id are positives of each
        other). The banks must already hold this step's keys (enqueue first). ``group_of_id`` maps an identity
        to its semantic group, for the false-negative rate. ``batch``: the global batch of these embeddings
        (``fne_fast.sampling.distributed.gather_batch``), gathered here when not given. ``guides`` [B, Dg]: the
        pairs' guide embeddings, needed with ``options.guide_threshold`` (language guidance: both directions'
        anchors are guided by their pair's caption, against banks built with guides). Returns (the loss to
        differentiate, per-step diagnostic sums)."""
        if batch is None:
            batch = gather_batch(image, text, ids, self.group)
        if update_stats:
            self.stats.update_batch(batch)
        stats = self.stats.as_tensor()
        if warmup or self.sampler == "inbatch-hardest":
            return self._in_batch(batch, stats, group_of_id)
        if image_bank is None or text_bank is None:
            raise ValueError(f"sampler {self.sampler!r} needs image_bank and text_bank outside the warm-up")
        if (guides is None) != (self.options.guide_threshold is None):
            raise ValueError("guides must be given exactly when options.guide_threshold is set (language guidance)")
        diagnostics = _zero_diagnostics(image.device)
        image_table, text_table = self.thresholds or (None, None)
        loss_image_to_text = self._bank_direction(image, text_key, ids, text_bank, stats, self.seed, step,
                                                  group_of_id, diagnostics, batch, image_table, guides)
        loss_text_to_image = self._bank_direction(text, image_key, ids, image_bank, stats,
                                                  self.seed + _TEXT_TO_IMAGE_SEED_OFFSET, step, group_of_id,
                                                  diagnostics, batch, text_table, guides)
        loss = loss_image_to_text + loss_text_to_image
        if self.inbatch_weight:
            # The diagnostics stay the bank's draws'; the in-batch term only adds to the loss.
            in_batch, in_batch_sums = self._in_batch(batch, stats, group_of_id, record_choices=False)
            loss = loss + self.inbatch_weight * in_batch
            diagnostics["loss"] += self.inbatch_weight * in_batch_sums["loss"]
        return loss, diagnostics

    def _bank_direction(self, anchors, positive_keys, ids, bank: MemoryBank, stats, seed, step, group_of_id,
                        diagnostics, batch: GlobalBatch, table: ThresholdTable | None,
                        guides: torch.Tensor | None) -> torch.Tensor:
        positive_sim = (anchors * positive_keys.to(anchors.dtype)).sum(dim=1)
        thresholds = table.lookup(ids, stats) if table is not None else None
        # Selection runs in the bank's storage dtype whatever the anchors' (float64 in gradient checks): it is not
        # differentiated, and the hinge below recomputes the chosen similarities in the anchors' dtype. With a
        # bf16 bank the bank rounds the anchors to bf16 too (MemoryBank.sample), so that the op takes its bf16 GEMM.
        draw = bank.sample(anchors.detach(), positive_sim.detach().float(), ids, stats, self.options, seed=seed,
                           step=step, backend=self.backend, fn_thresholds=thresholds, count_above=table is not None,
                           counts=None if self.agree_each_step or batch.world_size == 1 else list(batch.counts),
                           anchor_guides=guides)
        if table is not None:
            # Every rank applies the global batch's step, so that the ranks' tables stay equal.
            used = thresholds if batch.world_size == 1 else table.lookup(batch.ids, stats)
            table.update(batch.ids, used, batch.gather(draw.above), bank.filled)
            # (the anchors whose threshold is set: +inf ones, before the statistics define it, exclude nothing)
            finite = thresholds.isfinite()
            diagnostics["threshold_sum"] += torch.where(finite, thresholds, 0).double().sum()
            diagnostics["above_share_sum"] += (draw.above * finite).double().sum() / max(bank.filled, 1)
            diagnostics["threshold_rows"] += finite.sum()
        valid = draw.valid
        negative_sim = torch.einsum("bd,bkd->bk", anchors, draw.rows.to(anchors.dtype))
        weight = valid.to(anchors.dtype)
        hinge = (self.options.margin + negative_sim - positive_sim.unsqueeze(1)).clamp(min=0) * weight
        # This rank's anchors' part of the mean over the global batch's anchors.
        share = (hinge.sum(dim=1) / weight.sum(dim=1).clamp(min=1)).sum() / max(batch.size, 1)
        if self.attract_weight:
            share = share + self._attraction(anchors, positive_sim, ids, bank, stats, step, thresholds,
                                             negative_sim, valid, batch, diagnostics)
        diagnostics["loss"] += share.detach()

        # A fallback slot (no candidate left in the race: all cut down or of weight 0) has key -inf.
        fell_back = valid & ~torch.isfinite(draw.key) if self.sampler != "hardest" else torch.zeros_like(valid)
        diagnostics["fallback"] += fell_back.sum()
        _add_choice_diagnostics(diagnostics, draw.sim, valid, ids, draw.ids, stats, self.options, group_of_id,
                                sampled=valid & ~fell_back)
        return share if self.batch_invariant else share * batch.world_size

    def _attraction(self, anchors, positive_sim, ids, bank: MemoryBank, stats, step, thresholds, negative_sim,
                    valid, batch: GlobalBatch, diagnostics) -> torch.Tensor:
        """FNC's attraction as a triplet term: each detected false negative d of an anchor (one of its
        ``attract_k`` most similar non-positive candidates, above its ceiling) is a positive against each of the
        anchor's drawn negatives n, ``attract_weight · mean [margin + s_n − s_d]_+``; this rank's share of the
        global batch's mean. One more pass of the op (mode "hardest", which draws no random numbers)."""
        detect = bank.sample(anchors.detach(), positive_sim.detach().float(), ids, stats, self._detector, step=step,
                             backend=self.backend,
                             counts=None if self.agree_each_step or batch.world_size == 1 else list(batch.counts))
        ceilings = row_ceilings(positive_sim.detach().float(), self.options, thresholds)
        detected = detect.valid & (detect.sim > ceilings.unsqueeze(1))
        attracted_sim = torch.einsum("bd,bmd->bm", anchors, detect.rows.to(anchors.dtype))
        violation = (self.options.margin + negative_sim.unsqueeze(1) - attracted_sim.unsqueeze(2)).clamp(min=0)
        pairs = (detected.unsqueeze(2) & valid.unsqueeze(1)).to(anchors.dtype)  # [B, attract_k, k]
        per_anchor = (violation * pairs).sum(dim=(1, 2)) / pairs.sum(dim=(1, 2)).clamp(min=1)
        diagnostics["attracted"] += detected.sum()
        diagnostics["attract_rows"] += detected.shape[0]
        return self.attract_weight * per_anchor.sum() / max(batch.size, 1)

    def _in_batch(self, batch: GlobalBatch, stats, group_of_id, record_choices: bool = True):
        """VSE++ max violation within the global batch, both directions; other pairs of the same image are
        masked. Each rank scores its own anchors from its rows (image anchors) and columns (text anchors) of the
        in-batch matrix, never the whole G × G matrix; a negative chosen from another rank's pairs gets its
        gradient on that rank (``_gradients_of_chosen_negatives``). With ``batch_invariant`` every rank scores the
        whole matrix as one process does instead, its rows' gradients reaching it alone. Diagnostics count this
        rank's anchors (the choices' only with ``record_choices``)."""
        whole = self.batch_invariant and batch.world_size > 1
        scored = GlobalBatch(batch.image, batch.text, batch.ids, (batch.size,)) if whole else batch
        mine = batch.local if whole else slice(None)  # this rank's anchors among the scored ones
        diagnostics = _zero_diagnostics(batch.ids.device)
        rows, columns = scored.similarity_blocks()
        local, ids = scored.local, scored.ids
        anchors = torch.arange(scored.local_size, device=ids.device)
        same_identity = ids[local].unsqueeze(1) == ids.unsqueeze(0)  # [B, G]: the scored anchors × every pair
        total, own = rows.new_zeros(()), rows.new_zeros(())
        choices = []
        for sim, masked in ((rows, rows.masked_fill(same_identity, float("-inf"))),
                            (columns.T, columns.T.masked_fill(same_identity, float("-inf")))):
            negative_sim, chosen = masked.max(dim=1)
            positive = sim[anchors, anchors + scored.offset]
            valid = torch.isfinite(negative_sim)
            violation = self.options.margin + negative_sim - positive
            hinge = torch.where(valid, violation.clamp(min=0), torch.zeros_like(violation))
            # The scored anchors' part of the mean over the global batch (with one process: the mean itself).
            part = hinge.mean() * (scored.local_size / scored.size) if scored.local_size else hinge.sum()
            total = total + part
            if whole:
                own = own + hinge[mine].sum() / batch.size
            choices.append((chosen, valid & (violation >= 0)))  # where clamp passes the gradient on
            if record_choices:
                _add_choice_diagnostics(diagnostics, negative_sim[mine].detach().float().unsqueeze(1),
                                        valid[mine].unsqueeze(1), batch.ids[batch.local],
                                        ids[chosen[mine]].unsqueeze(1), stats, self.options, group_of_id)
        diagnostics["loss"] += (own if whole else total).detach()
        if whole:
            return total, diagnostics
        if batch.world_size > 1:
            total = total + _gradients_of_chosen_negatives(batch, choices)
        return total * batch.world_size, diagnostics


def _gradients_of_chosen_negatives(batch: GlobalBatch, choices) -> torch.Tensor:
    """Terms whose value is 0 and whose gradient is what the global in-batch loss sends into this rank's
    embeddings when other ranks' anchors chose them as negatives: an active hinge of anchor a with negative n
    adds s(a, n) / G, whose gradient reaches n's embedding only on n's rank. Every rank learns each anchor's
    choice (its index and whether its hinge is active) in one small gather."""
    (text_chosen, text_active), (image_chosen, image_active) = choices
    table = batch.gather(torch.stack([text_chosen, text_active.long(), image_chosen, image_active.long()], dim=1))
    others = torch.ones(batch.size, dtype=torch.bool, device=table.device)
    others[batch.local] = False  # this rank's own anchors' terms already carry every local gradient
    extra = batch.image.new_zeros(())
    for chosen, active, fixed, moving in ((table[:, 0], table[:, 1], batch.image, batch.text),
                                          (table[:, 2], table[:, 3], batch.text, batch.image)):
        mine = others & (active > 0) & (chosen >= batch.offset) & (chosen < batch.offset + batch.local_size)
        anchor_rows = torch.nonzero(mine).squeeze(1)
        similarity = (fixed[anchor_rows].detach() * moving[chosen[anchor_rows]]).sum(dim=1)
        extra = extra + (similarity - similarity.detach()).sum() / max(batch.size, 1)
    return extra


def _zero_diagnostics(device) -> dict[str, torch.Tensor]:
    return {key: torch.zeros((), dtype=torch.float64, device=device) for key in STEP_SUMS}


@torch.no_grad()
def _add_choice_diagnostics(diagnostics, chosen_sim, valid, anchor_ids, chosen_ids, stats,
                            options: SamplerOptions, group_of_id, sampled=None) -> None:
    """Adds the sums behind the fallback, mean-P_fn and false-negative rates for chosen negatives [B, k];
    ``sampled`` marks the slots the sampler chose itself (not fallbacks), for the FN rate of those alone."""
    diagnostics["slots"] += valid.sum()
    active = bayes_active(stats, options.min_count)
    p_fn = false_negative_probability(chosen_sim.double(), safe_stats(stats, active).double(), options.prior_k)
    diagnostics["p_fn_sum"] += torch.where(active, (p_fn * valid).sum(), 0.0)
    diagnostics["p_fn_slots"] += torch.where(active, valid.sum().double(), 0.0)
    if group_of_id is not None:
        anchor_group = group_of_id[anchor_ids].unsqueeze(1)
        chosen_group = group_of_id[chosen_ids.clamp(min=0)]
        same_group = (anchor_group == chosen_group) & valid
        diagnostics["false_negatives"] += same_group.sum()
        diagnostics["group_slots"] += valid.sum()
        sampled = valid if sampled is None else sampled
        diagnostics["sampled_false_negatives"] += (same_group & sampled).sum()
        diagnostics["sampled_group_slots"] += sampled.sum()
