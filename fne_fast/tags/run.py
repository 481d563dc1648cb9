"""What a training run needs from this package, behind a few calls: the swap tests of every run
(``SwapEvaluation``), the TAGS-DC trainer of a ``--tags`` run (``make_trainer``) and its ``examples.md``."""

from __future__ import annotations

import json
import os
import warnings

import torch

from fne_fast.data.features import default_cache_dir
from fne_fast.errors import UsageError
from fne_fast.io import atomic_write_text, read_jsonl, write_jsonl
from fne_fast.models import TEXT_DEPTH, shared_text_encoder, text_encoder_version, text_trunk, trunk_version
from fne_fast.tags.corpus import Corpus
from fne_fast.tags.filtering import CandidateFilter
from fne_fast.tags.pool import CaptionSource
from fne_fast.tags.report import EXAMPLES_NAME
from fne_fast.tags.spans import MissingSpacyError
from fne_fast.tags.lexicon import load_lexicon
from fne_fast.tags.prior import BigramPrior
from fne_fast.tags.swap import (SWAP_FAMILIES, SWAP_KEYS, SwapSet, accuracy_by_kind, cached_swap_set, family_suffix,
                                swap_wins)
from fne_fast.tags.synonyms import load_synonyms
from fne_fast.tags.trainer import TagsTrainer

__all__ = ["text_corpus", "run_corpus", "run_texts", "SwapEvaluation", "make_trainer", "write_examples", "write_export"]

_TEXT_DIM = 384  # MiniLM's width: the word states' width


def text_corpus(dataset: str, data_options: dict, cache_dir: str, limit: int | None,
                progress: bool, eval_limit: int | None = None) -> Corpus | None:
    """The caption texts of a data set, or None for precomputed features (no texts)."""
    if dataset == "features":
        return None
    return Corpus(dataset, data_options, cache_dir, limit, progress=progress, eval_limit=eval_limit)


class SwapEvaluation:
    """The swap tests of the validation and test splits, every family (``fne_fast.tags.swap.SWAP_FAMILIES``); the
    test split's also under a blind matcher and the caption prior. Its metrics are None where the data has no
    texts (or spaCy is missing, with a warning naming the fix). With ``finetune`` > 0 the swapped captions go
    through the text trunk below the trained layers, as the run's captions do."""

    def __init__(self, corpus: Corpus | None, cache_dir: str, device, progress: bool, finetune: int = 0):
        self.sets: dict[tuple[str, str], SwapSet] = {}
        self.prior_wins: dict[str, torch.Tensor] = {}
        if corpus is None:
            return
        # What the text head reads: the sentence embeddings, or the trunk's token states below the trained layers.
        encoder = (lambda: text_trunk(finetune, str(device))) if finetune else (
            lambda: shared_text_encoder(str(device)))
        version = trunk_version(text_encoder_version(), "text", finetune)
        try:
            for split in ("val", "test"):
                for family in SWAP_FAMILIES:
                    self.sets[split, family] = cached_swap_set(
                        f"{corpus.dataset}-{split}", family, corpus[split], corpus.vocabulary(), load_synonyms,
                        load_lexicon, encoder, cache_dir, progress=progress, encoder_version=version)
        except MissingSpacyError as error:
            warnings.warn(f"no swap tests (swap_acc is null): {error}", stacklevel=2)
            self.sets = {}
            return
        prior, test = BigramPrior(corpus["train"].captions), corpus["test"]
        for family in SWAP_FAMILIES:
            swap_set = self.sets["test", family]
            self.prior_wins[family] = prior.prefers_true([test.captions[row] for row in swap_set.caption.tolist()],
                                                         swap_set.texts)

    def metrics(self, heads, split: str, image: torch.Tensor, text: torch.Tensor,
                caption_image: torch.Tensor) -> tuple[dict, dict[str, torch.Tensor]]:
        """(metrics, per-triple outcomes) of ``split`` ("val" or "test"); ``image``, ``text``: its online
        embeddings (as evaluation computed them). The outcomes (``swap_won<suffix>`` [S] bool, test only) are kept
        with the test ranks for paired comparisons."""
        keys = [key for key in SWAP_KEYS if key.startswith("val_") == (split == "val")]
        metrics, outcomes = dict.fromkeys(keys), {}
        if not self.sets:
            return metrics, outcomes
        prefix = "val_" if split == "val" else ""
        blind = image.mean(dim=0, keepdim=True).expand_as(image)
        for family in SWAP_FAMILIES:
            swap_set, suffix = self.sets[split, family], family_suffix(family)
            with torch.no_grad():
                swapped = heads.text_head(swap_set.features.to(text.device))
            won = swap_wins(image, text, swapped, swap_set, caption_image)
            metrics[f"{prefix}swap_acc{suffix}"] = _percent(won)
            if split == "val":
                continue
            outcomes[f"swap_won{suffix}"] = won.cpu()
            if family == "vocab":
                metrics.update(accuracy_by_kind(won, swap_set))
            metrics[f"swap_blind_acc{suffix}"] = _percent(swap_wins(blind, text, swapped, swap_set, caption_image))
            metrics[f"swap_prior_acc{suffix}"] = _percent(self.prior_wins[family])
        return metrics, outcomes


def _percent(won: torch.Tensor) -> float | None:
    return 100.0 * won.double().mean().item() if won.numel() else None


def run_corpus(config, *, progress: bool) -> Corpus | None:
    """A run's caption texts (None for precomputed features), limited like its splits; ``config`` is the run's
    ``fne_fast.training.TrainConfig``."""
    return text_corpus(config.dataset, config.data_options, config.cache_dir or default_cache_dir(), config.limit,
                       progress=progress, eval_limit=config.eval_limit)


def run_texts(config, *, progress: bool) -> tuple[Corpus | None, SwapEvaluation]:
    """A run's caption texts (``run_corpus``) and its swap tests."""
    texts = run_corpus(config, progress=progress)
    return texts, SwapEvaluation(texts, config.cache_dir or default_cache_dir(), config.device, progress=progress,
                                 finetune=config.finetune)


def _source(texts, synonyms) -> CaptionSource:
    return CaptionSource(texts.parsed, CandidateFilter(texts.captions, texts.caption_image, texts.image_group,
                                                       synonyms))


def make_trainer(options, corpus: Corpus | None, train_split, *, seed: int, device, joint_dim: int, lr: float,
                 progress: bool, cache_dir: str | None = None, export: bool = False, group=None,
                 finetune: int = 0) -> TagsTrainer:
    """The TAGS-DC trainer of a run; ``train_split`` is the training ``FeatureSplit`` the texts must match;
    ``group``: the run's process group (None: one process); ``finetune``: the run's trained top layers, which
    TAGS-DC then shares."""
    if corpus is None:
        raise ValueError("--tags needs caption texts: the 'features' data set has none")
    train = corpus["train"]
    if len(train.captions) != train_split.text_features.shape[0]:
        raise ValueError(f"the training split has {train_split.text_features.shape[0]} caption features but "
                         f"{len(train.captions)} caption texts: the feature cache does not match the data")
    synonyms = load_synonyms()
    return TagsTrainer(options, seed=seed, device=device, joint_dim=joint_dim, word_dim=_TEXT_DIM, lr=lr,
                       vocabulary=corpus.vocabulary(options.vocabulary_size), train=_source(train, synonyms),
                       heldout=_source(corpus["val"], synonyms),
                       text_encoder=lambda: shared_text_encoder(str(device)),
                       captions=train.captions, image_names=train.image_names, caption_image=train.caption_image,
                       cache_dir=cache_dir or default_cache_dir(), encoder_version=text_encoder_version(),
                       dataset=corpus.dataset, progress=progress, export=export, group=group,
                       trunk_cut=TEXT_DEPTH - finetune if finetune else None)


def write_examples(out: str, trainer: TagsTrainer) -> None:
    """examples.md: every epoch's section so far, written atomically."""
    atomic_write_text(os.path.join(out, EXAMPLES_NAME),
                      "# Synthetic negatives (TAGS-DC)\n\nEach caption with its hardest synthetic sentences under the "
                      "model at the end of the epoch; changed words in bold, the replaced word struck through.\n\n"
                      + "\n".join(trainer.examples))


def write_export(path: str, epoch: int, records: list[dict]) -> None:
    """``--tags-export``: the file's records of the epochs before ``epoch`` and then ``records`` (one JSON object per
    line), written atomically. An epoch trained again after an interruption replaces its earlier lines, and a
    fresh run (epoch 0) replaces the whole file."""
    try:
        earlier = [record for record in read_jsonl(path) if record["epoch"] < epoch] if epoch > 0 else []
    except (json.JSONDecodeError, TypeError, KeyError):
        raise UsageError(f"--tags-export: {path} holds a line that is not an exported record; it is not this run's "
                         "export (choose another file)") from None
    write_jsonl(path, earlier + records)
