"""Masked versions of a caption, as in BERT but over spans: each span is selected with probability 0.15 (at least
one span per version), and each word of a selected span is shown as the mask token (80 %), a random vocabulary
word (10 %) or itself (10 %). The generator predicts, and later refills, every selected word.

Random draws come from the ``torch.Generator`` passed in, so a version is a function of the generator's seed and
the order of the calls (the trainer seeds one generator per epoch from the run's seed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fne_fast.tags.spans import ParsedCaption
from fne_fast.tags.vocab import Vocabulary

__all__ = ["MASK_TOKEN", "MaskedVersion", "mask_caption"]

MASK_TOKEN = "[MASK]"  # MiniLM's (BERT's) mask token: its tokenizer keeps it as one token


@dataclass(frozen=True)
class MaskedVersion:
    words: tuple[str, ...]  # what the text backbone reads: mask tokens, random words or the original words
    positions: tuple[int, ...]  # the selected words' positions (the generator's targets are the originals there)
    kinds: tuple[str, ...]  # the span kind of each selected position

    def text(self, caption: ParsedCaption) -> str:
        return "".join(word + space for word, space in zip(self.words, caption.spaces))


def mask_caption(caption: ParsedCaption, vocabulary: Vocabulary, generator: torch.Generator, *,
                 probability: float = 0.15, mask_share: float = 0.8, random_share: float = 0.1) -> MaskedVersion:
    """One masked version of a caption that has at least one span."""
    if not caption.spans:
        raise ValueError(f"caption {caption.text!r} has no span to mask")
    chosen = (torch.rand(len(caption.spans), generator=generator) < probability).tolist()
    if not any(chosen):
        chosen[int(torch.randint(len(caption.spans), (), generator=generator))] = True
    spans = [span for span, selected in zip(caption.spans, chosen) if selected]
    positions = [position for span in spans for position in span.positions]
    kinds = [span.kind for span in spans for _ in span.positions]
    shown = list(caption.words)
    choices = torch.rand(len(positions), generator=generator).tolist()
    random_words = torch.randint(1, len(vocabulary), (len(positions),), generator=generator).tolist()
    for position, choice, random_word in zip(positions, choices, random_words):
        if choice < mask_share:
            shown[position] = MASK_TOKEN
        elif choice < mask_share + random_share:
            shown[position] = vocabulary.words[random_word]
    return MaskedVersion(tuple(shown), tuple(positions), tuple(kinds))
