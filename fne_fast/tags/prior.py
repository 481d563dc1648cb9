"""A caption prior with no image: a word bigram model of the training captions. Where it already ranks a true
caption above its swap, a text-only model could win that swap without looking at the image; its accuracy on a swap
family (``swap_prior_acc_<family>``) is the share of the family a language prior alone solves."""

from __future__ import annotations

import math
from collections import Counter

import torch

from fne_fast.tags.filtering import normalise

__all__ = ["BigramPrior"]

_START, _END = "<s>", "</s>"


class BigramPrior:
    """log P(caption) under bigrams interpolated with add-one unigrams (``weight`` on the bigram where its
    context was seen)."""

    def __init__(self, captions: list[str], weight: float = 0.7):
        if not 0.0 <= weight < 1.0:
            raise ValueError(f"weight must be in [0, 1), got {weight}")
        self.weight = weight
        self.unigrams: Counter = Counter()
        self.bigrams: Counter = Counter()
        self.contexts: Counter = Counter()
        for caption in captions:
            tokens = [_START, *normalise(caption).split(), _END]
            self.unigrams.update(tokens[1:])
            self.contexts.update(tokens[:-1])
            self.bigrams.update(zip(tokens[:-1], tokens[1:]))
        self.total = sum(self.unigrams.values())

    def log_probability(self, text: str) -> float:
        tokens = [_START, *normalise(text).split(), _END]
        unseen_mass = self.total + len(self.unigrams) + 1
        score = 0.0
        for context, token in zip(tokens[:-1], tokens[1:]):
            unigram = (self.unigrams[token] + 1) / unseen_mass
            seen = self.contexts[context]
            probability = (self.weight * self.bigrams[context, token] / seen + (1 - self.weight) * unigram
                           if seen else unigram)
            score += math.log(probability)
        return score

    def prefers_true(self, true_texts: list[str], swapped_texts: list[str]) -> torch.Tensor:
        """[S] bool: whether each true caption scores strictly above its swap."""
        return torch.tensor([self.log_probability(true) > self.log_probability(swapped)
                             for true, swapped in zip(true_texts, swapped_texts)], dtype=torch.bool)
