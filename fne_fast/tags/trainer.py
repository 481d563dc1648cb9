"""TAGS-DC beside any sampler: the training loop calls ``start_epoch`` (build the epoch's pool), ``step`` (the
weighted TAGS losses of one step, added to the sampler's loss before the backward pass), ``optimizer_step`` and
``finish_epoch`` (metrics, held-out word-level evaluation, examples).

Every random choice is drawn from a ``torch.Generator`` seeded by (run seed, epoch, purpose), and the heads, their
optimiser and the examples so far are in the checkpoint, so a resumed run reproduces an uninterrupted one.

Under several processes rank 0 alone runs the frozen text backbone: it pretrains the generator, builds each epoch's
pool and evaluates, and sends the generator, the pool and the word table to the other ranks. A step's TAGS-DC loss
(a few pool captions, ``captions_per_step``) is then the same on every rank: each computes all of it, DDP's
averaging leaves the matcher's share of its gradient as it is, and the TAGS-DC heads' gradients are averaged
(``optimizer_step``), so the ranks' heads stay one model and the run follows one process with the global batch.
With ``--finetune`` the trained MiniLM layers are the trunk TAGS-DC shares with the matcher (``text_path``).
"""

from __future__ import annotations

import hashlib
import time

import torch

from fne_fast.sampling import distributed
from fne_fast.tags.heads import TagsHeads, discrimination_loss, synthetic_ranking_loss, word_loss
from fne_fast.tags.options import TagsOptions
from fne_fast.tags.pool import CaptionSource, SyntheticPool, build_pool, grouped_ranges
from fne_fast.tags.prescore import pool_agreement
from fne_fast.tags.pretrain import cached_masked_words, cached_word_embeddings, pretrain_generator, top1_accuracy
from fne_fast.tags.report import examples_section, export_records, word_level_metrics
from fne_fast.tags.text_path import TextPath
from fne_fast.tags.vocab import UNKNOWN, Vocabulary

__all__ = ["TagsTrainer", "derived_seed", "STEP_SUMS"]

_PRETRAIN_HELDOUT = 512  # validation captions whose masked words measure the pretrained generator

# Per-step sums kept on the device and divided once per epoch.
STEP_SUMS = ("rank_loss", "mlm_loss", "discrimination_loss", "correction_loss", "rank_pairs", "rank_correct",
             "mlm_words", "mlm_correct", "words", "discrimination_correct", "changed", "predicted_changed",
             "true_changed", "corrections", "correction_correct", "used", "used_positive")


def derived_seed(seed: int, *purpose) -> int:
    """A 63-bit seed for one purpose (e.g. ("pool", epoch)) of a run: independent streams per purpose."""
    digest = hashlib.sha256(repr((seed, "tags", *purpose)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _hardest(scores: torch.Tensor, counts: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per caption, the (up to) ``keep`` highest-scoring of its candidates: ``scores`` [K] are grouped by caption,
    ``counts`` [C] how many each has. Returns indices into ``scores`` [C, m] and which of them exist [C, m]."""
    widest = int(counts.max()) if counts.numel() else 0
    first = torch.cumsum(counts, 0) - counts
    owner = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    table = torch.full((counts.numel(), max(widest, 1)), float("-inf"), device=scores.device)
    table[owner, torch.arange(scores.numel(), device=scores.device) - first[owner]] = scores
    top_scores, top_slots = table.topk(max(min(keep, widest), 1), dim=1)
    return (first.unsqueeze(1) + top_slots).clamp(max=max(scores.numel() - 1, 0)), torch.isfinite(top_scores)


class TagsTrainer:
    def __init__(self, options: TagsOptions, *, seed: int, device, joint_dim: int, word_dim: int, lr: float,
                 vocabulary: Vocabulary, train: CaptionSource, heldout: CaptionSource | None, text_encoder,
                 captions: list[str], image_names: list[str], caption_image: list[int], cache_dir: str,
                 encoder_version: str, dataset: str, progress: bool = False, export: bool = False, group=None,
                 trunk_cut: int | None = None):
        """``text_encoder``: a zero-argument callable returning the frozen ``TextEncoder`` (loaded on first use;
        ``encoder_version`` names it in cache keys); ``captions``, ``image_names``, ``caption_image``: the training
        split's, for examples.md; ``cache_dir``: where the masked words and word embeddings are cached; ``export``:
        keep each epoch's kept synthetic sentences as records (``epoch_records``, for ``--tags-export``);
        ``group``: the run's process group (None: one process); ``trunk_cut``: the first of MiniLM's layers the
        run trains (``--finetune``; the matcher's text head is then a ``Tower`` over them), None for frozen."""
        self.options, self.seed, self.device, self.progress = options, seed, torch.device(device), progress
        self.group, self.world_size = group, distributed.world_size(group)
        self.first = distributed.rank(group) == 0
        # Rank 0's backbone work (pretraining, a pool) may outlast the steps' collective timeout.
        self.patient = distributed.patient_group(group)
        self.vocabulary, self.train_source, self.heldout_source = vocabulary, train, heldout
        self.text_encoder, self.text_path = text_encoder, TextPath(text_encoder, trunk_cut)
        self.cache_dir, self.encoder_version, self.dataset, self.lr = cache_dir, encoder_version, dataset, lr
        self.word_heads = options.refill == "generator"  # the ablation trains no word-level head
        self._word_features: torch.Tensor | None = None
        self.captions, self.image_names, self.caption_image = captions, image_names, caption_image
        if not train.eligible:
            raise ValueError("TAGS-DC: no training caption has a word to mask (object, attribute or relation)")
        # Seeded apart from the global RNG, so the matcher's heads start as in the same run without TAGS.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(seed, "init"))
            self.heads = TagsHeads(word_dim, joint_dim, len(vocabulary), options.hidden_dim,
                                   tied_dim=joint_dim if options.share_text_head else None).to(self.device)
        self.optimizer = torch.optim.Adam(self.heads.parameters(), lr=lr)
        self.examples: list[str] = []
        self.export, self.epoch_records = export, []
        self.pool: SyntheticPool | None = None

    # --- checkpoint ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"heads": self.heads.state_dict(), "optimizer": self.optimizer.state_dict(),
                "examples": list(self.examples), "vocabulary": self.vocabulary.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.heads.load_state_dict(state["heads"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.examples = list(state["examples"])

    # --- the words' scores -------------------------------------------------------------------------------------
    def word_table(self, matching_heads) -> torch.Tensor | None:
        """[V, D] the matcher's text head over each vocabulary word's embedding (tied heads), else None; under
        autograd when the caller is, so the word-level losses train the text head."""
        return self.text_path.projection(matching_heads)(self._word_embeddings()) if self.heads.tied else None

    def _word_embeddings(self) -> torch.Tensor:
        """[V, word_dim] the frozen backbone's embedding of each vocabulary word alone (cached)."""
        if self._word_features is None:
            self._word_features = cached_word_embeddings(self.vocabulary, self.text_encoder, self.encoder_version,
                                                         self.cache_dir).to(self.device)
        return self._word_features

    def _logits_of(self, head, table):
        return lambda states, image: self.heads.word_logits(head, states, image, table)

    # --- before the first epoch ---------------------------------------------------------------------------------
    def pretrain(self, matching_heads, split, heldout_split) -> tuple[dict, dict[str, float]]:
        """Trains the generator on the masked words of every training caption before the first pool (the
        matcher's heads as they start, not trained by it); (metrics, timing in seconds): its top-1 on the training
        and on validation masked words."""
        started = time.perf_counter()
        options = self.options
        if not self.word_heads or options.pretrain_epochs == 0:
            return {}, {}
        metrics = self._pretrain_on_first(matching_heads, split, heldout_split) if self.first else {}
        if self.world_size > 1:
            self.heads.load_state_dict(distributed.broadcast_from_first(
                self.heads.state_dict() if self.first else None, self.patient, "the pretrained generator"))
        return metrics, {"tags_pretrain_seconds": time.perf_counter() - started}

    def _pretrain_on_first(self, matching_heads, split, heldout_split) -> dict:
        """The pretraining itself (rank 0's, with its backbone); its metrics."""
        options = self.options
        common = dict(vocabulary=self.vocabulary, text_encoder_loader=self.text_encoder,
                      encoder_version=self.encoder_version, cache_dir=self.cache_dir,
                      mask_probability=options.mask_probability, progress=self.progress)
        train = cached_masked_words(f"{self.dataset}-train", self.train_source, rows=self.train_source.eligible,
                                    **common)
        with torch.no_grad():
            table = self.word_table(matching_heads)
            image = self._image_embedding(matching_heads, split, train.rows)
        logits_of = self._logits_of(self.heads.generator, table)
        parameters = list(self.heads.generator.parameters()) + ([self.heads.word_bias] if self.heads.tied else [])
        pretrain_generator(logits_of, parameters, train, image, epochs=options.pretrain_epochs, lr=self.lr,
                           random=torch.Generator().manual_seed(derived_seed(self.seed, "pretrain")))
        metrics = {"tags_pretrain_train_top1": top1_accuracy(logits_of, train, image)}
        source = self.heldout_source
        if source is not None and source.eligible:
            heldout = cached_masked_words(f"{self.dataset}-val", source, rows=source.eligible[:_PRETRAIN_HELDOUT],
                                          **common)
            heldout_image = self._image_embedding(matching_heads, heldout_split, heldout.rows)
            metrics["tags_pretrain_val_top1"] = top1_accuracy(logits_of, heldout, heldout_image)
        return metrics

    # --- the epoch ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _image_embedding(self, matching_heads, split, rows: torch.Tensor) -> torch.Tensor:
        return matching_heads.image_head(split.image_features[split.caption_image[rows]].to(self.device))

    def _pool(self, source: CaptionSource, rows: list[int], matching_heads, split, random: torch.Generator,
              masked_versions: int, samples: int) -> SyntheticPool:
        image = self._image_embedding(matching_heads, split, torch.tensor(rows, dtype=torch.int64))
        with torch.no_grad():
            refills = self._logits_of(self.heads.generator, self.word_table(matching_heads)) if (
                self.word_heads) else None
        pool = build_pool(source, self.vocabulary, rows, image, refills, self.text_path.encoder(matching_heads), random,
                          masked_versions=masked_versions, samples=samples,
                          mask_probability=self.options.mask_probability, temperature=self.options.temperature,
                          progress=self.progress)
        return pool.to(self.device)

    def second_stage(self, epoch: int) -> bool:
        """Whether ``epoch`` trains discrimination and correction (the authors' stage 2; every epoch in one stage)."""
        return epoch >= self.options.stage2_epoch

    def learning_rate_scale(self, epoch: int) -> float:
        """The factor on every learning rate in ``epoch``: the matcher's (the caller applies it) and TAGS-DC's."""
        return self.options.stage2_lr_scale if self.second_stage(epoch) else 1.0

    def start_epoch(self, epoch: int, matching_heads, split) -> dict[str, float]:
        """Builds the epoch's pool from the generator as it is now and sets the stage's learning rate; returns the
        pool's cost in seconds."""
        started = time.perf_counter()
        self.epoch = epoch
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * self.learning_rate_scale(epoch)
        random = torch.Generator().manual_seed(derived_seed(self.seed, "pool", epoch))
        eligible = self.train_source.eligible
        chosen = torch.randperm(len(eligible), generator=random)[:self.options.pool_captions].tolist()
        self.pool = self._pool(self.train_source, [eligible[index] for index in chosen], matching_heads, split,
                               random, self.options.masked_versions, self.options.samples) if self.first else None
        if self.world_size > 1:
            self._share_pool()
        self._order_random = torch.Generator().manual_seed(derived_seed(self.seed, "order", epoch))
        self._order: list[int] = []
        self.sums = {key: torch.zeros((), dtype=torch.float64, device=self.device) for key in STEP_SUMS}
        self.steps = 0
        return {"tags_pool_seconds": time.perf_counter() - started}

    def _share_pool(self) -> None:
        """Rank 0's pool and word table (encoded by its backbone) on the other ranks."""
        words = self._word_features if self.heads.tied else None  # the other ranks need it for the word logits
        pool, words = distributed.broadcast_from_first(
            (self.pool.to("cpu"), None if words is None else words.cpu()) if self.first else None, self.patient,
            "the synthetic pool")
        if not self.first:
            self.pool = pool.to(self.device)
            self._word_features = None if words is None else words.to(self.device)

    def _step_positions(self, step: int) -> torch.Tensor:
        """Pool positions used at ``step``: consecutive slices of a stream of shuffles of the pool."""
        needed = (step + 1) * self.options.captions_per_step
        while len(self._order) < needed:
            self._order += torch.randperm(self.pool.rows.numel(), generator=self._order_random).tolist()
        first = step * self.options.captions_per_step
        return torch.tensor(self._order[first:needed], dtype=torch.int64, device=self.device)

    def step(self, step: int, matching_heads, split) -> torch.Tensor:
        """The weighted TAGS loss of one training step (``step`` counts from 0 in the epoch)."""
        options, pool = self.options, self.pool
        positions = self._step_positions(step)
        rows = pool.rows[positions].cpu()
        image = matching_heads.image_head(split.image_features[split.caption_image[rows]].to(self.device))
        if not options.train_image_head:
            image = image.detach()
        counts = pool.candidate_count[positions]
        candidates = grouped_ranges(pool.candidate_start[positions], counts)
        masked = grouped_ranges(pool.masked_start[positions], pool.masked_count[positions])
        texts = self.text_path.step_texts(matching_heads, pool, split.text_features[rows].to(self.device),
                                          candidates, masked, self.word_heads)
        caption, embedded = texts.texts[:positions.numel()], texts.texts[positions.numel():]

        # Score every candidate of these captions with the current model; keep the m hardest of each.
        owner = torch.repeat_interleave(torch.arange(positions.numel(), device=self.device), counts)
        chosen, valid = _hardest(((image[owner] * embedded).sum(dim=1)).detach(), counts, options.keep)
        synthetic = embedded[chosen] if candidates.numel() else embedded.new_zeros(*chosen.shape, image.shape[1])
        rank_loss, rank_correct = synthetic_ranking_loss(image, caption, synthetic, valid, options.margin)
        if not self.word_heads:  # the ablation: the synthetic hinge alone
            self._add_rank_sums(rank_loss, valid, rank_correct, pool.candidate_positive[candidates[chosen[valid]]])
            return options.rank_weight * rank_loss

        # Discrimination and correction on the kept sentences' words; the generator's MLM on the masked words.
        used = candidates[chosen[valid]]
        lengths = pool.candidates.lengths[used]
        words = grouped_ranges(pool.candidates.starts[used], lengths)
        word_image = image[torch.repeat_interleave(owner[chosen[valid]], lengths)]
        states = texts.states[grouped_ranges(texts.candidate_rows[chosen[valid]], lengths)]
        changed = pool.word_changed[words]
        discrimination_logits = self.heads.discriminator(states, word_image)
        table = self.word_table(matching_heads)
        correction_logits = self.heads.word_logits(self.heads.corrector, states[changed], word_image[changed], table)
        originals = pool.word_original[words][changed]
        masked_image = image[torch.repeat_interleave(torch.arange(positions.numel(), device=self.device),
                                                     pool.masked_count[positions])]
        generator_logits = self.heads.word_logits(self.heads.generator, texts.masked_states, masked_image, table)
        targets = pool.masked_targets[masked]

        losses = {"rank_loss": rank_loss, "mlm_loss": word_loss(generator_logits, targets),
                  "discrimination_loss": discrimination_loss(discrimination_logits, changed),
                  "correction_loss": word_loss(correction_logits, originals)}
        self._add_sums(losses, valid, rank_correct, generator_logits, targets, discrimination_logits, changed,
                       correction_logits, originals, pool.candidate_positive[used])
        word_losses = (options.discrimination_weight * losses["discrimination_loss"]
                       + options.correction_weight * losses["correction_loss"])
        # Stage 1 still scores the words (their metrics), but only ranking and masked words train.
        return (options.rank_weight * losses["rank_loss"] + options.mlm_weight * losses["mlm_loss"]
                + (word_losses if self.second_stage(self.epoch) else 0.0))

    @torch.no_grad()
    def _add_rank_sums(self, rank_loss, valid, rank_correct, used_positive) -> None:
        sums = self.sums
        sums["rank_loss"] += rank_loss.detach()
        sums["rank_pairs"] += valid.sum()
        sums["rank_correct"] += rank_correct.sum()
        sums["used"] += used_positive.numel()
        sums["used_positive"] += used_positive.sum()
        self.steps += 1

    @torch.no_grad()
    def _add_sums(self, losses, valid, rank_correct, generator_logits, targets, discrimination_logits, changed,
                  correction_logits, originals, used_positive) -> None:
        sums = self.sums
        for key, value in losses.items():
            if key != "rank_loss":
                sums[key] += value.detach()
        self._add_rank_sums(losses["rank_loss"], valid, rank_correct, used_positive)
        known = targets != UNKNOWN
        sums["mlm_words"] += known.sum()
        sums["mlm_correct"] += ((generator_logits.argmax(dim=1) == targets) & known).sum()
        predicted = discrimination_logits.argmax(dim=1).bool()
        sums["words"] += changed.numel()
        sums["discrimination_correct"] += (predicted == changed).sum()
        sums["changed"] += changed.sum()
        sums["predicted_changed"] += predicted.sum()
        sums["true_changed"] += (predicted & changed).sum()
        known_originals = originals != UNKNOWN
        sums["corrections"] += known_originals.sum()
        sums["correction_correct"] += ((correction_logits.argmax(dim=1) == originals) & known_originals).sum()

    def optimizer_step(self) -> None:
        if self.world_size > 1:  # the same on every rank up to the order of sums: one average keeps one model
            gradients = [parameter.grad for parameter in self.heads.parameters() if parameter.grad is not None]
            if gradients:
                flat = torch.cat([gradient.reshape(-1) for gradient in gradients])
                distributed.all_reduce(flat, self.group, "TAGS-DC gradients").div_(self.world_size)
                for gradient, average in zip(gradients, flat.split([gradient.numel() for gradient in gradients])):
                    gradient.copy_(average.view_as(gradient))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def finish_epoch(self, epoch: int, matching_heads, split, heldout_split) -> tuple[dict, dict[str, float]]:
        """(metrics of the epoch, timing in seconds); appends the epoch's examples."""
        started = time.perf_counter()
        totals = {key: value.item() for key, value in self.sums.items()}
        steps = max(self.steps, 1)

        def share(part, whole):
            return 100.0 * totals[part] / totals[whole] if totals[whole] else None

        counts = self.pool.counts
        metrics = {f"tags_{key}": totals[key] / steps if self.word_heads or key == "rank_loss" else None
                   for key in ("rank_loss", "mlm_loss", "discrimination_loss", "correction_loss")}
        changed_f1_base = totals["predicted_changed"] + totals["changed"]
        metrics.update({
            "tags_rank_acc": share("rank_correct", "rank_pairs"),
            "tags_mlm_acc": share("mlm_correct", "mlm_words"),
            "tags_discrimination_acc": share("discrimination_correct", "words"),
            "tags_discrimination_f1": (200.0 * totals["true_changed"] / changed_f1_base if changed_f1_base
                                       else None),
            "tags_correction_acc": share("correction_correct", "corrections"),
            # The acceptance figure: synthetic negatives actually used that are really positives.
            "tags_positive_share": share("used_positive", "used"),
            "tags_positive_share_kept": (100.0 * counts["positive_kept"] / counts["kept"] if counts["kept"]
                                         else None),
            "tags_positive_share_generated": (100.0 * counts["positive_generated"] / counts["generated"]
                                              if counts["generated"] else None),
            "tags_pool": dict(counts)})
        if self.first:  # rank 0 evaluates (with its backbone) and writes the examples and the export
            metrics.update(self._heldout(epoch, matching_heads, heldout_split))
            image, scores = self._pool_scores(matching_heads, split)
            captions = self.text_path.caption_features(
                matching_heads, split.text_features[self.pool.rows.cpu()].to(self.device))
            metrics.update(pool_agreement(self.pool, image, scores, captions, self._word_embeddings(),
                                          self.text_path.projection(matching_heads), self.vocabulary,
                                          self.options.keep))
            self._describe_epoch(epoch, matching_heads, split, image, scores)
        return metrics, {"tags_finish_seconds": time.perf_counter() - started}

    def _heldout(self, epoch: int, matching_heads, heldout_split) -> dict:
        source = self.heldout_source
        if source is None or not source.eligible or self.options.heldout_captions == 0 or not self.word_heads:
            return {}
        rows_random = torch.Generator().manual_seed(derived_seed(self.seed, "heldout-rows"))
        chosen = torch.randperm(len(source.eligible), generator=rows_random)[:self.options.heldout_captions]
        rows = [source.eligible[index] for index in chosen.tolist()]
        random = torch.Generator().manual_seed(derived_seed(self.seed, "heldout", epoch))
        pool = self._pool(source, rows, matching_heads, heldout_split, random, 1, 2)
        image = self._image_embedding(matching_heads, heldout_split, pool.rows.cpu())
        with torch.no_grad():
            table = self.word_table(matching_heads)
        return {f"tags_{key}": value for key, value in word_level_metrics(self.heads, pool, image, table).items()}

    @torch.no_grad()
    def _pool_scores(self, matching_heads, split) -> tuple[torch.Tensor, torch.Tensor]:
        """With the matcher at the end of the epoch: the online image embedding of each pool caption [P, D] and
        each candidate's score against its caption's image [K]."""
        pool = self.pool
        image = self._image_embedding(matching_heads, split, pool.rows.cpu())
        scores = (image[pool.candidate_owner] * self.text_path.projection(matching_heads)(
            self.text_path.candidate_features(matching_heads, pool))).sum(dim=1)
        return image, scores

    @torch.no_grad()
    def _describe_epoch(self, epoch: int, matching_heads, split, image: torch.Tensor, scores: torch.Tensor) -> None:
        """Appends the epoch's examples.md section and, when exporting, sets ``epoch_records`` (``image``,
        ``scores``: ``_pool_scores``)."""
        pool = self.pool
        self.examples = self.examples[:epoch] + [examples_section(
            epoch, pool, scores.cpu(), self.train_source.parsed, self.captions, self.image_names,
            self.caption_image, self.options.examples, self.options.keep)]
        if self.export:
            captions = matching_heads.text_head(split.text_features[pool.rows.cpu()].to(self.device))
            self.epoch_records = export_records(epoch, pool, scores.cpu(), (image * captions).sum(dim=1).cpu(),
                                                self.train_source.parsed, self.captions, self.image_names,
                                                self.caption_image)
