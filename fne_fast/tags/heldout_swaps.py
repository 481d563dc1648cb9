"""Swap families built by rules no training component uses, to test whether what TAGS-DC teaches generalises:

* ``unseen``: one word of a span replaced by a WordNet word of the span's part of speech that no training caption
  holds, so neither the generator nor the random 10 % of the masking can ever write it. The word is a sibling of
  the original where WordNet has one ("dog" -> "wolf", "big" -> "tiny"), else a common word of that part of speech
  (drawn in proportion to its sense-tagged count), inflected like the original ("running" -> "darting").
* ``exchange``: the head words of two spans of the same kind trade places within one clause ("a red car by a blue
  bike" -> "a blue car by a red bike"). In-place refills never reorder words, and the bag-of-words filter of
  training would call every exchange a copy. Words parted by punctuation are not exchanged: the items of a keyword
  list ("coder, developer, man") are unordered, and "medium-dark" -> "dark-medium" says nothing new. An exchange is
  kept unless it equals a caption of the image's group up to case and punctuation.

Each builder returns (caption rows, kind indices, swapped texts), like ``fne_fast.tags.swap.build_swaps``.
"""

from __future__ import annotations

import torch

from fne_fast.tags.filtering import CandidateFilter, normalise
from fne_fast.tags.lexicon import KIND_PART_OF_SPEECH, Lexicon, inflect_like
from fne_fast.tags.spans import SPAN_KINDS
from fne_fast.tags.synonyms import Synonyms
from fne_fast.tags.vocab import Vocabulary

__all__ = ["build_unseen_swaps", "build_exchange_swaps", "is_negative_swap", "swap_positions"]

_ATTEMPTS = 20  # replacements tried per (caption, kind) before giving that kind up


def is_negative_swap(checker: CandidateFilter, row: int, caption, replacements: dict, text: str) -> bool:
    """Whether a swap is kept: the generator's filter keeps it and the positive check does not flag it."""
    return (checker.reason_to_drop(row, caption, replacements, text, set()) is None
            and not checker.is_positive(row, caption, replacements, text))


def swap_positions(parsed, random: torch.Generator):
    """(row, caption, kind index, position) for each caption and each kind of span it has: one span of the kind
    drawn with ``random``, and its last word (the head noun of "skin tone")."""
    for row, caption in enumerate(parsed):
        for kind_index, kind in enumerate(SPAN_KINDS):
            spans = [span for span in caption.spans if span.kind == kind]
            if spans:
                chosen = spans[int(torch.randint(len(spans), (), generator=random))]
                yield row, caption, kind_index, chosen.positions[-1]


def _common_words(lexicon: Lexicon, vocabulary: Vocabulary) -> tuple[list[str], torch.Tensor]:
    """The fallback inventory: sense-tagged single-word lemmas outside the vocabulary, with their counts."""
    words = sorted(lemma for lemma, count in lexicon.tagged.items()
                   if count > 0 and lemma.isalpha() and len(lemma) >= 3 and vocabulary.id(lemma) == 0)
    return words, torch.tensor([float(lexicon.tagged[word]) for word in words], dtype=torch.float64)


def build_unseen_swaps(parsed, captions, caption_image, image_group, vocabulary: Vocabulary, synonyms: Synonyms,
                       lexicons: dict[str, Lexicon], seed: int) -> tuple[list[int], list[int], list[str]]:
    """The ``unseen`` family; ``vocabulary``: every word of the training captions; ``lexicons``: part of speech
    -> ``Lexicon``. A relation whose word is not a WordNet verb (a preposition) gets no swap."""
    checker = CandidateFilter(captions, caption_image, image_group, synonyms)
    random = torch.Generator().manual_seed(seed)
    fallback = {kind: _common_words(lexicons[pos], vocabulary) for kind, pos in KIND_PART_OF_SPEECH.items()}
    rows, kinds, texts = [], [], []
    for row, caption, kind_index, position in swap_positions(parsed, random):
        kind = SPAN_KINDS[kind_index]
        word, lemma = caption.words[position], caption.lemmas[position].lower()
        lexicon = lexicons[KIND_PART_OF_SPEECH[kind]]
        if lemma not in lexicon.synsets and word.lower() not in lexicon.synsets:
            continue
        siblings = [candidate for candidate in lexicon.siblings(lemma if lemma in lexicon.synsets
                                                                else word.lower())
                    if vocabulary.id(candidate) == 0]
        pool, weights = (siblings, torch.ones(len(siblings), dtype=torch.float64)) if siblings else (
            fallback[kind][0], fallback[kind][1].clone())
        for _ in range(_ATTEMPTS):
            if not weights.sum() > 0:
                break
            pick = int(torch.multinomial(weights, 1, generator=random))
            weights[pick] = 0.0
            new = inflect_like(word, lemma, pool[pick])
            if vocabulary.id(new) != 0 or synonyms.same_meaning(word, lemma, new, pool[pick]):
                continue
            replacements = {position: (new, pool[pick])}
            text = caption.replaced({position: new})
            if is_negative_swap(checker, row, caption, replacements, text):
                rows.append(row)
                kinds.append(kind_index)
                texts.append(text)
                break
    return rows, kinds, texts


def _clauses(words: tuple[str, ...]) -> list[int]:
    """The clause number of each word: it grows at every word that is punctuation (",", ":", "-", ...)."""
    numbers, current = [], 0
    for word in words:
        current += not any(character.isalnum() for character in word)
        numbers.append(current)
    return numbers


def build_exchange_swaps(parsed, captions, caption_image, image_group,
                         seed: int) -> tuple[list[int], list[int], list[str]]:
    """The ``exchange`` family: per caption and kind with two spans whose head words differ, one exchange."""
    caption_group = [image if image_group is None else int(image_group[image]) for image in caption_image]
    group_texts: dict[int, set[str]] = {}
    for text, group in zip(captions, caption_group):
        group_texts.setdefault(group, set()).add(normalise(text))
    random = torch.Generator().manual_seed(seed)
    rows, kinds, texts = [], [], []
    for row, caption in enumerate(parsed):
        for kind_index, kind in enumerate(SPAN_KINDS):
            heads = [span.positions[-1] for span in caption.spans if span.kind == kind]
            clause = _clauses(caption.words)
            pairs = [(first, second) for at, first in enumerate(heads) for second in heads[at + 1:]
                     if caption.words[first].lower() != caption.words[second].lower()
                     and clause[first] == clause[second]]
            if not pairs:
                continue
            first, second = pairs[int(torch.randint(len(pairs), (), generator=random))]
            words = list(caption.words)
            words[first], words[second] = caption.words[second].lower(), caption.words[first].lower()
            for position in (first, second):  # each place keeps its own capitalisation
                if caption.words[position][:1].isupper():
                    words[position] = words[position][:1].upper() + words[position][1:]
            text = "".join(word + space for word, space in zip(words, caption.spaces))
            if normalise(text) not in group_texts[caption_group[row]]:
                rows.append(row)
                kinds.append(kind_index)
                texts.append(text)
    return rows, kinds, texts
