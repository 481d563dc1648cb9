"""What a training run needs from this package, behind a few calls: the swap test of every run
(``SwapEvaluation``), the TAGS-DC trainer of a ``--tags`` run (``make_trainer``) and its ``examples.md``."""

from __future__ import annotations

import os
import warnings

import torch

from fne_fast.data.features import default_cache_dir
from fne_fast.io import atomic_write_text
from fne_fast.models import shared_text_encoder, text_encoder_version, text_trunk, trunk_version
from fne_fast.tags.corpus import Corpus
from fne_fast.tags.filtering import CandidateFilter
from fne_fast.tags.pool import CaptionSource
from fne_fast.tags.report import EXAMPLES_NAME
from fne_fast.tags.spans import MissingSpacyError
from fne_fast.tags.swap import SWAP_KEYS, SwapSet, cached_swap_set, swap_accuracy
from fne_fast.tags.synonyms import load_synonyms
from fne_fast.tags.trainer import TagsTrainer

__all__ = ["text_corpus", "run_texts", "SwapEvaluation", "make_trainer", "write_examples"]

_TEXT_DIM = 384  # MiniLM's width: the word states' width


def text_corpus(dataset: str, data_options: dict, cache_dir: str, limit: int | None,
                progress: bool, eval_limit: int | None = None) -> Corpus | None:
    """The caption texts of a data set, or None for precomputed features (no texts)."""
    if dataset == "features":
        return None
    return Corpus(dataset, data_options, cache_dir, limit, progress=progress, eval_limit=eval_limit)


class SwapEvaluation:
    """The one-word-swap test on the test split; its metrics are None where the data has no texts (or spaCy is
    missing, with a warning naming the fix). With ``finetune`` > 0 the swapped captions go through the text
    trunk below the trained layers, as the run's captions do."""

    def __init__(self, corpus: Corpus | None, cache_dir: str, device, progress: bool, finetune: int = 0):
        self.swap_set: SwapSet | None = None
        if corpus is None:
            return
        # What the text head reads: the sentence embeddings, or the trunk's token states below the trained layers.
        encoder = (lambda: text_trunk(finetune, str(device))) if finetune else (
            lambda: shared_text_encoder(str(device)))
        try:
            self.swap_set = cached_swap_set(f"{corpus.dataset}-test", corpus["test"], corpus.vocabulary(),
                                            load_synonyms, encoder, cache_dir, progress=progress,
                                            encoder_version=trunk_version(text_encoder_version(), "text", finetune))
        except MissingSpacyError as error:
            warnings.warn(f"no one-word-swap test (swap_acc is null): {error}", stacklevel=2)

    def metrics(self, heads, image: torch.Tensor, text: torch.Tensor, caption_image: torch.Tensor) -> dict:
        """``image``, ``text``: the test split's online embeddings (as evaluation computed them)."""
        if self.swap_set is None:
            return dict.fromkeys(SWAP_KEYS)
        with torch.no_grad():
            swapped = heads.text_head(self.swap_set.features.to(text.device))
        return swap_accuracy(image, text, swapped, self.swap_set, caption_image)


def run_texts(config, *, progress: bool) -> tuple[Corpus | None, SwapEvaluation]:
    """A run's caption texts (None for precomputed features), limited like its splits, and its one-word-swap
    test; ``config`` is the run's ``fne_fast.training.TrainConfig``."""
    cache_dir = config.cache_dir or default_cache_dir()
    texts = text_corpus(config.dataset, config.data_options, cache_dir, config.limit, progress=progress,
                        eval_limit=config.eval_limit)
    return texts, SwapEvaluation(texts, cache_dir, config.device, progress=progress, finetune=config.finetune)


def _source(texts, synonyms) -> CaptionSource:
    return CaptionSource(texts.parsed, CandidateFilter(texts.captions, texts.caption_image, texts.image_group,
                                                       synonyms))


def make_trainer(options, corpus: Corpus | None, train_split, *, seed: int, device, joint_dim: int, lr: float,
                 progress: bool) -> TagsTrainer:
    """The TAGS-DC trainer of a run; ``train_split`` is the training ``FeatureSplit`` the texts must match."""
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
                       progress=progress)


def write_examples(out: str, trainer: TagsTrainer) -> None:
    """examples.md: every epoch's section so far, written atomically."""
    atomic_write_text(os.path.join(out, EXAMPLES_NAME),
                      "# Synthetic negatives (TAGS-DC)\n\nEach caption with its hardest synthetic sentences under the "
                      "model at the end of the epoch; changed words in bold, the replaced word struck through.\n\n"
                      + "\n".join(trainer.examples))
