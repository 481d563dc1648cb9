"""One epoch of training: the step loop over the epoch's shuffle, its per-step timing, the divergence watch, and
the epoch's metrics from the per-step sums.

A step's global batch is the next W·B pairs of the shuffle (``batch_size`` B per process); rank r takes its r-th
slice of B. Each step: heads (online embeddings and momentum keys) -> both banks enqueue the keys -> the global
batch's running statistics -> ``FNELoss`` (negatives drawn from the banks by the fused op; TAGS-DC's loss added
when on) -> one optimiser step -> the momentum heads follow. A fine-tuned step runs the heads in units and sums
their gradients in a fixed order (``training.units``). Nothing is read back to the host per step on a GPU
but the divergence check every 20 steps and the timing breakdown's synchronisations.
"""

from __future__ import annotations

import math
import time

import torch

from fne_fast.data import FeatureSplit
from fne_fast.errors import NonFiniteError
from fne_fast.models.tops import trim_token_padding
from fne_fast.sampling import distributed
from fne_fast.sampling.loss import STEP_SUMS
from fne_fast.training.config import TrainConfig
from fne_fast.training.data import sampler_labels
from fne_fast.training.state import RunState
from fne_fast.training.units import UnitStep

__all__ = ["train_one_epoch", "steps_per_epoch", "TIMING_SECTIONS"]

# The sections of a step that the per-epoch timing (timing.jsonl) charges separately.
TIMING_SECTIONS = ("heads", "sampling_and_loss", "bank_update", "statistics")
_DIVERGED = "nothing of this epoch was saved, the folder keeps the last good checkpoint. Try a lower --lr"


def _clock(device: torch.device) -> float:
    """Wall time for the per-step breakdown; on a GPU it waits for queued kernels first, so each section is
    charged its own work (this synchronisation is the price of the breakdown)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def train_one_epoch(run: RunState, split: FeatureSplit, epoch: int, timing: dict[str, float]) -> dict:
    """Trains one epoch (``timing``: seconds per section, added to); returns the epoch's training metrics."""
    config, device = run.config, run.device
    warmup = epoch < config.warmup_epochs
    run.criterion.stats.reset()
    shuffle = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    order = torch.randperm(split.text_features.shape[0], generator=shuffle)
    identity_of_caption, group_of_id = sampler_labels(split, config.oracle)
    group_of_id = group_of_id.to(device) if group_of_id is not None else None
    sums = {key: torch.zeros((), dtype=torch.float64, device=device) for key in STEP_SUMS}
    divergence = _DivergenceWatch(device, run.group)
    num_batches = steps_per_epoch(config, order.numel(), run.world_size)
    from tqdm import tqdm  # the `train` extra's: imported when training starts, so the package imports without it

    # A step's global batch is the next W·B pairs of the shuffle; rank r takes its r-th slice of B (the last
    # batch of an epoch may leave a rank fewer pairs, or none).
    global_batch = config.batch_size * run.world_size
    mine = slice(run.rank * config.batch_size, (run.rank + 1) * config.batch_size)
    if run.tags:
        timing.update(run.tags.start_epoch(epoch, run.heads, split))
        run.scale_learning_rates(run.tags.learning_rate_scale(epoch))
    bar = tqdm(order.split(global_batch)[:num_batches], total=num_batches, desc=f"epoch {epoch}", unit="step",
               disable=config.quiet or not run.first, leave=False)
    for batch_number, global_captions in enumerate(bar):
        captions = global_captions[mine]
        # Every rank's share of the global batch (its slice, as ``mine`` is this rank's), known to all without
        # asking: the collectives skip agreeing on it.
        counts = [global_captions[other * config.batch_size:(other + 1) * config.batch_size].numel()
                  for other in range(run.world_size)] if run.world_size > 1 else None
        ids = identity_of_caption[captions].to(device)
        image_inputs = split.image_features[split.caption_image[captions]]
        text_inputs = split.text_features[captions]

        started = _clock(device)
        units, guides = None, None
        if run.batch_invariant:
            units = UnitStep(run.heads, image_inputs, text_inputs, device)
            image, text, image_key, text_key = units.image, units.text, units.image_key, units.text_key
        else:
            # Token states lose their unneeded padding on the host (on a GPU the length would be a synchronisation).
            text_features = trim_token_padding(text_inputs).to(device)
            image, text, image_key, text_key = run.model(trim_token_padding(image_inputs).to(device), text_features)
            # Language guidance's guides: the pairs' frozen caption embeddings as cosines (None when it is off).
            if config.options.guide_threshold is not None:
                guides = torch.nn.functional.normalize(text_features, dim=1)
        heads_forward = _clock(device)
        if run.ledger:
            run.ledger.record(run.image_bank.next_positions(global_captions.numel()), global_captions, run.step)
        run.image_bank.enqueue(image_key, ids, guides=guides, counts=counts)
        run.text_bank.enqueue(text_key, ids, guides=guides, counts=counts)
        enqueued = _clock(device)
        batch = distributed.gather_batch(image, text, ids, run.group, counts)
        run.criterion.stats.update_batch(batch)
        stats_updated = _clock(device)
        loss, diagnostics = run.criterion(image, text, image_key, text_key, ids, image_bank=run.image_bank,
                                          text_bank=run.text_bank, step=run.step, warmup=warmup,
                                          group_of_id=group_of_id, update_stats=False, batch=batch, guides=guides)
        sampled = _clock(device)
        if run.tags:
            loss = loss + run.tags.step(batch_number, run.heads, split)
        tags_loss = _clock(device)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if units is not None:
            # The sampler's loss ends at the units' leaves, so what the backward pass left in the parameters is
            # TAGS-DC's share: the same on every rank, added once to the units' sum.
            tags_grads = [parameter.grad for parameter in run.trained_parameters] if run.tags else None
            units.backward(run.trained_parameters, run.group)
            if tags_grads:
                for parameter, grad in zip(run.trained_parameters, tags_grads):
                    if grad is not None:
                        parameter.grad.add_(grad)
        run.optimizer.step()
        if run.tags:
            run.tags.optimizer_step()
        run.heads.update_momentum()
        divergence.record(run.step, loss)
        finished = _clock(device)

        timing["heads"] += (heads_forward - started) + (finished - tags_loss)
        if run.tags:
            timing["tags_loss"] = timing.get("tags_loss", 0.0) + tags_loss - sampled
        timing["bank_update"] += enqueued - heads_forward
        timing["statistics"] += stats_updated - enqueued
        timing["sampling_and_loss"] += sampled - stats_updated
        run.step += 1
        for key in STEP_SUMS:
            sums[key] += diagnostics[key]
        if device.type == "cpu" or batch_number % 20 == 19 or batch_number == num_batches - 1:
            divergence.raise_if_diverged(epoch)
        if not bar.disable and batch_number % 20 == 0:
            bar.set_postfix(loss=f"{diagnostics['loss'].item() * run.world_size:.4f}")  # rank 0's share × W
    bar.close()
    divergence.raise_if_parameters_diverged(epoch, run.step - 1, run.heads)

    # One all_reduce adds up the ranks' sums (their shares of the loss, their anchors' diagnostics).
    summed = distributed.all_reduce(torch.stack([sums[key] for key in STEP_SUMS]), run.group, "metrics")
    totals = dict(zip(STEP_SUMS, summed.tolist()))
    stats = run.criterion.stats.as_tensor().tolist()
    return {"loss": totals["loss"] / num_batches,
            "fn_rate": (totals["false_negatives"] / totals["group_slots"]
                        if split.image_group is not None and totals["group_slots"] else None),
            # The FN rate of the negatives the sampler drew itself, leaving out the hardest-negative fallbacks.
            "fn_rate_sampled": (totals["sampled_false_negatives"] / totals["sampled_group_slots"]
                                if split.image_group is not None and totals["sampled_group_slots"] else None),
            "fallback_rate": totals["fallback"] / totals["slots"] if totals["slots"] else 0.0,
            "mean_p_fn": totals["p_fn_sum"] / totals["p_fn_slots"] if totals["p_fn_slots"] else None,
            "warmup": warmup,
            "stats": dict(zip(("mu_pos", "var_pos", "mu_neg", "var_neg", "n_pos"), stats)),
            **_criteria_metrics(totals, config)}


def _criteria_metrics(totals: dict, config: TrainConfig) -> dict:
    """Only for the options that are on, so that other runs' metrics keep their keys. GloFND's thresholds: the
    mean finite threshold the anchors used and the mean share of their bank candidates above it (which the
    update drives towards --threshold-share). FNC's attraction: the detected false negatives each anchor
    attracted (both directions' mean)."""
    metrics = {}
    if config.threshold_share is not None:
        rows = totals["threshold_rows"]
        metrics["threshold_mean"] = totals["threshold_sum"] / rows if rows else None
        metrics["threshold_share_above"] = totals["above_share_sum"] / rows if rows else None
    if config.attract_weight:
        rows = totals["attract_rows"]
        metrics["attracted_per_anchor"] = totals["attracted"] / rows if rows else None
    return metrics


class _DivergenceWatch:
    """The first step whose loss holds NaN or infinity, recorded on the device each step and read (a host
    synchronisation) every step on a CPU, where it costs nothing, and every 20 steps on a GPU, so the error still
    names the exact step. Parameters that turn non-finite make the next step's loss non-finite; those of the
    epoch's last step are checked once at its end."""

    # "No bad step yet": larger than any step, so that the earliest bad step over the ranks is their minimum.
    _NONE = 2**62

    def __init__(self, device: torch.device, group=None):
        self.group = group
        self.first_bad_step = torch.full((), self._NONE, dtype=torch.int64, device=device)

    @torch.no_grad()
    def record(self, step: int, loss: torch.Tensor) -> None:
        bad = (self.first_bad_step == self._NONE) & ~loss.detach().isfinite()
        self.first_bad_step = torch.where(bad, step, self.first_bad_step)

    def raise_if_diverged(self, epoch: int) -> None:
        # Every rank reads the earliest bad step of any rank, so all of them raise the same error together.
        step = int(distributed.all_reduce(self.first_bad_step.clone(), self.group, "divergence", "min"))
        if step != self._NONE:
            raise NonFiniteError(f"training diverged at epoch {epoch} step {step}: the loss is not finite "
                                 f"(NaN or infinity); {_DIVERGED}")

    @torch.no_grad()
    def raise_if_parameters_diverged(self, epoch: int, step: int, heads: torch.nn.Module) -> None:
        # NaN and infinity survive a sum, so one sum per tensor tells whether it holds any.
        if not torch.stack([parameter.sum() for parameter in heads.parameters()]).isfinite().all():
            raise NonFiniteError(f"training diverged at epoch {epoch} step {step}: the parameters after the "
                                 f"optimiser step are not finite (NaN or infinity); {_DIVERGED}")


def steps_per_epoch(config: TrainConfig, num_pairs: int, world_size: int) -> int:
    """Global batches in an epoch: all of them, or the first ``steps_per_epoch`` of the epoch's shuffle (short
    runs and timing runs over a large data set)."""
    num_batches = math.ceil(num_pairs / (config.batch_size * world_size))
    return num_batches if config.steps_per_epoch is None else min(num_batches, config.steps_per_epoch)
