"""The restricted vocabulary of the generator and the corrector: the words of the training captions.

Words are lower-cased; id 0 is the unknown word (a test caption's word the training corpus never used), which is
never sampled. Each word keeps its most frequent lemma (for the synonym filter) and how often it filled a span of
each kind (the one-word-swap test draws replacements of a kind from these counts).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from fne_fast.tags.spans import SPAN_KINDS, ParsedCaption

__all__ = ["Vocabulary", "build_vocabulary", "UNKNOWN"]

UNKNOWN = 0


@dataclass
class Vocabulary:
    words: list[str]  # id -> word; words[0] is the unknown-word marker
    lemmas: list[str]  # id -> its most frequent lemma
    kind_counts: dict[str, torch.Tensor]  # kind -> [V] float64, how often each word filled a span of that kind

    def __post_init__(self):
        self.index = {word: position for position, word in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    def id(self, word: str) -> int:
        return self.index.get(word.lower(), UNKNOWN)

    def state_dict(self) -> dict:
        return {"words": self.words, "lemmas": self.lemmas, "kind_counts": self.kind_counts}

    @classmethod
    def from_state(cls, state: dict) -> "Vocabulary":
        return cls(list(state["words"]), list(state["lemmas"]), dict(state["kind_counts"]))


def build_vocabulary(parsed: list[ParsedCaption], max_size: int = 8192) -> Vocabulary:
    """The ``max_size`` most frequent words (ties in alphabetical order, so the ids are reproducible)."""
    if max_size < 2:
        raise ValueError(f"max_size must be >= 2, got {max_size}")
    counts: Counter = Counter()
    lemma_counts: dict[str, Counter] = {}
    kind_counts = {kind: Counter() for kind in SPAN_KINDS}
    for caption in parsed:
        for word, lemma in zip(caption.words, caption.lemmas):
            if word.isalpha() or word.isdigit():
                counts[word.lower()] += 1
                lemma_counts.setdefault(word.lower(), Counter())[lemma] += 1
        for span in caption.spans:
            for position in span.positions:
                kind_counts[span.kind][caption.words[position].lower()] += 1
    kept = sorted(counts, key=lambda word: (-counts[word], word))[:max_size - 1]
    words = ["<unk>", *kept]
    lemmas = ["<unk>"] + [min(lemma_counts[word], key=lambda lemma: (-lemma_counts[word][lemma], lemma))
                          for word in kept]
    kind_tensors = {kind: torch.tensor([0.0] + [float(kind_counts[kind][word]) for word in kept],
                                       dtype=torch.float64) for kind in SPAN_KINDS}
    return Vocabulary(words, lemmas, kind_tensors)
